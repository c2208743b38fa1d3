"""Import helpers for environments with a mismatched torchvision build."""

import sys


def import_open_clip():
    """Import open_clip, working around a torchvision whose compiled ops do not load.

    A CUDA build of torchvision beside a CPU build of torch fails at import with
    "operator torchvision::nms does not exist": its meta registrations need op
    schemas that the unloadable C extension would have defined. open_clip never
    calls those ops, so defining the schemas (no kernels) is enough to import it.
    """
    try:
        import open_clip
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")  # noqa: kept alive below
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP_ALIVE.append(library)
        import open_clip
    return open_clip


_KEEP_ALIVE = []
