"""Preprocessing settings: what a cache was made with, recorded in ``cache.json``.

Example
-------
>>> PreprocessSettings(normalize="paper").record((1024, 1280))["size"]
[512, 640]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from napari_wsdino.core import illumination as illum

NORMALIZATIONS = ("zscore", "paper", "plate", "none")
ILLUMINATION_METHODS = ("fast", "exact", "none")
#: How the resize is done (recorded in the cache settings).
RESIZE_METHOD = "torch.nn.functional.interpolate bicubic antialias=True"
FLOAT16_MAX = float(np.finfo(np.float16).max)
STAGE = "preprocess"


@dataclass(frozen=True)
class PreprocessSettings:
    """What preprocessing does; recorded in the cache and checked on reuse.

    Parameters
    ----------
    size
        Output ``(H, W)``; ``None``: half the input size (512 x 640 for BBBC021).
    clip
        Upper clip in raw 16-bit counts after illumination correction (the paper's
        code: 10,000); ``None``: no clip.
    filter_size
        CellProfiler smoothing filter size at the 1024 x 1280 scale (the paper: 320);
        scaled by ``sqrt(H * W / (1024 * 1280))`` for other input sizes.
    normalize
        ``"zscore"`` (each image to mean 0 / std 1), ``"paper"`` (divide by ``clip``),
        ``"plate"`` (per channel, every field of a plate shifted and scaled alike so that
        the plate's DMSO fields have mean 0 / std 1; all its fields when it has no DMSO:
        keeps the differences between a plate's fields; the ``cpu`` demo's choice) or
        ``"none"``.
    illumination
        ``"fast"`` (within 1 % of exact), ``"exact"`` (slow) or ``"none"``.
    borders
        Median-filter edges of the illumination function: ``"reflect"`` (mirrored) or
        ``"in-image"`` (CellProfiler's own definition; see :mod:`.illumination`).

    Example
    -------
    >>> PreprocessSettings(size=(256, 320), clip=None).output_size((1024, 1280))
    (256, 320)
    >>> PreprocessSettings().output_size((1024, 1280))
    (512, 640)
    """

    size: tuple[int, int] | None = None
    clip: float | None = 10000.0
    filter_size: float = 320.0
    normalize: str = "zscore"
    illumination: str = "fast"
    borders: str = "reflect"

    def __post_init__(self) -> None:
        if self.size is not None:
            size = tuple(int(v) for v in self.size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be two positive integers (H, W), not {self.size!r}")
            object.__setattr__(self, "size", size)
        if self.clip is not None:
            if not float(self.clip) > 0:
                raise ValueError(f"clip must be > 0 (or None for no clip), not {self.clip!r}")
            object.__setattr__(self, "clip", float(self.clip))
        if not float(self.filter_size) > 0:
            raise ValueError(f"filter_size must be > 0, not {self.filter_size!r}")
        object.__setattr__(self, "filter_size", float(self.filter_size))
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {self.normalize!r}")
        if self.normalize == "paper" and self.clip is None:
            raise ValueError("normalize='paper' divides by the clip value: set clip")
        if self.illumination not in ILLUMINATION_METHODS:
            raise ValueError(
                f"illumination must be one of {ILLUMINATION_METHODS}, not {self.illumination!r}"
            )
        if self.borders not in illum.BORDERS:
            raise ValueError(f"borders must be one of {illum.BORDERS}, not {self.borders!r}")

    def output_size(self, input_shape: tuple[int, int]) -> tuple[int, int]:
        """The output ``(H, W)`` for inputs of ``input_shape``."""
        if self.size is not None:
            return self.size
        return (max(1, int(input_shape[0]) // 2), max(1, int(input_shape[1]) // 2))

    def scaled_filter_size(self, input_shape: tuple[int, int]) -> float:
        """Filter size in pixels of images of ``input_shape``."""
        return illum.scaled_filter_size(self.filter_size, tuple(input_shape))

    def record(self, input_shape: tuple[int, int]) -> dict:
        """JSON-able description, with everything resolved for ``input_shape``."""
        scaled = self.scaled_filter_size(input_shape)
        rec = asdict(self)
        if self.borders == "reflect":
            rec.pop("borders")  # caches made before the option existed keep matching
        rec.update(
            size=list(self.output_size(input_shape)),
            input_shape=[int(v) for v in input_shape],
            filter_size_scaled=round(scaled, 6),
            disk_radius=illum.disk_radius(scaled),
            resize=RESIZE_METHOD,
            dtype="float16",
        )
        return rec

    @classmethod
    def from_record(cls, record: dict) -> "PreprocessSettings":
        """Settings back from a cache's ``settings`` record."""
        keys = cls.__dataclass_fields__
        return cls(**{k: record[k] for k in keys if k in record})

