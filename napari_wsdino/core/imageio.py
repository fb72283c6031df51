"""Reading 16-bit microscopy TIFFs, with errors that name the file.

Example
-------
>>> from napari_wsdino.core.imageio import read_tiff
>>> img = read_tiff("Week1/Week1_22123/Week1_150607_B02_s1_w1....tif")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tifffile


class ImageReadError(OSError):
    """An image file is missing, truncated or not a TIFF. ``path`` names it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"Cannot read image {self.path}: {reason}. Re-download or re-export this "
            "file, or drop its field (CLI: --drop-missing)."
        )


def read_tiff(path: str | Path) -> np.ndarray:
    """Read one single-plane TIFF as a 2-D array (dtype preserved, usually uint16).

    Raises
    ------
    ImageReadError
        The file is missing, corrupt, truncated or holds no 2-D image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    try:
        img = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt input
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from None
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise ImageReadError(path, f"expected one 2-D plane, found shape {img.shape}")
    return img


def write_tiff(path: str | Path, image: np.ndarray) -> None:
    """Write a 2-D array as an uncompressed TIFF (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(image))


def read_field(paths: Sequence[str | Path]) -> np.ndarray:
    """Read the channel files of one field and stack them as ``(C, H, W)``."""
    planes = [read_tiff(p) for p in paths]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise ImageReadError(paths[0], f"channels differ in shape: {sorted(shapes)}")
    return np.stack(planes)


@dataclass
class ReadReport:
    """What a batch read skipped: one entry per unreadable file."""

    errors: list[ImageReadError] = field(default_factory=list)

    @property
    def unreadable(self) -> list[Path]:
        return [e.path for e in self.errors]


def iter_fields(
    field_paths: Iterable[Sequence[str | Path]], report: ReadReport | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(i, image)`` for each readable field; bad files go into ``report``.

    A corrupt file never stops the batch: its field is skipped and recorded.
    """
    for i, paths in enumerate(field_paths):
        try:
            yield i, read_field(paths)
        except ImageReadError as exc:
            if report is not None:
                report.errors.append(exc)


def image_problems(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """``(path, reason)`` for each file preprocessing would leave out, from the TIFF
    headers alone: unreadable or truncated, not one 2-D plane (RGB, stacks), or of a
    size / pixel type other than the commonest among ``paths``.

    Example
    -------
    >>> image_problems(meta.paths("DAPI"))                  # doctest: +SKIP
    [(PosixPath('.../B02_s1_w1.tif'), 'pixels are float64, most images are uint16')]
    """
    bad, heads = [], {}
    for p in paths:
        try:
            heads[Path(p)] = _header(p)
        except Exception as exc:  # noqa: BLE001 - any failure: unreadable
            bad.append((Path(p), f"unreadable ({exc})"))
    for p, (shape, _) in heads.items():
        if len(shape) != 2:
            bad.append((p, f"expected one 2-D plane, found shape {shape}"))
    planes = {p: h for p, h in heads.items() if len(h[0]) == 2}
    if planes:
        counts: dict = {}
        for h in planes.values():
            counts[h] = counts.get(h, 0) + 1
        shape, dtype = max(counts, key=counts.get)
        for p, (s, d) in planes.items():
            if s != shape:
                bad.append((p, f"image is {s[0]}x{s[1]}, most images are {shape[0]}x{shape[1]}"))
            elif d != dtype:
                bad.append((p, f"pixels are {d}, most images are {dtype}"))
    return bad


def _header(path: str | Path) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of a TIFF's first page, checking the pixel data is all there."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        expected = int(np.prod(page.shape)) * page.dtype.itemsize
        # Truncated files keep a valid header; compare the bytes present.
        offsets, counts = page.dataoffsets, page.databytecounts
        end = max(o + c for o, c in zip(offsets, counts)) if offsets else 0
        if page.compression == 1 and sum(counts) < expected:
            raise ValueError("strip sizes smaller than the image")
        if end > Path(path).stat().st_size:
            raise ValueError("file shorter than its image data")
        shape = tuple(int(v) for v in page.shape)
        if len(tf.pages) > 1:
            shape = (len(tf.pages),) + shape
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        return shape, np.dtype(page.dtype).name
