"""Checkpoints of a training run: atomic writes, the RNG state, resume and the epoch log.

A checkpoint holds everything to resume bit-for-bit on CPU: both networks, the optimiser,
the loss centre, every RNG, the step and the running epoch totals, the config and what
the data was (:func:`snapshot`). Writes are atomic (a full disk keeps the last one).
:func:`restore` loads one back after :func:`check_resume` has compared it with the
resumed run.

Example
-------
>>> from napari_wsdino.core.train.checkpoint import load_checkpoint
>>> load_checkpoint("run/DAPI/checkpoint.pth")["epoch"]        # doctest: +SKIP
400
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from napari_wsdino.core import distributed
from napari_wsdino.core.fsio import atomic_write, atomic_write_text
from napari_wsdino.core.layout import snapshot_path
from napari_wsdino.core.model import CHECKPOINT_FORMAT, CheckpointError, read_checkpoint
from napari_wsdino.core.train.settings import (
    TrainConfig,
    TrainingError,
    _differ_message,
    resume_conflicts,
)

CHECKPOINT_VERSION = 1


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file, flush it, then rename; on
    failure (a full disk) the temporary file is removed and the last checkpoint kept."""
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read one of our training checkpoints (weights only) and check its format."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a napari-wsdino training checkpoint; to start from other "
            "weights use it as --init."
        )
    return ckpt



# -- RNG ------------------------------------------------------------------------------
def _rng_state() -> dict:
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of one step: crops and drop-path depend on (seed, step, rank) only, so a
    resumed run draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the checkpoint (a crash after logging them)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _check_resume(ckpt, config, fingerprint, steps_per_epoch, path) -> None:
    # ``epochs`` may change: Continue training extends (or shortens) the run; the schedules
    # are then those of the new total, read from the current step on (docs/training.md).
    diff = resume_conflicts(TrainConfig.from_dict(ckpt["config"]), config)
    if diff:
        raise TrainingError(_differ_message(path, diff))
    if ckpt["data"]["fingerprint"] != fingerprint:
        raise TrainingError(
            f"Cannot resume {path}: the cache's fields, labels or pixels differ from the "
            "ones this run started on. Use the same cache, or start a new run folder."
        )
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise TrainingError(
            f"Cannot resume {path}: {ckpt['steps_per_epoch']} steps per epoch then, "
            f"{steps_per_epoch} now (different number of processes?)."
        )
    done = int(ckpt["step"]) // max(int(ckpt["steps_per_epoch"]), 1)
    if config.epochs * steps_per_epoch < int(ckpt["step"]):
        raise TrainingError(
            f"Cannot continue {path} with epochs = {config.epochs}: it has trained {done} "
            f"epochs already. Give --epochs {done} or more."
        )



# -- a run's checkpoints ----------------------------------------------------------------
def snapshot(state, finished: bool = False) -> dict:
    """Everything to resume ``state`` (a :class:`~napari_wsdino.core.train.setup.TrainState`)."""
    config, spe = state.config, state.steps_per_epoch
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "channel": config.channel,
        "weak_label": config.weak_label,
        "arch": config.arch,
        "embed_dim": int(state.student.backbone.num_features),
        "patch_size": state.patch,
        "epoch": state.step // spe,
        "step": state.step,
        "steps_per_epoch": spe,
        "finished": finished,
        "student": state.student.state_dict(),
        "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "dino_loss": {"center": state.dino_loss.center.detach().cpu()},
        "config": config.to_dict(),
        "rng": _rng_state(),
        "data": state.data_meta,
        "epoch_stats": {"loss_sum": state.epoch_loss, "n": state.epoch_n,
                        "singletons": state.epoch_singletons},
    }


def write_checkpoint(state, finished: bool = False) -> Path:
    """Save ``state`` (on the main process; every process waits for it) and return the path."""
    if state.info.is_main:
        save_checkpoint(snapshot(state, finished), state.ckpt_path)
    distributed.barrier(state.info)
    return state.ckpt_path


def restore(state) -> None:
    """Resume ``state`` from its checkpoint: weights, optimiser, centre, RNG, step and the
    epoch's running totals; log lines of epochs after the checkpoint are dropped."""
    ckpt = load_checkpoint(state.ckpt_path)
    _check_resume(ckpt, state.config, state.data_meta["fingerprint"], state.steps_per_epoch,
                  state.ckpt_path)
    state.student.load_state_dict(ckpt["student"])
    state.teacher.load_state_dict(ckpt["teacher"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.dino_loss.center.copy_(ckpt["dino_loss"]["center"].to(state.device))
    _set_rng_state(ckpt["rng"])
    state.step = int(ckpt["step"])
    stats = ckpt.get("epoch_stats", {})
    state.epoch_loss = float(stats.get("loss_sum", 0.0))
    state.epoch_n = int(stats.get("n", 0))
    state.epoch_singletons = int(stats.get("singletons", 0))
    if state.info.is_main:
        _truncate_log(state.log_path, state.step // state.steps_per_epoch)


def end_epoch(state, record: dict) -> None:
    """After an epoch: its log line and teacher snapshot (main process), then the
    checkpoint when one is due (every ``checkpoint_every`` epochs and at the end)."""
    config, done = state.config, record["epoch"]
    if state.info.is_main:
        with open(state.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if config.snapshot_every and done % config.snapshot_every == 0:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "channel": config.channel,
                             "epoch": done, "config": config.to_dict(),
                             "teacher": state.teacher.state_dict()},
                            snapshot_path(state.out, done))
    if done % config.checkpoint_every == 0 or done == config.epochs:
        write_checkpoint(state, finished=done == config.epochs)


def last_good(state) -> str:
    """Which checkpoint a failed run leaves, for its error message."""
    if not state.ckpt_path.exists():
        return "no checkpoint had been written yet"
    return (f"the last good checkpoint {state.ckpt_path} (step "
            f"{load_checkpoint(state.ckpt_path)['step']}) is kept")
