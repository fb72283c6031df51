"""The training loop (DINO's ``train_one_epoch``): :func:`train` (one channel, a progress
generator), :func:`train_one_epoch`, one step, and :func:`train_channels`.

Importable from :mod:`napari_wsdino.core.train`, which loads this module (and torch) only
when one of its names is first used.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Generator, Iterable, Mapping

import torch

from napari_wsdino.core import distributed
from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.dino import ema_update
from napari_wsdino.core.fsio import first_missing_dir, output_lock, remove_empty_dirs
from napari_wsdino.core.layout import CHECKPOINT_FILE, channel_dir
from napari_wsdino.core.model import pick_device
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.train.checkpoint import _step_seed, end_epoch, last_good, write_checkpoint
from napari_wsdino.core.train.settings import N_GLOBAL, TrainConfig, TrainingError
from napari_wsdino.core.train.setup import TrainState, setup_run
from napari_wsdino.core.views import jitter_intensity, multi_crop


def train(
    cache: Cache | str | Path,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Generator[Progress, None, Path]:
    """Train one channel; yield progress after every step; return the checkpoint path.

    Parameters
    ----------
    cache
        A preprocessed cache (:func:`napari_wsdino.core.cache.open_cache`) or its folder.
    config
        All settings; ``config.channel`` picks the channel.
    out_dir
        Folder for ``checkpoint.pth``, ``config.toml`` and ``log.jsonl`` (created).
    resume
        Continue from ``out_dir/checkpoint.pth`` (if there is one). Without it an
        existing checkpoint is refused rather than overwritten.
    stop
        Called before every step; when it returns True the run writes a checkpoint and
        ends. Closing the generator does the same.

    Yields
    ------
    Progress
        ``stage="train"``, ``step``/``total`` in optimisation steps, ``info`` with epoch,
        step, loss, lr, teacher_temp, momentum, images_per_s, eta_s, channel.

    Raises
    ------
    TrainingError
        Non-finite loss (the last good checkpoint is kept), or a resume that does not
        match the run.
    OutputLockedError
        Another process is training into ``out_dir`` (:func:`~napari_wsdino.core.fsio.output_lock`).
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    try:
        device = pick_device(config.device)
    except RuntimeError as exc:
        raise TrainingError(str(exc)) from None
    info = distributed.setup(device.type)
    made = first_missing_dir(out)
    try:
        # One writer per channel folder: a second 'wsdino train --out' on it is refused
        # (naming the first) before it reads or writes anything there.
        with output_lock(out, "this run") if info.is_main else nullcontext():
            return (yield from _train(cache, config, out, ckpt_path, device, info, resume, stop))
    except BaseException:
        remove_empty_dirs(out, made)  # failed before writing (e.g. weights of another width)
        raise
    finally:
        distributed.teardown(info)



def _train(cache, config, out, ckpt_path, device, info, resume, stop):
    state = setup_run(cache, config, out, ckpt_path, device, info, resume)
    if state.step >= state.total:
        return ckpt_path
    state.student.train()
    state.teacher.train()
    meter = _Meter(state)
    try:
        while state.step < state.total:
            if (yield from train_one_epoch(state, meter, stop)):
                return write_checkpoint(state)
    except GeneratorExit:
        # Closed between steps (the GUI's quit): the state is consistent, keep it.
        write_checkpoint(state, finished=state.step >= state.total)
        raise
    return ckpt_path


def train_one_epoch(state: TrainState, meter: "_Meter", stop: Callable[[], bool] | None = None
                    ) -> Generator[Progress, None, bool]:
    """The rest of the current epoch, one :class:`Progress` event per step.

    Before every step ``stop()`` is asked (on every process: one request stops all);
    returns True when it stopped early. The epoch's log line, snapshot and checkpoint
    are written before its last step's event is yielded, so a generator closed at that
    yield finds the epoch complete.
    """
    spe = state.steps_per_epoch
    epoch = state.step // spe
    plan = state.sampler.epoch(epoch)
    meter.start_epoch()
    while state.step < state.total and state.step // spe == epoch:
        it = state.step % spe
        requested = bool(stop()) if stop is not None else False
        if distributed.any_rank(state.info, requested, state.device):
            return True
        lr, momentum, temp = state.sched.at(state.step)
        loss = _train_step(state, plan, it, lr, momentum, temp)
        state.step += 1
        state.epoch_loss += loss
        state.epoch_n += 1
        state.epoch_singletons += int(plan.singleton[it].sum())
        # Built now, yielded after the end-of-epoch work: a generator closed at this
        # yield must find the epoch logged, snapshotted and its totals reset.
        event = meter.step(loss, lr, temp, momentum)
        if state.step % spe == 0:
            record = meter.epoch_record(lr, temp, momentum)
            state.epoch_loss, state.epoch_n, state.epoch_singletons = 0.0, 0, 0
            end_epoch(state, record)
        yield event
    return False


