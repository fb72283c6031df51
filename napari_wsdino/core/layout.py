"""The on-disk layout of runs, checkpoints, profiles and demo outputs, written once.

Every path the CLI, the panels and the workflows read or write beside a cache is
spelled here, so moving a file means changing one function::

    <parent>/cache/                     a preprocessed cache ('wsdino preprocess')
    <parent>/runs/<weak label>/         a training run (default folder)
        <channel>/checkpoint.pth        the latest checkpoint of one channel's model
        <channel>/config.toml           the TrainConfig it was trained with
        <channel>/log.jsonl             one record per epoch
        <channel>/teacher_epochNNNN.pth teacher snapshots (``snapshot_every``)
    <parent>/profiles/<kind>-<fp>.parquet  profiles of a model set (the Evaluate panel)

>>> checkpoint_path("runs/compound", "DAPI").as_posix()
'runs/compound/DAPI/checkpoint.pth'
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

CHECKPOINT_FILE = "checkpoint.pth"
CONFIG_FILE = "config.toml"
LOG_FILE = "log.jsonl"
RUNS_DIR = "runs"
PROFILES_DIR = "profiles"

PathLikeStr = str | PathLike


def runs_root(cache: PathLikeStr) -> Path:
    """The folder beside a cache that holds its training runs."""
    return Path(cache).resolve().parent / RUNS_DIR


def default_run_dir(cache: PathLikeStr, weak_label: str) -> Path:
    """Where a run on ``cache`` with ``weak_label`` goes unless told otherwise."""
    return runs_root(cache) / weak_label


def channel_dir(run: PathLikeStr, channel: str) -> Path:
    """One channel's folder of a run."""
    return Path(run) / channel


def checkpoint_path(run: PathLikeStr, channel: str) -> Path:
    return channel_dir(run, channel) / CHECKPOINT_FILE


def config_path(run: PathLikeStr, channel: str) -> Path:
    return channel_dir(run, channel) / CONFIG_FILE


def log_path(run: PathLikeStr, channel: str) -> Path:
    return channel_dir(run, channel) / LOG_FILE


def snapshot_path(channel_folder: PathLikeStr, epoch: int) -> Path:
    """A teacher-only snapshot of one channel's model after ``epoch`` (``snapshot_every``)."""
    return Path(channel_folder) / f"teacher_epoch{epoch:04d}.pth"


def trained_channels(run: PathLikeStr, channels) -> list[str]:
    """The channels of ``channels`` that have a checkpoint in ``run``."""
    return [c for c in channels if checkpoint_path(run, c).exists()]


def profiles_path(cache: PathLikeStr, kind: str, fingerprint: str) -> Path:
    """Where a cache's profiles for one model set go (beside the cache; reruns resume)."""
    return Path(cache).parent / PROFILES_DIR / f"{kind}-{fingerprint[:10]}.parquet"


def demo_paths(out: PathLikeStr) -> dict[str, Path]:
    """Every file and folder of a ``wsdino demo`` output folder."""
    out = Path(out)
    return {"data": out / "data", "cache": out / "cache", "run": out / "run",
            "run_dino": out / "run_dino",
            "profiles": out / "profiles.parquet",
            "dino_profiles": out / "profiles_dino.parquet",
            "baseline_profiles": out / "profiles_random_init.parquet",
            "init_profiles": out / "profiles_init_only.parquet",
            "classical_profiles": out / "profiles_classical.parquet",
            "truth_profiles": out / "data" / "truth.parquet",
            "results": out / "results.json", "report": out / "report.html"}
