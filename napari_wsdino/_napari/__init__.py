"""The napari edge of napari-wsdino: reader, widgets, workers and shared state.

Nothing in :mod:`napari_wsdino.core` imports this package; only the npe2 manifest
(``napari.yaml``) points into it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _hide_triton_after_mesa_llvm() -> bool:
    """Keep triton out of a process where Mesa's libLLVM is already loaded.

    With software OpenGL (Mesa llvmpipe, e.g. under Xvfb or on machines without a GPU
    driver), napari's canvas loads ``libLLVM``; loading triton's own LLVM after it
    crashes the whole process (segmentation fault). torch imports triton lazily
    (timm → torchvision → ``torch._dynamo``), i.e. when a panel first needs a model,
    long after the canvas exists. Hiding triton then lets torch run without it: the
    only loss is ``torch.compile`` inside napari; the ``wsdino`` CLI is unaffected.
    Returns True when triton was hidden.
    """
    if "triton" in sys.modules:
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no /proc, and no such clash seen
        return False
    if re.search(r"/libLLVM[-.\w]*\.so", maps):
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        return True
    return False


_hide_triton_after_mesa_llvm()
