import sys

from alphadrive_ray.cli import main

sys.exit(main())
