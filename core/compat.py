"""Make `import torchvision` work on a CPU-only torch.

PyPI's torchvision wheel is a CUDA build; against the CPU torch its compiled ops fail to load and
its import stops at "operator torchvision::nms does not exist". transformers and open_clip import
torchvision, so before that happens we try the real library and, only if it cannot load, register
placeholder schemas for the two ops torchvision's meta registrations look up at import time.
"""

import glob
import importlib.util
import os

import torch

_placeholder_lib = None  # keeps the placeholder registrations alive


def patch_torchvision() -> None:
    global _placeholder_lib
    if _placeholder_lib is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return
    except OSError:
        pass
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already defined by someone else)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _placeholder_lib = lib
