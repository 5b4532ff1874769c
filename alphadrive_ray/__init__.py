"""alphadrive-ray: AlphaDrive's two-stage (SFT + GRPO) training of VLM driving planners on Ray.

Importing the package is cheap: it never imports Ray, DeepSpeed, vLLM or torch. Those are
imported by the modules that need them.
"""

__version__ = "0.1.0"