def _train_step(state: TrainState, plan, it: int, lr: float, momentum: float,
                temp: float) -> float:
    """One optimisation step on batch ``it`` of ``plan``; returns the loss."""
    config, epoch = state.config, state.step // state.steps_per_epoch
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    seed = _step_seed(config.seed, state.step, state.info.rank)
    torch.manual_seed(seed)
    views = _views(state, plan, it, torch.Generator().manual_seed(seed))
    with state.autocast():
        with torch.no_grad():
            t_out = state.teacher(views[:N_GLOBAL])
        s_out = state.forward(views)
        loss = state.dino_loss(s_out, t_out, temp)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if epoch < config.freeze_last_layer:
        for p in state.last_layer:
            p.grad = None
    if config.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(state.student.parameters(), config.clip_grad)
    state.optimizer.step()
    ema_update(state.teacher, state.student, momentum)
    # Read the loss only now: the whole step is queued on the GPU before the host
    # waits. A non-finite loss poisons the weights in memory, which are then never
    # saved — the last checkpoint on disk stays the last good one.
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"Loss became {value} at epoch {epoch + 1}, step {state.step + 1} "
            f"(channel {config.channel}); {last_good(state)}. Check the cache for NaN/inf "
            "pixels and input normalisation, or lower --lr."
        )
    return value


def _views(state: TrainState, plan, it: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The multi-crop views of batch ``it``: global crops from the drawn fields, local
    crops from their partners (WS-DINO) or the same fields (DINO), normalised."""
    config = state.config
    global_rows = plan.global_rows[it]
    local_rows = plan.local_rows[it] if state.paired else global_rows
    xg = state.source.batch(global_rows)
    xl = state.source.batch(local_rows) if state.paired else xg
    views = multi_crop(
        xg, xl, n_global=N_GLOBAL, n_local=config.local_crops,
        global_size=config.global_size, local_size=config.local_size,
        global_scale=config.global_scale, local_scale=config.local_scale,
        flip_p=config.flip_p, generator=gen, rotate=config.rotate90,
        global_centres=state.centres(global_rows), local_centres=state.centres(local_rows),
    )
    views = jitter_intensity(views, config.intensity_jitter, gen)
    if config.input_mean != 0.0 or config.input_std != 1.0:
        views = [(v - config.input_mean) / config.input_std for v in views]
    return views


class _Meter:
    """Throughput, ETA and the events of one run (the first one carries the data summary)."""

    def __init__(self, state: TrainState):
        self.state = state
        summary = state.sampler.summary()
        self.first_info = {k: summary[k] for k in ("fields", "groups", "singleton_groups")}
        self.rate_t0, self.rate_steps, self.images_per_s = time.perf_counter(), 0, float("nan")
        self.run_t0, self.run_step0 = time.perf_counter(), state.step
        self.epoch_t0 = self.run_t0

    def start_epoch(self) -> None:
        self.epoch_t0 = time.perf_counter()

    def step(self, loss: float, lr: float, temp: float, momentum: float) -> Progress:
        """Count a step done; its progress event."""
        state, config = self.state, self.state.config
        step, total = state.step, state.total
        self.rate_steps += 1
        now = time.perf_counter()
        if now - self.rate_t0 > 0.5 or self.rate_steps >= 20:
            self.images_per_s = self.rate_steps * state.fields_per_step / (now - self.rate_t0)
            self.rate_t0, self.rate_steps = now, 0
        eta = (total - step) / ((step - self.run_step0) / max(now - self.run_t0, 1e-9))
        epoch = (step - 1) // state.steps_per_epoch + 1
        return Progress(
            "train", step, total,
            f"{config.channel} epoch {epoch}/{config.epochs} loss {loss:.4f} "
            f"{self.images_per_s:.0f} img/s eta {_hms(eta)}",
            {"channel": config.channel, "epoch": epoch, "step": step,
             "loss": loss, "lr": lr, "teacher_temp": temp, "momentum": momentum,
             "images_per_s": self.images_per_s, "eta_s": eta,
             **(self.first_info if step == self.run_step0 + 1 else {})},
        )

    def epoch_record(self, lr: float, temp: float, momentum: float) -> dict:
        """The log line of the epoch just finished."""
        state = self.state
        return {"epoch": state.step // state.steps_per_epoch, "step": state.step,
                "loss": state.epoch_loss / max(state.epoch_n, 1),
                "lr": lr, "teacher_temp": temp, "momentum": momentum,
                "images_per_s": state.epoch_n * state.fields_per_step
                / max(time.perf_counter() - self.epoch_t0, 1e-9),
                "singleton_draws": state.epoch_singletons, "time": time.time()}


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_channels(
    cache: Cache | str | Path,
    config: TrainConfig | Mapping[str, TrainConfig],
    run_dir: str | Path,
    channels: Iterable[str] | None = None,
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Generator[Progress, None, dict[str, Path]]:
    """One model per channel, in turn, each from the same initial weights.

    ``config`` is one config for every channel (its ``channel`` replaced), or one per
    channel, e.g. each resumed channel's own saved settings from :func:`resolve_config`.
    Writes ``run_dir/<channel>/{checkpoint.pth, config.toml, log.jsonl}`` and returns
    ``{channel: checkpoint path}``. Channels default to all the cache holds.

    Example
    -------
    >>> configs = {ch: resolve_config(None, {"epochs": 800, "channel": ch},
    ...                               resume_from=channel_dir("run", ch))
    ...            for ch in ("DAPI", "Actin")}                       # doctest: +SKIP
    >>> run_to_end(train_channels("cache/", configs, "run", resume=True))  # doctest: +SKIP
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    channels = list(channels or (config if isinstance(config, Mapping) else cache.channels))
    paths = {}
    for ch in channels:
        if stop is not None and stop():
            break
        one = config[ch] if isinstance(config, Mapping) else config.replace(channel=ch)
        if one.channel != ch:
            raise ValueError(f"The config given for channel {ch} trains {one.channel}; "
                             "give each channel its own config (channel = its name).")
        paths[ch] = yield from train(cache, one, channel_dir(run_dir, ch), resume=resume,
                                     stop=stop)
    return paths
