"""Embedding settings: each choice list and default of the embedding stage, written once,
and :class:`EmbedSettings`, the part of them a recipe sets.

Torch-free (the package's ``__init__`` loads its torch modules on first use), so that
:mod:`napari_wsdino.core.recipes`, which combines the stages, reads them at import while
``wsdino evaluate`` lists the recipes without torch. Re-exported by
:mod:`napari_wsdino.core.embed`.

Example
-------
>>> EmbedSettings().crop, EmbedSettings(windows="official").median
(224, 'mean-middle')
"""

from __future__ import annotations

from dataclasses import dataclass

#: The paper's crop side: four ``224 x 224`` crops around the centre of each field.
DEFAULT_CROP = 224
#: Where the four crops come from: ``centre`` (four quadrants of the centre square) or
#: ``official`` (the fixed windows of WS-DINO's published evaluation, ``Eval_BBBC021.py``).
#: ``cells``: one crop centred on every nucleus of the field (up to :data:`MAX_CELLS`, found
#: on the DNA channel), their embeddings averaged: a population profile, as single-cell
#: DINO works build theirs.
WINDOWS = ("centre", "official", "cells")
MAX_CELLS = 64
#: Median of the four crop embeddings: ``mean-middle`` (numpy's, the mean of the two
#: middle values) or ``lower`` (``torch.median``'s lower middle value, the published code's).
MEDIANS = ("mean-middle", "lower")
#: What a crop's embedding is: the CLS token (the paper), or the CLS token followed by
#: the mean of the patch tokens (richer for small models trained briefly).
POOLINGS = ("cls", "cls+mean")
#: Precisions of embedding (and of training, ``TrainConfig.precision``): ``auto`` = bf16
#: autocast on CUDA, fp32 on CPU; ``fp32`` = the official code's fp32 evaluation.
PRECISIONS = ("auto", "fp32", "bf16")
#: Fields per forward pass (four crops each) and per resumable chunk of ``OUT.parts/``.
DEFAULT_BATCH = 16
DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class EmbedSettings:
    """How fields become profiles (:func:`napari_wsdino.core.embed.embed_cache`)."""

    crop: int = DEFAULT_CROP
    windows: str = "centre"
    median: str = "mean-middle"
    l2: bool = True
    precision: str = "auto"
    pos_embed: str = "timm"

    def __post_init__(self):
        if self.windows not in WINDOWS:
            raise ValueError(f"windows must be one of {', '.join(WINDOWS)}, not {self.windows!r}.")
        if self.median not in MEDIANS:
            raise ValueError(f"median must be one of {', '.join(MEDIANS)}, not {self.median!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"not {self.precision!r}.")
        from napari_wsdino.core.pos_embed import POS_EMBED_MODES  # torch: only when checked

        if self.pos_embed not in POS_EMBED_MODES:
            raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBED_MODES)}, "
                             f"not {self.pos_embed!r}.")
