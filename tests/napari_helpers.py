"""Tiny official-layout BBBC021 datasets for the napari tests (made here, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from napari_wsdino.core.imageio import write_tiff
from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV, bundled_metadata_dir

CHANNEL_FILES = {"DAPI": "Image_FileName_DAPI", "Tubulin": "Image_FileName_Tubulin",
                 "Actin": "Image_FileName_Actin"}


def pick_rows(plates: int = 2, wells: int = 2, sites: int = 2) -> pd.DataFrame:
    """A few real rows of the bundled image CSV: ``plates`` x ``wells`` x ``sites``."""
    df = pd.read_csv(bundled_metadata_dir() / IMAGE_CSV)
    df["_site"] = df.Image_FileName_DAPI.str.extract(r"_s(\d+)_", expand=False).astype(int)
    chosen = []
    for plate in sorted(df.Image_Metadata_Plate_DAPI.unique())[:plates]:
        sub = df[df.Image_Metadata_Plate_DAPI == plate]
        # one non-DMSO well first so compound/MoA differ between wells
        ordered = sorted(sub.Image_Metadata_Well_DAPI.unique(),
                         key=lambda w: (sub[sub.Image_Metadata_Well_DAPI == w]
                                        .Image_Metadata_Compound.iloc[0] == "DMSO", w))
        for well in ordered[:wells]:
            chosen.append(sub[(sub.Image_Metadata_Well_DAPI == well) & (sub._site <= sites)])
    return pd.concat(chosen).drop(columns="_site").reset_index(drop=True)


def write_tiny_dataset(root: Path, plates: int = 2, wells: int = 2, sites: int = 2,
                       shape: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Write an official-layout folder: filtered CSVs + one uint16 TIFF per channel and field.

    Field ``i``'s images have mean brightness ``1000 * (i + 1)`` (channel offset added),
    so a test can tell fields apart from pixel values alone.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = pick_rows(plates, wells, sites)
    rng = np.random.default_rng(seed)
    for i, row in rows.iterrows():
        for c, (channel, col) in enumerate(CHANNEL_FILES.items()):
            path_col = col.replace("FileName", "PathName")
            img = rng.normal(1000 * (i + 1) + 100 * c, 50, size=shape).clip(0, 65535)
            write_tiff(root / row[path_col] / row[col], img.astype(np.uint16))
    rows.to_csv(root / IMAGE_CSV, index=False)
    moa = pd.read_csv(bundled_metadata_dir() / MOA_CSV)
    moa.to_csv(root / MOA_CSV, index=False)
    return root


def write_tiny_cache(path: Path, per_compound: int = 6, size: int = 48, seed: int = 0,
                     compounds=("taxol", "AZ138", "ALLN", "DMSO"), dataset: Path | None = None):
    """A preprocessed cache of a few real BBBC021 fields with per-compound stripe images.

    With ``dataset``, an official-layout folder of the same fields (small TIFFs) is
    written there too, so the viewer can open the fields the cache holds.
    """
    from napari_wsdino.core.cache import write_cache
    from napari_wsdino.core.metadata import load_metadata

    raw = pd.read_csv(bundled_metadata_dir() / IMAGE_CSV)
    raw = pd.concat([raw[raw.Image_Metadata_Compound == c].head(per_compound)
                     for c in compounds]).reset_index(drop=True)
    if dataset is not None:
        rng = np.random.default_rng(seed)
        for i, row in raw.iterrows():
            for c, col in enumerate(CHANNEL_FILES.values()):
                img = rng.normal(1000 * (i + 1) + 100 * c, 50, size=(size, size))
                write_tiff(Path(dataset) / row[col.replace("FileName", "PathName")] / row[col],
                           img.clip(0, 65535).astype(np.uint16))
        raw.to_csv(Path(dataset) / IMAGE_CSV, index=False)
        pd.read_csv(bundled_metadata_dir() / MOA_CSV).to_csv(Path(dataset) / MOA_CSV, index=False)
        table = load_metadata(dataset).table
    else:
        table = load_metadata(bundled_metadata_dir(), check_files=False).table
        table = pd.concat([table[table.compound == c].head(per_compound) for c in compounds])
        table = table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = {c: 2 + 3 * i for i, c in enumerate(compounds)}
    images = {}
    for k, channel in enumerate(("DAPI", "Tubulin", "Actin")):
        images[channel] = np.stack([
            0.5 + 0.4 * np.sin(2 * np.pi * freq[c] * (np.cos(k) * xx + np.sin(k) * yy))
            + 0.1 * rng.standard_normal((size, size)) for c in table.compound
        ]).astype(np.float32)
    return write_cache(path, table, images, {"test": True})


TINY_TRAIN_TOML = """[train]
arch = "test_vit"
hidden_dim = 64
bottleneck_dim = 32
warmup_epochs = 1
min_lr = 1e-7
checkpoint_every = 1
"""


class LoopGaps:
    """Gaps between ticks of a 50 ms QTimer: how long the GUI thread could not respond.

    Records, per gap, the wall-clock time, the GUI thread's own CPU time
    (``time.thread_time``) and, on Linux, the time it sat in the run queue waiting for a
    core (``/proc/self/task/<tid>/schedstat``). On a machine loaded by other processes
    the wall-clock gap counts that wait too; the gap less the wait (``blocked``) is what
    this process did to the GUI thread: its own work, or waiting for a lock such as the
    GIL held by a worker.

    >>> gaps = LoopGaps(); gaps.start(); ...; gaps.stop(); gaps.longest_ms  # doctest: +SKIP
    """

    def __init__(self, interval_ms: int = 50):
        from qtpy.QtCore import QTimer

        self.interval_ms = interval_ms
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.ticks: list[tuple[float, float, float]] = []
        self._schedstat: str | None = None

    def _queued(self) -> float:
        """Seconds the GUI thread has waited in the run queue (0 where unknown)."""
        import threading

        if self._schedstat is None:
            self._schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        try:
            with open(self._schedstat) as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def _tick(self) -> None:
        import time

        self.ticks.append((time.perf_counter(), time.thread_time(), self._queued()))

    def start(self) -> "LoopGaps":
        self.ticks.clear()
        self._tick()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.stop()
        self._tick()

    def _gaps(self, column: int):
        import numpy as np

        t = np.asarray(self.ticks).reshape(-1, 3)
        return np.diff(t[:, column]) * 1000

    @property
    def gaps_ms(self):
        """Every wall-clock gap between two ticks (ms)."""
        return self._gaps(0)

    @property
    def longest_ms(self) -> float:
        """Longest wall-clock gap between ticks."""
        gaps = self._gaps(0)
        return float(gaps.max()) if len(gaps) else 0.0

    @property
    def longest_cpu_ms(self) -> float:
        """Most CPU time the GUI thread spent between two ticks."""
        gaps = self._gaps(1)
        return float(gaps.max()) if len(gaps) else 0.0

    @property
    def longest_blocked_ms(self) -> float:
        """Longest gap less the time the GUI thread waited for a core (other processes)."""
        gaps = self._gaps(0) - self._gaps(2)
        return float(gaps.max()) if len(gaps) else 0.0

    def count_over(self, ms: float) -> int:
        """How many wall-clock gaps were longer than ``ms``."""
        return int((self._gaps(0) > ms).sum())

    def summary(self) -> str:
        import numpy as np

        gaps = self._gaps(0)
        if not len(gaps):
            return "no ticks"
        return (f"{len(gaps)} gaps, median {np.median(gaps):.0f} ms, p95 "
                f"{np.percentile(gaps, 95):.0f} ms, max {gaps.max():.0f} ms, "
                f"{self.count_over(100)} over 100 ms; less the wait for a core max "
                f"{self.longest_blocked_ms:.0f} ms; GUI thread CPU max "
                f"{self.longest_cpu_ms:.0f} ms")


def wait_quiet(qtbot, quiet_ms: int = 500, gap_ms: float = 100, timeout: int = 20_000) -> None:
    """Wait until the event loop ran ``quiet_ms`` without a gap over ``gap_ms``.

    Docks just added paint for the first time (matplotlib canvases, vispy) and settle
    their layout; a latency measurement starts after that, not during it.
    """
    import time

    gaps = LoopGaps().start()
    t0 = time.perf_counter()

    def quiet() -> bool:
        ticks = [t[0] for t in gaps.ticks]
        recent = [b - a for a, b in zip(ticks, ticks[1:]) if b > ticks[-1] - quiet_ms / 1000]
        return ticks[-1] - t0 > quiet_ms / 1000 and max(recent, default=1) * 1000 < gap_ms

    try:
        qtbot.waitUntil(quiet, timeout=timeout)
    finally:
        gaps.stop()


def write_tiny_run(run: Path, weak_label: str = "compound", seed: int = 0,
                   channels=("DAPI", "Tubulin", "Actin")) -> Path:
    """A training run folder, ``RUN/<channel>/checkpoint.pth``, of random ``test_vit``
    teachers whose checkpoints record their channel and weak label as ours do."""
    import torch

    from napari_wsdino.core.layout import checkpoint_path
    from napari_wsdino.core.model import CHECKPOINT_FORMAT, create_backbone

    for i, channel in enumerate(channels):
        torch.manual_seed(seed * 100 + i)
        sd = {f"backbone.{k}": v for k, v in create_backbone("test_vit", in_chans=1).state_dict().items()}
        path = checkpoint_path(run, channel)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": CHECKPOINT_FORMAT, "channel": channel, "weak_label": weak_label,
                    "config": {"arch": "test_vit", "weak_label": weak_label},
                    "teacher": sd, "student": sd}, path)
    return Path(run)
