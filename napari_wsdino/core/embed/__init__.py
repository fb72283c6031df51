"""Field profiles: per-channel ViT embeddings of the four centre crops, as in WS-DINO.

The WS-DINO paper (Methods, "Post-processing") embeds each field of view by "the
median feature embedding from four crops around the centre of each image
(equivalent to a pixel centre crop split into four non-overlapping crops)", one
model per channel, "then concatenated [...] followed by L2 normalization".

Here, for a crop size ``c`` (224 like the paper by default):

1. take the centre square of side ``2c`` of the preprocessed field and split it into
   its four ``c x c`` quadrants (top-left, top-right, bottom-left, bottom-right);
2. pass each quadrant through the channel's backbone (after the input normalisation
   it was trained with, ``(x - input_mean) / input_std``) and keep the CLS output;
3. take the per-dimension median of the four (for four values: the mean of the two
   middle ones, as :func:`numpy.median`);
4. concatenate the channels in the model set's order and L2-normalise.

When the field is smaller than ``2c`` the crop is clamped to ``min(H, W) // 2``, and
it is always rounded down to a multiple of the ViT patch size (see
:func:`crop_geometry`); the crop used is recorded with the result.

:func:`embed_cache` runs this over a preprocessed cache as a generator of
:class:`~napari_wsdino.core.progress.Progress` events that returns the profile
table. Closing the generator cancels it; with ``out`` set, finished chunks are kept
in ``OUT.parts/`` and a rerun skips them.

The package's modules, one job each (every name is importable from here):
:mod:`~napari_wsdino.core.embed.crops` (where the crops are),
:mod:`~napari_wsdino.core.embed.features` (crops to profiles),
:mod:`~napari_wsdino.core.embed.parts` (``OUT.parts/`` and the profile file),
:mod:`~napari_wsdino.core.embed.runner` (:func:`embed_cache`) and
:mod:`~napari_wsdino.core.embed.settings` (the choice lists, the defaults and
:class:`EmbedSettings`). Importing the package or its settings loads no torch; the names
that need it load it on first use.

Example
-------
>>> from napari_wsdino.core.cache import open_cache               # doctest: +SKIP
>>> from napari_wsdino.core.modelset import ModelSet              # doctest: +SKIP
>>> from napari_wsdino.core.progress import run_to_end            # doctest: +SKIP
>>> models = ModelSet.from_run("runs/wsdino")                     # doctest: +SKIP
>>> profiles = run_to_end(embed_cache(open_cache("cache"), models, "profiles.parquet"))  # doctest: +SKIP
"""

from __future__ import annotations

from napari_wsdino.core.embed.parts import PARTS_FORMAT, parts_folder, write_profiles
from napari_wsdino.core.embed.settings import (DEFAULT_BATCH, DEFAULT_CHUNK, DEFAULT_CROP,
                                               MAX_CELLS, MEDIANS, POOLINGS, WINDOWS,
                                               EmbedSettings)

__all__ = [
    "DEFAULT_BATCH", "DEFAULT_CHUNK", "DEFAULT_CROP", "MAX_CELLS", "MEDIANS", "OFFICIAL_SHAPE",
    "OFFICIAL_WINDOWS", "PARTS_FORMAT", "POOLINGS", "WINDOWS", "EmbedSettings", "cell_crops",
    "centre_crops", "crop_geometry", "embed_cache", "embed_channel", "embed_fields",
    "feature_names", "l2_normalise", "median_of_four", "official_windows", "parts_folder",
    "pooled_features", "profile_table", "write_profiles",
]

#: The names of the modules that need torch, imported on first use (PEP 562): the settings
#: above load without torch, for :mod:`napari_wsdino.core.recipes` and torch-free commands.
_TORCH_NAMES = {
    "crops": ("OFFICIAL_SHAPE", "OFFICIAL_WINDOWS", "cell_crops", "centre_crops",
              "crop_geometry", "median_of_four", "official_windows"),
    "features": ("embed_channel", "embed_fields", "feature_names", "l2_normalise",
                 "pooled_features", "profile_table"),
    "runner": ("embed_cache",),
}


def __getattr__(name: str):
    """A name of ``_TORCH_NAMES`` (or one of its modules), imported now."""
    if name in _TORCH_NAMES:  # a module not imported yet: ``embed.runner``
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if not any(name in names for names in _TORCH_NAMES.values()):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from napari_wsdino.core.embed import crops, features, runner  # torch

    modules = {"crops": crops, "features": features, "runner": runner}
    for module, names in _TORCH_NAMES.items():
        globals().update({n: getattr(modules[module], n) for n in names})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
