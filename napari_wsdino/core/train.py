"""Train DINO / WS-DINO on one channel of a preprocessed cache, as a progress generator.

The method is WS-DINO's (Cross-Zamirski et al. 2022, after DINO, Caron et al. 2021): a
timm ViT student with a DINO head, a teacher that is the EMA of the student, multi-crop
views where — with a weak label — the local crops come from another field of the same
label (:mod:`napari_wsdino.core.sampler`). Every default of :class:`TrainConfig` is the
paper's (or its published code's) value.

Engineering: :func:`train` is a generator of :class:`~napari_wsdino.core.progress.Progress`
events that stops cleanly between steps (``stop()`` returns True, or the generator is
closed) and leaves a loadable checkpoint; checkpoints are atomic and hold everything to
resume bit-for-bit on CPU; crops are cut for the whole batch on the device
(:mod:`napari_wsdino.core.views`); on CUDA the cache is kept on the GPU, with bf16
autocast, fused AdamW and PyTorch's fused attention; ``torchrun`` runs it on many GPUs
(:mod:`napari_wsdino.core.distributed`).

A run folder holds, per channel: ``checkpoint.pth``, ``config.toml`` and ``log.jsonl``.

Example
-------
>>> from napari_wsdino.core.train import TrainConfig, train
>>> from napari_wsdino.core.progress import run_to_end
>>> cfg = TrainConfig(arch="test_vit", epochs=2, global_size=32, local_size=16,
...                   out_dim=256, hidden_dim=64, weak_label="compound")
>>> path = run_to_end(train("cache/", cfg, "run/DAPI"))     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterable, Mapping, get_type_hints

import numpy as np
import torch

from napari_wsdino.core import distributed
from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.dino import CENTERINGS, DINOHead, DINOLoss, MultiCropWrapper, ema_update
from napari_wsdino.core.fsio import atomic_write, first_missing_dir, remove_empty_dirs
from napari_wsdino.core.layout import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE
from napari_wsdino.core.model import (
    CHECKPOINT_FORMAT,
    DEFAULT_ARCH,
    RANDOM_INIT,
    CheckpointError,
    create_backbone,
    dino_centre,
    dino_optimizer_state,
    head_state_dict,
    is_full_checkpoint,
    load_backbone_weights,
    pick_device,
    read_checkpoint,
)
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.sampler import (
    DEFAULT_WEAK_LABEL,
    DMSO_MODES,
    WEAK_LABELS,
    PairSampler,
    weak_labels,
)
from napari_wsdino.core.schedules import Schedules
from napari_wsdino.core.views import Centres, jitter_intensity, multi_crop

CHECKPOINT_VERSION = 1
N_GLOBAL = 2
# Settings that may differ between a run and its resumption (they do not change the maths).
#: Where crops are centred: anywhere (the paper) or on nuclei (cell-centred crops).
CROP_CENTRES = ("uniform", "nuclei")
INIT_PARTS = ("backbone", "full")
EPOCH_SPLITS = ("shard", "replicate")
RESUMABLE_CHANGES = {"device", "checkpoint_every", "snapshot_every", "preload", "compile"}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; defaults are WS-DINO's.

    Data: ``channel`` (one model per channel), ``weak_label`` (none = plain DINO,
    treatment, compound, moa, moa_or_compound), ``dmso`` (exclude = paper, plate,
    together), ``balance`` (weight fields by 1 / group size, the paper's sampler).

    Model: ``arch`` (any timm ViT; ViT-S/8), ``init`` (local weights file: ours, timm,
    or official DINO, e.g. ``dino_deitsmall8_pretrain.pth``; empty = random),
    ``drop_path_rate`` 0.1 on the student; head ``out_dim`` 65,536, ``hidden_dim`` 2048,
    ``bottleneck_dim`` 256, ``norm_last_layer`` False, no batch norm, last layer frozen
    for ``freeze_last_layer`` epochs.

    Loss: ``student_temp`` 0.07, ``teacher_temp`` 0.04 after a linear warm-up from
    ``warmup_teacher_temp`` over ``warmup_teacher_temp_epochs``, ``center_momentum`` 0.8
    (DINO: 0.1 / 0.9). Teacher EMA ``momentum_teacher`` 0.99 → 1 (cosine).

    Optimiser: AdamW, ``lr`` 4e-6 after ``warmup_epochs`` 10, cosine to ``min_lr``,
    ``weight_decay`` 0, ``clip_grad`` 0 (off), ``batch_size`` 16 (per process),
    ``epochs`` 400.

    Views: 2 global crops of ``global_size`` 224 px from ``global_scale`` (0.1, 0.2) of
    the area, ``local_crops`` 8 of ``local_size`` 96 px from ``local_scale``
    (0.04, 0.08), square, bicubic, flips with ``flip_p`` 0.5; inputs normalised as
    ``(x - input_mean) / input_std``.

    Run: ``seed``, ``checkpoint_every`` N epochs (and at the end), ``snapshot_every``
    (0 = off: teacher-only copies ``teacher_epochNNNN.pth`` for best-epoch studies),
    ``device`` (auto | cpu | cuda), ``precision`` (auto = bf16 on CUDA, fp32 on CPU),
    ``preload`` (auto = cache on the GPU when it fits), ``compile`` (torch.compile).

    Microscopy additions (off by default, on in the ``cpu`` demo preset; see
    docs/training.md): ``crop_centres`` (uniform = the paper; nuclei = every crop centred
    on a nucleus of ``nuclei_channel``, found by Otsu), ``rotate90`` (random quarter
    turns), ``intensity_jitter`` (per-view gain ``exp(N(0, s))`` and offset),
    ``teacher_centering`` (centre = DINO's EMA centre; sinkhorn = DINOv2's Sinkhorn-Knopp
    targets, which cannot collapse).
    """

    channel: str = "DAPI"
    weak_label: str = DEFAULT_WEAK_LABEL
    dmso: str = "exclude"
    balance: bool = True
    arch: str = DEFAULT_ARCH
    init: str = ""
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False
    freeze_last_layer: int = 1
    student_temp: float = 0.07
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.8
    momentum_teacher: float = 0.99
    lr: float = 4e-6
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.0
    clip_grad: float = 0.0
    batch_size: int = 16
    epochs: int = 400
    local_crops: int = 8
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.1, 0.2)
    local_scale: tuple[float, float] = (0.04, 0.08)
    flip_p: float = 0.5
    input_mean: float = 0.0
    input_std: float = 1.0
    seed: int = 0
    checkpoint_every: int = 10
    snapshot_every: int = 0
    device: str = "auto"
    precision: str = "auto"
    preload: str = "auto"
    compile: bool = False
    crop_centres: str = "uniform"
    nuclei_channel: str = "DAPI"
    rotate90: bool = False
    intensity_jitter: float = 0.0
    teacher_centering: str = "centre"
    # What a full checkpoint given as init fills: "backbone" (its teacher backbone, and head
    # when it fits, into both nets) or "full" (DINO's restart_from_checkpoint: student,
    # teacher, heads, loss centre and optimiser state each where it was saved).
    init_parts: str = "backbone"
    # Multi-GPU epochs: "shard" (each process a share of the fields) or "replicate" (each
    # process draws the whole dataset, as WS-DINO's sampler without DistributedSampler).
    epoch_split: str = "shard"

    def __post_init__(self):
        problems = []
        if self.weak_label not in WEAK_LABELS:
            problems.append(f"weak_label must be one of {', '.join(WEAK_LABELS)}")
        if self.dmso not in DMSO_MODES:
            problems.append(f"dmso must be one of {', '.join(DMSO_MODES)}")
        for name in ("epochs", "batch_size", "global_size", "local_size", "out_dim",
                     "hidden_dim", "bottleneck_dim", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("local_crops", "warmup_epochs", "warmup_teacher_temp_epochs",
                     "freeze_last_layer", "snapshot_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                problems.append(f"{name} must satisfy 0 < low <= high <= 1")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "input_std"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive")
        for name in ("center_momentum", "momentum_teacher", "flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must lie in [0, 1]")
        if self.crop_centres not in CROP_CENTRES:
            problems.append(f"crop_centres must be one of {', '.join(CROP_CENTRES)}")
        if self.teacher_centering not in CENTERINGS:
            problems.append(f"teacher_centering must be one of {', '.join(CENTERINGS)}")
        if self.intensity_jitter < 0:
            problems.append("intensity_jitter must be 0 or more")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append("precision must be auto, fp32 or bf16")
        if self.init_parts not in INIT_PARTS:
            problems.append(f"init_parts must be one of {', '.join(INIT_PARTS)}")
        if self.epoch_split not in EPOCH_SPLITS:
            problems.append(f"epoch_split must be one of {', '.join(EPOCH_SPLITS)}")
        if self.preload not in ("auto", "device", "memmap"):
            problems.append("preload must be auto, device or memmap")
        if problems:
            raise ValueError("Invalid training config: " + "; ".join(problems) + ".")

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping (e.g. a parsed TOML file); unknown keys are refused."""
        values = dict(values.get("train", values))
        hints = get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(
                f"Unknown training settings {unknown}; known are: {', '.join(sorted(hints))}."
            )
        out = {}
        for key, value in values.items():
            kind = hints[key]
            if kind is float:
                value = float(value)
            elif kind is int and not isinstance(value, bool):
                value = int(value)
            elif kind is bool:
                value = _as_bool(key, value)
            elif kind is str:
                value = "" if value is None else str(value)
            else:  # tuple[float, float]
                value = tuple(float(v) for v in value)
                if len(value) != 2:
                    raise ValueError(f"{key} needs two numbers (low, high).")
            out[key] = value
        return cls(**out)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        """The config as a TOML document (a ``[train]`` table)."""
        lines = ["# napari-wsdino training config", "[train]"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        _atomic_write_text(path, self.to_toml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a TOML (or, when PyYAML is installed, YAML) config file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError("Reading YAML configs needs PyYAML; use a .toml file.") from None
            values = yaml.safe_load(text) or {}
        else:
            try:
                values = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(values)


def config_file_values(path: str | Path) -> dict:
    """The settings a config file names, validated (every field for a YAML file)."""
    loaded = TrainConfig.load(path).to_dict()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        return loaded
    raw = tomllib.loads(Path(path).read_text())
    return {k: loaded[k] for k in raw.get("train", raw)}


def resume_conflicts(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """Settings of ``config`` a resume of a run trained with ``saved`` may not change.

    ``epochs`` may change (Continue training extends or shortens a run), and so may
    :data:`RESUMABLE_CHANGES`, which do not change the maths.
    """
    old, new = saved.to_dict(), config.to_dict()
    return [k for k, v in new.items() if k not in RESUMABLE_CHANGES | {"epochs"} and old[k] != v]


def resolve_config(
    base: TrainConfig | str | Path | None = None,
    overrides: Mapping | None = None,
    *,
    resume_from: str | Path | None = None,
    recipe: str = "default",
) -> TrainConfig:
    """The settings of one channel's run: the one merge rule of the CLI and the panels.

    Layers, lowest first: the ``recipe``'s defaults; ``base`` — a :class:`TrainConfig`
    (all of it) or a TOML / YAML file (the keys it names) — or, when there is no base and
    ``resume_from`` holds a saved ``config.toml``, that saved config (all of it);
    then ``overrides`` (the options given, ``--set`` pairs, widget values).

    Resume rule: when ``resume_from`` (one channel's run folder) holds a checkpoint and a
    ``config.toml``, the result may differ from the saved config only in ``epochs`` and
    :data:`RESUMABLE_CHANGES`; anything else is refused here, before any work, with the
    message :func:`train` would give.

    Parameters
    ----------
    base
        Settings under the overrides; ``None``: the saved config when resuming, else
        the recipe's defaults.
    overrides
        TrainConfig fields to set, e.g. ``{"epochs": 20, "channel": "Actin"}``.
    resume_from
        The channel folder (``run/<channel>``, :func:`napari_wsdino.core.layout.channel_dir`)
        to resume; ``None`` for a new run.
    recipe
        :mod:`napari_wsdino.core.recipes` name whose training defaults are the bottom layer.

    Raises
    ------
    ValueError
        An unknown or invalid setting (the message names it).
    TrainingError
        A resume that changes a setting the run was trained with.

    Example
    -------
    >>> resolve_config(overrides={"epochs": 3}).epochs
    3
    >>> resolve_config(None, {"epochs": 800}, resume_from="run/DAPI")  # doctest: +SKIP
    TrainConfig(... epochs=800 ...)                 # the run's saved settings, 800 epochs
    """
    from napari_wsdino.core.recipes import train_defaults  # recipes imports this module

    saved = None
    if resume_from is not None and (Path(resume_from) / CONFIG_FILE).exists():
        saved = TrainConfig.load(Path(resume_from) / CONFIG_FILE)
    values = train_defaults(recipe)
    if isinstance(base, TrainConfig):
        values = base.to_dict()
    elif base is not None and str(base).strip():
        values.update(config_file_values(base))
    elif saved is not None:
        values = saved.to_dict()
    values.update(overrides or {})
    config = TrainConfig.from_dict(values)
    if saved is not None and (Path(resume_from) / CHECKPOINT_FILE).exists():
        conflicts = resume_conflicts(saved, config)
        if conflicts:
            raise TrainingError(_differ_message(Path(resume_from) / CHECKPOINT_FILE, conflicts))
    return config


def _differ_message(path, diff) -> str:
    return (f"Cannot resume {path}: settings differ from the run's ({', '.join(diff)}). "
            "Resume with the saved config.toml, or start a new run folder.")


def _as_bool(key, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"{key} must be true or false, not {value!r}.")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings


# -- files ----------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# -- models ---------------------------------------------------------------------------
def build_models(config: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights; the teacher without drop-path, frozen).

    Weights come from ``torch.manual_seed(config.seed)``, then ``config.init`` if set
    (``"random"``: none), so every channel of a run starts from the same initial weights.
    With ``init_parts="full"`` and a full checkpoint, the student and the teacher each
    get their own saved backbone and head (the heads must fit).
    """
    torch.manual_seed(config.seed)
    backbone = create_backbone(config.arch, in_chans=1, drop_path_rate=config.drop_path_rate)
    embed_dim = backbone.num_features
    head = DINOHead(embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                    use_bn=False, norm_last_layer=config.norm_last_layer)
    student = MultiCropWrapper(backbone, head)
    teacher = MultiCropWrapper(
        create_backbone(config.arch, in_chans=1, drop_path_rate=0.0),
        DINOHead(embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                 use_bn=False, norm_last_layer=config.norm_last_layer),
    )
    init = read_checkpoint(config.init) if config.init not in ("", RANDOM_INIT) else None
    full = init is not None and config.init_parts == "full" and is_full_checkpoint(init)
    if init is not None:
        which = "student" if full else "teacher"
        load_backbone_weights(student.backbone, init, which=which)
        _maybe_load_head(student.head, init, which, strict=full)
    teacher.load_state_dict(student.state_dict())
    if full:
        load_backbone_weights(teacher.backbone, init, which="teacher")
        _maybe_load_head(teacher.head, init, "teacher", strict=True)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def _maybe_load_head(head: DINOHead, ckpt: dict, which: str = "teacher",
                     strict: bool = False) -> bool:
    """Load a DINO head from a full (ours / official) checkpoint when its shape fits
    (``strict``: a head that does not fit is an error naming both shapes)."""
    found = head_state_dict(ckpt, which)
    target = head.state_dict()
    if set(found) != set(target) or any(found[k].shape != target[k].shape for k in target):
        if strict:
            theirs = {k: list(v.shape) for k, v in found.items() if "last_layer" in k}
            ours = {k: list(v.shape) for k, v in target.items() if "last_layer" in k}
            raise CheckpointError(
                f"The {which} head in the checkpoint does not fit: its last layer is {theirs}, "
                f"this config's is {ours}. Set out_dim / hidden_dim / bottleneck_dim to the "
                "checkpoint's (65536 / 2048 / 256 for DINO ViT-S/8)."
            )
        return False
    head.load_state_dict(found)
    return True


def _load_init_state(config, student, optimizer, dino_loss) -> None:
    """The rest of DINO's restart_from_checkpoint: loss centre and optimiser state of a
    full init checkpoint (its epoch counter is not taken: training starts at epoch 0)."""
    if config.init in ("", RANDOM_INIT):
        return
    init = read_checkpoint(config.init)
    centre = dino_centre(init)
    if centre is not None:
        if tuple(centre.shape) != tuple(dino_loss.center.shape):
            raise CheckpointError(f"The checkpoint's DINO centre is {list(centre.shape)}, this "
                                  f"config's {list(dino_loss.center.shape)}; set out_dim to match.")
        dino_loss.center.copy_(centre.to(dino_loss.center))
    names = {id(p): n for n, p in student.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = dino_optimizer_state(init, optimizer, order)
    if state is not None:
        optimizer.load_state_dict(state)


def _patch_size(backbone) -> int:
    ps = backbone.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


# -- data -----------------------------------------------------------------------------
class FieldSource:
    """Fields of one channel as ``(B, 1, H, W)`` float32 batches on the device.

    With ``preload="device"`` (or ``"auto"`` on CUDA when they fit) the fields used are
    copied once to the device as float16 — 2,528 fields of 512 x 640 take 1.7 GB — so a
    batch is a gather there. Otherwise batches are read from the memory-mapped cache.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, device: torch.device, preload: str):
        self.images, self.device = images, device
        self.lookup = None
        rows = np.unique(rows)
        nbytes = len(rows) * int(np.prod(images.shape[1:])) * 2
        resident = preload == "device" or (
            preload == "auto" and device.type == "cuda"
            and nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]
        )
        if resident:
            self.lookup = np.full(images.shape[0], -1, dtype=np.int64)
            self.lookup[rows] = np.arange(len(rows))
            self.data = torch.empty((len(rows), *images.shape[1:]), dtype=torch.float16,
                                    device=device)
            for s in range(0, len(rows), 256):  # chunked: never the whole cache in host RAM
                chunk = np.asarray(images[rows[s:s + 256]], dtype=np.float16)
                self.data[s:s + len(chunk)] = torch.from_numpy(chunk).to(device)

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        if self.lookup is not None:
            idx = torch.from_numpy(self.lookup[rows]).to(self.device)
            return self.data.index_select(0, idx).float().unsqueeze(1)
        # float16 -> float32 in torch: several times faster than NumPy's cast.
        x = torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(rows)])).float()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True).unsqueeze(1)
        return x.unsqueeze(1)


def dataset_fingerprint(cache: Cache, channel: str, labels) -> str:
    """SHA-256 over the cache settings, the fields and labels used, and sample pixels."""
    h = hashlib.sha256()
    h.update(json.dumps(cache.settings, sort_keys=True, default=str).encode())
    h.update(channel.encode())
    rows = labels.index.to_numpy()
    cols = [c for c in ("plate", "well", "site") if c in cache.table]
    h.update(cache.table.iloc[rows][cols].to_csv(index=False).encode())
    h.update("\n".join(map(str, labels.to_numpy())).encode())
    images = cache.images(channel)
    probe = np.linspace(0, images.shape[0] - 1, num=min(4, images.shape[0])).astype(int)
    h.update(np.ascontiguousarray(images[probe]).tobytes())
    return h.hexdigest()


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


# -- training -------------------------------------------------------------------------
def _params_groups(model: torch.nn.Module):
    """DINO's groups: no weight decay on biases and norms."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


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
        return (yield from _train(cache, config, out, ckpt_path, device, info, resume, stop))
    except BaseException:
        remove_empty_dirs(out, made)  # failed before writing (e.g. weights of another width)
        raise
    finally:
        distributed.teardown(info)


def _train(cache, config, out, ckpt_path, device, info, resume, stop):
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if ckpt_path.exists() and not resume:
        raise FileExistsError(
            f"{ckpt_path} exists: resume it (--resume) or choose another output folder."
        )
    images = cache.images(config.channel)
    labels = weak_labels(cache.table, config.weak_label, config.dmso)
    paired = config.weak_label != "none"
    # "replicate": every process draws the whole epoch, as WS-DINO's WeightedRandomSampler.
    shard = config.epoch_split == "shard"
    sampler = PairSampler(labels, config.batch_size, pair=paired,
                          balance=paired and config.balance, seed=config.seed,
                          rank=info.rank if shard else 0,
                          world_size=info.world_size if shard else 1)
    fingerprint = dataset_fingerprint(cache, config.channel, labels)

    student, teacher = build_models(config)
    patch = _patch_size(student.backbone)
    for name in ("global_size", "local_size"):
        if getattr(config, name) % patch:
            raise ValueError(f"{name} = {getattr(config, name)} is not a multiple of the "
                             f"{config.arch} patch size {patch}.")
    if min(cache.shape) < config.global_size // 2:
        raise ValueError(f"Cache fields of {cache.shape} px are too small for "
                         f"{config.global_size} px global crops.")
    student.to(device)
    teacher.to(device)
    dino_loss = DINOLoss(config.out_dim, N_GLOBAL + config.local_crops, N_GLOBAL,
                         config.student_temp, config.center_momentum,
                         config.teacher_centering).to(device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(_params_groups(student), lr=0.0,
                                  weight_decay=config.weight_decay, fused=cuda)
    steps_per_epoch = sampler.steps_per_epoch
    total = config.epochs * steps_per_epoch
    sched = Schedules.from_config(config, steps_per_epoch)
    if config.init_parts == "full" and not (resume and ckpt_path.exists()):
        _load_init_state(config, student, optimizer, dino_loss)

    step, epoch_loss, epoch_n, epoch_singletons = 0, 0.0, 0, 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(ckpt, config, fingerprint, steps_per_epoch, ckpt_path)
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        dino_loss.center.copy_(ckpt["dino_loss"]["center"].to(device))
        _set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        stats = ckpt.get("epoch_stats", {})
        epoch_loss = float(stats.get("loss_sum", 0.0))
        epoch_n = int(stats.get("n", 0))
        epoch_singletons = int(stats.get("singletons", 0))
        if info.is_main:
            _truncate_log(out / LOG_FILE, step // steps_per_epoch)
    if info.is_main:
        config.save(out / CONFIG_FILE)
        if step == 0:  # a fresh start: no lines from an earlier attempt that never checkpointed
            (out / LOG_FILE).unlink(missing_ok=True)

    model = student
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if cuda else None)
    forward = torch.compile(model) if config.compile else model
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    source = FieldSource(images, labels.index.to_numpy(), device, config.preload)
    centres = _crop_centres(cache, config, labels.index.to_numpy())
    last_layer = list(student.head.last_layer.parameters())
    data_meta = {"channel": config.channel, "weak_label": config.weak_label,
                 "dmso": config.dmso, "fingerprint": fingerprint, **sampler.summary()}
    if isinstance(cache.settings.get("dataset_id"), dict):  # which dataset, for the panels
        data_meta["dataset_id"] = cache.settings["dataset_id"]
    fields_per_step = config.batch_size * info.world_size

    def snapshot(finished: bool) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "channel": config.channel,
            "weak_label": config.weak_label,
            "arch": config.arch,
            "embed_dim": int(student.backbone.num_features),
            "patch_size": patch,
            "epoch": step // steps_per_epoch,
            "step": step,
            "steps_per_epoch": steps_per_epoch,
            "finished": finished,
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "dino_loss": {"center": dino_loss.center.detach().cpu()},
            "config": config.to_dict(),
            "rng": _rng_state(),
            "data": data_meta,
            "epoch_stats": {"loss_sum": epoch_loss, "n": epoch_n, "singletons": epoch_singletons},
        }

    def write(finished: bool = False) -> Path:
        if info.is_main:
            save_checkpoint(snapshot(finished), ckpt_path)
        distributed.barrier(info)
        return ckpt_path

    if step >= total:
        return ckpt_path
    student.train()
    teacher.train()
    rate_t0, rate_steps, images_per_s = time.perf_counter(), 0, float("nan")
    run_t0, run_step0 = time.perf_counter(), step
    summary = sampler.summary()  # reported with the first step's event
    first_info = {k: summary[k] for k in ("fields", "groups", "singleton_groups")}
    plan_epoch, plan = -1, None
    try:
        while step < total:
            epoch, it = divmod(step, steps_per_epoch)
            if plan_epoch != epoch:
                plan, plan_epoch = sampler.epoch(epoch), epoch
                epoch_t0 = time.perf_counter()
            requested = bool(stop()) if stop is not None else False
            if distributed.any_rank(info, requested, device):
                return write()
            lr, momentum, temp = sched.at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed = _step_seed(config.seed, step, info.rank)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            xg = source.batch(plan.global_rows[it])
            xl = source.batch(plan.local_rows[it]) if paired else xg
            views = multi_crop(
                xg, xl, n_global=N_GLOBAL, n_local=config.local_crops,
                global_size=config.global_size, local_size=config.local_size,
                global_scale=config.global_scale, local_scale=config.local_scale,
                flip_p=config.flip_p, generator=gen, rotate=config.rotate90,
                global_centres=centres(plan.global_rows[it]),
                local_centres=centres(plan.local_rows[it] if paired else plan.global_rows[it]),
            )
            views = jitter_intensity(views, config.intensity_jitter, gen)
            if config.input_mean != 0.0 or config.input_std != 1.0:
                views = [(v - config.input_mean) / config.input_std for v in views]
            with autocast():
                with torch.no_grad():
                    t_out = teacher(views[:N_GLOBAL])
                s_out = forward(views)
                loss = dino_loss(s_out, t_out, temp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch < config.freeze_last_layer:
                for p in last_layer:
                    p.grad = None
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip_grad)
            optimizer.step()
            ema_update(teacher, student, momentum)
            # Read the loss only now: the whole step is queued on the GPU before the host
            # waits. A non-finite loss poisons the weights in memory, which are then never
            # saved — the last checkpoint on disk stays the last good one.
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint {ckpt_path} (step "
                        f"{load_checkpoint(ckpt_path)['step']}) is kept"
                        if ckpt_path.exists() else "no checkpoint had been written yet")
                raise TrainingError(
                    f"Loss became {loss_value} at epoch {epoch + 1}, step {step + 1} "
                    f"(channel {config.channel}); {kept}. Check the cache for NaN/inf pixels "
                    "and input normalisation, or lower --lr."
                )
            step += 1
            epoch_loss += loss_value
            epoch_n += 1
            epoch_singletons += int(plan.singleton[it].sum())
            rate_steps += 1
            now = time.perf_counter()
            if now - rate_t0 > 0.5 or rate_steps >= 20:
                images_per_s = rate_steps * fields_per_step / (now - rate_t0)
                rate_t0, rate_steps = now, 0
            run_rate = (step - run_step0) / max(now - run_t0, 1e-9)
            eta = (total - step) / run_rate
            # Built now, yielded after the end-of-epoch work: a generator closed at this
            # yield must find the epoch logged, snapshotted and its totals reset.
            event = Progress(
                "train", step, total,
                f"{config.channel} epoch {epoch + 1}/{config.epochs} loss {loss_value:.4f} "
                f"{images_per_s:.0f} img/s eta {_hms(eta)}",
                {"channel": config.channel, "epoch": epoch + 1, "step": step,
                 "loss": loss_value, "lr": lr, "teacher_temp": temp, "momentum": momentum,
                 "images_per_s": images_per_s, "eta_s": eta,
                 **(first_info if step == run_step0 + 1 else {})},
            )
            if step % steps_per_epoch == 0:
                done = step // steps_per_epoch
                record = {"epoch": done, "step": step, "loss": epoch_loss / max(epoch_n, 1),
                          "lr": lr, "teacher_temp": temp, "momentum": momentum,
                          "images_per_s": epoch_n * fields_per_step
                          / max(time.perf_counter() - epoch_t0, 1e-9),
                          "singleton_draws": epoch_singletons, "time": time.time()}
                epoch_loss, epoch_n, epoch_singletons = 0.0, 0, 0
                if info.is_main:
                    with open(out / LOG_FILE, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                    if config.snapshot_every and done % config.snapshot_every == 0:
                        save_checkpoint({"format": CHECKPOINT_FORMAT, "channel": config.channel,
                                         "epoch": done, "config": config.to_dict(),
                                         "teacher": teacher.state_dict()},
                                        out / f"teacher_epoch{done:04d}.pth")
                if done % config.checkpoint_every == 0 or done == config.epochs:
                    write(finished=done == config.epochs)
            yield event
    except GeneratorExit:
        # Closed between steps (the GUI's quit): the state is consistent, keep it.
        write(finished=step >= total)
        raise
    return ckpt_path


def _crop_centres(cache: Cache, config: TrainConfig, rows: np.ndarray):
    """``rows -> Centres | None``: nuclei of the fields used, found once per run."""
    if config.crop_centres == "uniform":
        return lambda batch_rows: None
    from napari_wsdino.core.nuclei import nuclei_centres

    if config.nuclei_channel not in cache.channels:
        raise TrainingError(
            f"crop_centres = nuclei needs the nuclear stain {config.nuclei_channel!r}, which "
            f"this cache lacks (it has {', '.join(cache.channels)}). Set nuclei_channel to "
            "your DNA channel, or crop_centres = uniform.")
    rows = np.unique(rows)
    yx, count = nuclei_centres(cache.images(config.nuclei_channel), rows)
    lookup = np.full(len(cache.table), -1, dtype=np.int64)
    lookup[rows] = np.arange(len(rows))
    yx_t, count_t = torch.from_numpy(yx), torch.from_numpy(count)

    def centres(batch_rows) -> Centres:
        idx = torch.from_numpy(lookup[np.asarray(batch_rows)])
        return Centres(yx_t[idx], count_t[idx])

    return centres


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the checkpoint (a crash after logging them)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


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


def describe_data(cache: Cache | str | Path, config: TrainConfig) -> dict:
    """What a run would train on: fields, weak-label groups, singleton groups, steps.

    Example
    -------
    >>> describe_data("cache/", TrainConfig(weak_label="compound"))   # doctest: +SKIP
    {'fields': 2528, 'groups': 38, 'singleton_groups': [], 'paired': True, ...}
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    labels = weak_labels(cache.table, config.weak_label, config.dmso)
    paired = config.weak_label != "none"
    sampler = PairSampler(labels, config.batch_size, pair=paired,
                          balance=paired and config.balance, seed=config.seed,
                          world_size=distributed.env_world_size()
                          if config.epoch_split == "shard" else 1)
    return sampler.summary()


def train_channels(
    cache: Cache | str | Path,
    config: TrainConfig,
    run_dir: str | Path,
    channels: Iterable[str] | None = None,
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Generator[Progress, None, dict[str, Path]]:
    """One model per channel, in turn, each from the same initial weights.

    Writes ``run_dir/<channel>/{checkpoint.pth, config.toml, log.jsonl}`` and returns
    ``{channel: checkpoint path}``. Channels default to all the cache holds.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    channels = list(channels or cache.channels)
    paths = {}
    for ch in channels:
        if stop is not None and stop():
            break
        paths[ch] = yield from train(cache, config.replace(channel=ch), Path(run_dir) / ch,
                                     resume=resume, stop=stop)
    return paths
