"""Let PyPI's (CUDA-built) torchvision import next to a CPU-only torch.

torchvision's _C.so links libtorch_cuda, so with torch+cpu it does not load (torchvision ignores
that), but torchvision/_meta_registrations.py then calls torch.library.register_fake on
"torchvision::nms" and "torchvision::qnms" unconditionally and raises "operator torchvision::nms
does not exist". Just before that module runs, define the two schemas (no kernels) when the C++
ops did not load. No-op when torchvision's _C loads. Imports nothing until torchvision is imported.
"""
import sys

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_TARGET = "torchvision._meta_registrations"


class _Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _TARGET:
            return None
        import torch
        import torchvision.extension

        if not torchvision.extension._has_ops():
            for op, schema in _SCHEMAS.items():
                if not hasattr(torch.ops.torchvision, op):
                    torch.library.define(f"torchvision::{op}", schema)
        return None  # the normal finders load the module


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
