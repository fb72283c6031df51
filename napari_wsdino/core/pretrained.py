"""Weights that ship with the package, addressed by name wherever a weights file is taken.

The paper never trains WS-DINO from random weights: it fine-tunes a DINO-pretrained ViT.
For the tiny CPU ViT of the ``cpu`` preset no public pretrained weights exist, so the
package ships one, made by ``benchmarks/pretrain_init.py``: plain DINO (no labels) on the
synthetic replica of a seed the docs never evaluate, every stain in turn
(benchmarks/RESULTS.md, "Issue 13"). It is the ``cpu`` preset's default ``init``;
``--init random`` trains from random weights instead.

A bundled file holds only the teacher (backbone and DINO head, float16), records its
architecture and no channel, so it serves every stain: ``--init replica-dino-pico8-cells``,
``--model DAPI=replica-dino-pico8-cells`` and the Models panel's "init only" all take the name.

>>> resolve_weights("replica-dino-pico8-cells").name
'replica_dino_pico8_cells.pth'
>>> str(resolve_weights("runs/a/DAPI/checkpoint.pth"))
'runs/a/DAPI/checkpoint.pth'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class BundledWeights:
    """One weights file shipped in ``napari_wsdino/weights``."""

    name: str
    file: str
    arch: str
    about: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


#: The ``cpu`` preset's initial weights (the bundled file every CPU demo fine-tunes).
DEFAULT_INIT = "replica-dino-pico8-cells"

#: Every bundled weights file, by the name users type.
BUNDLED: dict[str, BundledWeights] = {b.name: b for b in (
    BundledWeights(
        DEFAULT_INIT, "replica_dino_pico8_cells.pth", "wsdino_vit_pico_patch8",
        "plain DINO (no labels), tiny patch-8 ViT, 300 epochs per stain (DAPI, Tubulin, "
        "Actin in turn) on the synthetic BBBC021 replica of seed 101 (mini, 2 sites, "
        "160 x 200, per-plate normalisation), on cell-scale crops (global views 8-16 %, "
        "local 2-5 % of the field, centred on nuclei): benchmarks/pretrain_init.py"),
    BundledWeights(
        "replica-dino-pico8", "replica_dino_pico8.pth", "wsdino_vit_pico_patch8",
        "the previous cpu-preset init (until 2026-12-01): as replica-dino-pico8-cells but "
        "on field-scale crops (global views 50-100 %, local 20-50 %); its attention does "
        "not settle on the cells"),
)}


def resolve_weights(value: str | Path) -> Path:
    """The file behind a weights argument: a bundled name, or the path as given."""
    bundled = BUNDLED.get(str(value))
    return bundled.path if bundled is not None else Path(value)


def weights_exist(value: str | Path) -> bool:
    """Whether a weights argument (bundled name or path) names an existing file or folder."""
    return resolve_weights(value).exists()


def bundled_arch(value: str | Path) -> str | None:
    """The architecture of a bundled name (``None`` for a path)."""
    bundled = BUNDLED.get(str(value))
    return bundled.arch if bundled is not None else None


def slim_init(checkpoint: Mapping, about: str, arch: str) -> dict:
    """A training checkpoint reduced to what an ``init`` needs: the teacher's backbone and
    head in float16, its architecture and a description; no channel, so any stain takes it.

    Example
    -------
    >>> import torch
    >>> slim = slim_init({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)},
    ...                   "student": {}}, "test", "test_vit")
    >>> sorted(slim), slim["teacher"]["backbone.cls_token"].dtype
    (['about', 'arch', 'teacher'], torch.float16)
    """
    import torch

    teacher = {k: (v.half() if v.is_floating_point() else v)
               for k, v in checkpoint["teacher"].items() if isinstance(v, torch.Tensor)}
    return {"teacher": teacher, "arch": arch, "about": about}
