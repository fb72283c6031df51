"""The model choices offered by name, importable without torch.

The ViT architectures (:data:`ARCHITECTURES`, the tiny :data:`CPU_ARCHS`,
:data:`DEFAULT_ARCH`, :func:`arch_patch_size`), :data:`RANDOM_INIT` and the DINO loss's
:data:`CENTERINGS` are what menus, option lists and setting checks need; the panels, the
CLI's parsers and :class:`~napari_wsdino.core.train.settings.TrainConfig` read them here,
so that building a form or checking a config loads no torch. :mod:`napari_wsdino.core.model`
(which registers the CPU ViTs with timm) and :mod:`napari_wsdino.core.dino` re-export them.

Example
-------
>>> from napari_wsdino.core.archs import ARCHITECTURES, arch_patch_size
>>> ARCHITECTURES["wsdino_vit_pico_patch8"].title, arch_patch_size("vit_tiny_patch16_224")
('tiny ViT pico/8 (CPU)', 16)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ARCH = "vit_small_patch8_224"
#: Small ViTs for CPU demos and tests, registered with timm under these names
#: (:mod:`napari_wsdino.core.model`).
CPU_ARCHS = {
    # name: (patch size, width, depth, heads)
    "wsdino_vit_pico_patch8": (8, 96, 4, 3),
    "wsdino_vit_nano_patch8": (8, 192, 6, 3),
}
#: ``--init random``: start from random weights on purpose (where weights are expected).
RANDOM_INIT = "random"
#: How the DINO loss keeps the teacher from collapsing (:class:`~napari_wsdino.core.dino.DINOLoss`).
CENTERINGS = ("centre", "sinkhorn")


@dataclass(frozen=True)
class Architecture:
    """A ViT offered by name in the CLI help and the panels (any timm ViT name also works)."""

    name: str
    title: str
    patch_size: int
    help: str


#: Architectures offered, in menu order: the only list of them (the panels' menus read it).
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(DEFAULT_ARCH, "ViT-S/8 (paper)", 8, "the paper's backbone; a GPU is needed"),
    *(Architecture(name, f"tiny ViT {name.split('_')[2]}/{patch} (CPU)", patch,
                   f"{depth} blocks of width {dim}, "
                   f"{heads} heads: CPU demos and tests")
      for name, (patch, dim, depth, heads) in CPU_ARCHS.items()),
    Architecture("vit_base_patch8_224", "ViT-B/8", 8, "DINO's larger ViT; a large GPU"),
)}


def arch_patch_size(arch: str) -> int | None:
    """Patch size of an architecture name (registered, or timm's ``..._patchN_...``).

    >>> arch_patch_size("vit_small_patch8_224"), arch_patch_size("vit_tiny_patch16_224")
    (8, 16)
    """
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch].patch_size
    match = re.search(r"patch(\d+)", arch)
    return int(match.group(1)) if match else None
