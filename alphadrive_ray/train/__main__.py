"""`python -m alphadrive_ray.train CONFIG [--set key=value ...] [--resume]`: the Ray job entrypoint."""

import sys

from alphadrive_ray.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
