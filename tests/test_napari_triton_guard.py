"""Opening a model panel after the napari canvas exists must not crash the process.

Mesa's software OpenGL loads libLLVM; triton's LLVM loaded after it segfaults. The
import below runs in a fresh interpreter so that nothing was imported before the viewer.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import napari
viewer = napari.Viewer(show=False)
from napari_wsdino._napari import models_widget  # imports timm, torch, torchvision
from napari_wsdino.core.model import create_backbone
import torch
out = create_backbone("test_vit")(torch.zeros(1, 1, 32, 32))
print("ok", tuple(out.shape))
viewer.close()
"""


def test_models_after_viewer_do_not_crash():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok (1, 64)" in res.stdout
