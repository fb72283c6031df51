"""What the Train panel writes about a run: how far a run folder is, and the status line
of each training event (channel, epoch, loss, speed, step and one ETA for the whole run).

Plain functions of events and files, no Qt, so tests read them directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from napari_wsdino.core import layout
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.train import TrainConfig


def run_summary(run: str | Path, channels) -> str:
    """How far a run folder's channels are (from config.toml and log.jsonl; no weights read)."""
    parts = []
    for channel in channels:
        config, log = layout.config_path(run, channel), layout.log_path(run, channel)
        if not config.exists():
            continue
        try:
            epochs = TrainConfig.load(config).epochs
            lines = log.read_text().splitlines() if log.exists() else []
            done = json.loads(lines[-1])["epoch"] if lines else 0
        except (OSError, ValueError, KeyError):
            continue
        parts.append(f"{channel} {done}/{epochs} epochs")
    return ", ".join(parts)


def epochs_of(config) -> int | None:
    """Epochs of a config, or of one channel's when each channel has its own (Continue)."""
    if isinstance(config, dict):
        return next(iter(config.values())).epochs if config else None
    return config.epochs


def describe_step(event: Progress, epochs: int | None = None,
                   channels: list[str] | None = None) -> str:
    """The status line of a training event: channel, epoch, loss, speed, step and ETA.

    Built from the event's numbers, each shown only when known: the first steps have no
    speed yet (NaN), which the line leaves out rather than reading "nan img/s". With
    ``channels`` (trained in turn), the ETA is the whole run's: the channels still to come
    are counted at the current channel's pace.
    """
    info = event.info
    if "loss" not in info:  # a start-up note
        return f"{event.message} (step {event.step}/{event.total})"
    of = f"/{epochs}" if epochs else ""
    parts = [f"{info.get('channel', '')} epoch {info.get('epoch', '?')}{of}".strip(),
             f"loss {_number(info['loss'], '.4f')}"]
    rate = info.get("images_per_s")
    if _finite(rate) and rate > 0:
        parts.append(f"{rate:.0f} img/s")
    eta, later = info.get("eta_s"), 0
    channels = list(channels or ())
    if info.get("channel") in channels:
        later = len(channels) - channels.index(info["channel"]) - 1
    if _finite(eta) and later and event.total > event.step:
        eta += later * eta * event.total / (event.total - event.step)
    whole = f" for all {len(channels)} channels" if later else ""
    eta_text = f", ETA {eta:.0f} s{whole}" if _finite(eta) else ""
    return f"{' '.join(parts)} (step {event.step}/{event.total}{eta_text})"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _number(value, fmt: str) -> str:
    return format(value, fmt) if _finite(value) else "–"
