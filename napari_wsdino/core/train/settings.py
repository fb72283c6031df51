"""Training settings: :class:`TrainConfig`, its TOML I/O, the choice lists, and the merge rule.

Every default, choice list and range of a training run is written here once; the CLI's
options and the Train panel read them. :func:`resolve_config` layers a recipe's defaults,
a base config (or a run's saved one when resuming) and explicit overrides, and applies
the resume rule: a resumed run may change only its length and settings that do not
change the maths (:data:`RESUMABLE_CHANGES`).

Example
-------
>>> from napari_wsdino.core.train.settings import TrainConfig
>>> TrainConfig(epochs=3).replace(lr=1e-3).to_toml().splitlines()[1]
'[train]'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, get_type_hints

from napari_wsdino.core.dino import CENTERINGS
from napari_wsdino.core.errors import DataError
from napari_wsdino.core.fsio import atomic_write
from napari_wsdino.core.layout import CHECKPOINT_FILE, CONFIG_FILE
from napari_wsdino.core.model import DEFAULT_ARCH
from napari_wsdino.core.sampler import DEFAULT_WEAK_LABEL, DMSO_MODES, WEAK_LABELS

#: Global crops per view set (DINO's two).
N_GLOBAL = 2
#: Where crops are centred: anywhere (the paper) or on nuclei (cell-centred crops).
CROP_CENTRES = ("uniform", "nuclei")
INIT_PARTS = ("backbone", "full")
EPOCH_SPLITS = ("shard", "replicate")
#: How the position embedding meets crops of another size (core.model.POS_EMBED_MODES).
POS_EMBEDS = ("timm", "dino")
#: Devices offered (any torch device name, e.g. ``cuda:1``, is accepted).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
PRELOADS = ("auto", "device", "memmap")
# Settings that may differ between a run and its resumption (they do not change the maths).
RESUMABLE_CHANGES = {"device", "checkpoint_every", "snapshot_every", "preload", "compile"}
#: Channel settings where an empty value means the cache's first channel (the DNA stain:
#: DAPI in BBBC021, DNA in Cell Painting), filled in by :func:`with_cache_channels`.
CACHE_CHANNEL_FIELDS = ("channel", "nuclei_channel")


#: The longest run accepted: a longer one would not end (and its learning-rate schedule,
#: one float per step, would not fit in memory).
MAX_EPOCHS = 100_000
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class SettingError(DataError):
    """Training settings that cannot be used, found before any work starts.

    ``problems`` holds ``(keys, what is wrong)`` pairs; :meth:`with_sources` adds where
    each key was set (``--lr``, ``--set lr``, ``config file run.toml``), so that the one-line
    message names the key, its value, the rule and the place to fix it.
    """

    def __init__(self, problems, prefix: str = "Invalid training config: "):
        self.problems = [((k,) if isinstance(k, str) else tuple(k), text) for k, text in problems]
        self.prefix = prefix
        super().__init__(prefix + "; ".join(t for _, t in self.problems) + ".")

    def with_sources(self, sources: Mapping[str, str], default: str = "") -> "SettingError":
        """The same problems, each followed by ``(from WHERE)`` of its keys."""
        out = []
        for keys, text in self.problems:
            where = ", ".join(dict.fromkeys(w for w in (sources.get(k, default) for k in keys) if w))
            out.append((keys, f"{text} (from {where})" if where else text))
        return SettingError(out, self.prefix)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; defaults are WS-DINO's.

    Data: ``channel`` (one model per channel; empty = the cache's first channel, the DNA
    stain in BBBC021 and Cell Painting alike, resolved by :func:`with_cache_channels`
    where the cache is known), ``weak_label`` (none = plain DINO,
    treatment, compound, moa, moa_or_compound), ``dmso`` (exclude = paper, plate,
    together), ``balance`` (weight fields by 1 / group size, the paper's sampler).

    Model: ``arch`` (any timm ViT; ViT-S/8), ``init`` (local weights file: ours, timm,
    or official DINO, e.g. ``dino_deitsmall8_pretrain.pth``, or a bundled name such as
    ``replica-dino-pico8-cells``, :mod:`~napari_wsdino.core.pretrained`; empty = random),
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
    ``(x - input_mean) / input_std``. ``pos_embed``: how the position embedding meets the
    96 px crops (timm = timm's antialiased resize; dino = DINO's ``interpolate_pos_encoding``,
    the official code's, under ``paper-code``).

    Run: ``seed``, ``checkpoint_every`` N epochs (and at the end), ``snapshot_every``
    (0 = off: teacher-only copies ``teacher_epochNNNN.pth`` for best-epoch studies),
    ``device`` (auto | cpu | cuda), ``precision`` (auto = bf16 on CUDA, fp32 on CPU),
    ``preload`` (auto = cache on the GPU when it fits), ``compile`` (torch.compile).

    Microscopy additions (off by default, on in the ``cpu`` demo preset; see
    docs/training.md): ``crop_centres`` (uniform = the paper; nuclei = every crop centred
    on a nucleus of ``nuclei_channel``, found by Otsu; empty = the cache's first channel), ``rotate90`` (random quarter
    turns), ``intensity_jitter`` (per-view gain ``exp(N(0, s))`` and offset),
    ``teacher_centering`` (centre = DINO's EMA centre; sinkhorn = DINOv2's Sinkhorn-Knopp
    targets, which cannot collapse).
    """

    channel: str = ""
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
    nuclei_channel: str = ""
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
    # Position embedding at other crop sizes: "timm" (antialiased resize) or "dino" (DINO's
    # interpolate_pos_encoding, as the official code).
    pos_embed: str = "timm"

    def __post_init__(self):
        problems = _type_problems(self)
        if not problems:  # ranges are only read on values of the right type
            problems = _value_problems(self)
        if problems:
            raise SettingError(problems)

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping (e.g. a parsed TOML file); unknown keys are refused."""
        return cls(**_convert(values))

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
        try:
            return cls.from_dict(values)
        except SettingError as exc:
            raise exc.with_sources({}, f"config file {path}") from None


def config_file_values(path: str | Path) -> dict:
    """The settings a config file names, of the right types (every field for a YAML
    file); ranges and orderings are checked on the merged settings (a file may set
    ``min_lr`` that only an ``--lr`` on top makes valid)."""
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        return TrainConfig.load(path).to_dict()
    if not Path(path).exists():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        raw = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    try:
        return _convert(raw)
    except SettingError as exc:
        raise exc.with_sources({}, f"config file {path}") from None


def with_cache_channels(config: TrainConfig, channels) -> TrainConfig:
    """``config`` with its empty :data:`CACHE_CHANNEL_FIELDS` set to the first of the
    cache's ``channels`` (the DNA stain in both registered layouts); named channels stay.

    Example
    -------
    >>> with_cache_channels(TrainConfig(), ("DNA", "ER", "RNA", "AGP", "Mito")).nuclei_channel
    'DNA'
    >>> with_cache_channels(TrainConfig(channel="Actin"), ("DAPI", "Tubulin", "Actin")).channel
    'Actin'
    """
    channels = list(channels)
    if not channels:
        raise ValueError("The cache holds no channels.")
    empty = {k: channels[0] for k in CACHE_CHANNEL_FIELDS if not getattr(config, k)}
    return config.replace(**empty) if empty else config


def resume_conflicts(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """Settings of ``config`` a resume of a run trained with ``saved`` may not change.

    ``epochs`` may change (Continue training extends or shortens a run), and so may
    :data:`RESUMABLE_CHANGES`, which do not change the maths. An empty channel setting
    (:data:`CACHE_CHANNEL_FIELDS`: "the cache's first") on either side is not a change:
    a run saves the name it resolved it to, and configs of older runs may lack it.
    """
    old, new = saved.to_dict(), config.to_dict()
    return [k for k, v in new.items() if k not in RESUMABLE_CHANGES | {"epochs"} and old[k] != v
            and not (k in CACHE_CHANNEL_FIELDS and "" in (old[k], v))]


def resolve_config(
    base: TrainConfig | str | Path | None = None,
    overrides: Mapping | None = None,
    *,
    resume_from: str | Path | None = None,
    recipe: str = "default",
    sources: Mapping[str, str] | None = None,
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
    sources
        Where each override came from (``{"lr": "--lr", "seed": "--set seed"}``), for the
        message that refuses an invalid value; unnamed ones read "the given settings".

    Raises
    ------
    SettingError
        An unknown or invalid setting, of any layer (a :class:`ValueError`; the message
        names each key, its value, the rule and where it was set).
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
    where = dict.fromkeys(values, f"the {recipe} recipe's defaults")
    if isinstance(base, TrainConfig):
        values = base.to_dict()
        where = dict.fromkeys(values, "the given config")
    elif base is not None and str(base).strip():
        from_file = config_file_values(base)
        values.update(from_file)
        where.update(dict.fromkeys(from_file, f"config file {base}"))
    elif saved is not None:
        values = saved.to_dict()
        where = dict.fromkeys(values, f"the run's saved {Path(resume_from) / CONFIG_FILE}")
    values.update(overrides or {})
    where.update({k: (sources or {}).get(k, "the given settings") for k in overrides or {}})
    if saved is not None:  # "the cache's first channel" is the one the saved run resolved
        values.update({k: getattr(saved, k) for k in CACHE_CHANNEL_FIELDS
                       if not values.get(k)})
    try:
        config = TrainConfig.from_dict(values)
    except SettingError as exc:
        raise exc.with_sources(where) from None
    if saved is not None and (Path(resume_from) / CHECKPOINT_FILE).exists():
        conflicts = resume_conflicts(saved, config)
        if conflicts:
            raise TrainingError(_differ_message(Path(resume_from) / CHECKPOINT_FILE, conflicts))
    return config


def _differ_message(path, diff) -> str:
    return (f"Cannot resume {path}: settings differ from the run's ({', '.join(diff)}). "
            "Resume with the saved config.toml, or start a new run folder.")


def _convert(values: Mapping) -> dict:
    """``values`` (a parsed file, ``--set`` pairs, widget values) as TrainConfig's types;
    unknown keys and values of the wrong type raise :class:`SettingError` naming the key."""
    values = dict(values.get("train", values))
    hints = _hints()
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise SettingError([(tuple(unknown), f"Unknown training settings {unknown}; known are: "
                             f"{', '.join(sorted(hints))}")], prefix="")
    out, problems = {}, []
    for key, value in values.items():
        try:
            out[key] = _as_type(key, hints[key], value)
        except ValueError as exc:
            problems.append((key, str(exc)))
    if problems:
        raise SettingError(problems)
    return out


@functools.cache
def _hints() -> dict:
    return get_type_hints(TrainConfig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_type(key: str, kind, value):
    """One value as ``kind`` (what TOML, YAML or a widget gave may be a string)."""
    if kind is bool:
        return _as_bool(key, value)
    if kind is str:
        return "" if value is None else str(value)
    if kind in (int, float):
        number = _as_number(value, kind)
        if number is None:
            what = "a number" if kind is float else "a whole number"
            raise ValueError(f"{key} must be {what}, not {value!r}")
        return number
    # tuple[float, float]: a scale range
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_number(v) for v in value)):
        return tuple(float(v) for v in value)
    raise ValueError(f"{key} must be two numbers [low, high], e.g. [0.1, 0.2], not {value!r}")


def _as_number(value, kind) -> int | float | None:
    """``value`` as an ``int`` or ``float`` (from a number or its text), or ``None``;
    a whole float is an int (TOML's ``10.0``), no other float is."""
    if isinstance(value, str):
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            return None
    if not _is_number(value):
        return None
    if kind is float:
        return float(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value


def _type_problems(config: TrainConfig) -> list[tuple[str, str]]:
    """Fields of the wrong type; the others are stored as their field's type (1 -> 1.0,
    [0.1, 0.2] -> (0.1, 0.2)), so that equal settings compare equal."""
    problems = []
    for key, kind in _hints().items():
        try:
            object.__setattr__(config, key, _as_type(key, kind, getattr(config, key)))
        except ValueError as exc:
            problems.append((key, str(exc)))
    return problems


def _value_problems(c: TrainConfig) -> list[tuple]:
    """Signs, ranges, choices and orderings of well-typed settings, each with its fix."""
    problems = []

    def need(ok, keys, text):
        if not ok:
            problems.append((keys, text))

    choices = {"weak_label": WEAK_LABELS, "dmso": DMSO_MODES, "crop_centres": CROP_CENTRES,
               "teacher_centering": CENTERINGS, "precision": PRECISIONS,
               "init_parts": INIT_PARTS, "epoch_split": EPOCH_SPLITS, "preload": PRELOADS,
               "pos_embed": POS_EMBEDS}
    for name, allowed in choices.items():
        need(getattr(c, name) in allowed, name,
             f"{name} must be one of {', '.join(allowed)}, not {getattr(c, name)!r}")
    need(_DEVICE_NAME.match(c.device), "device",
         f"device must be one of {', '.join(DEVICES)} (or cuda:N), not {c.device!r}")
    floats = [k for k, v in c.to_dict().items() if isinstance(v, float)]
    for name in floats:
        need(math.isfinite(getattr(c, name)), name,
             f"{name} must be a finite number, not {getattr(c, name)}")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(c, name)
        need(0 < lo <= hi <= 1, name,
             f"{name} must be [low, high] with 0 < low <= high <= 1, not [{lo}, {hi}]")
    for name in ("epochs", "batch_size", "global_size", "local_size", "out_dim",
                 "hidden_dim", "bottleneck_dim", "checkpoint_every"):
        need(getattr(c, name) >= 1, name, f"{name} must be at least 1, not {getattr(c, name)}")
    for name in ("local_crops", "warmup_epochs", "warmup_teacher_temp_epochs",
                 "freeze_last_layer", "snapshot_every", "seed"):
        need(getattr(c, name) >= 0, name, f"{name} must be 0 or more, not {getattr(c, name)}")
    need(c.epochs <= MAX_EPOCHS, "epochs",
         f"epochs must be at most {MAX_EPOCHS:,}, not {c.epochs:,}: such a run would not end")
    need(c.seed < 2**63, "seed", f"seed must be below 2**63, not {c.seed}")
    if any(not math.isfinite(getattr(c, k)) for k in floats):
        return problems  # nan and inf compare false: said once above
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "input_std"):
        need(getattr(c, name) > 0, name,
             f"{name} must be more than 0, not {getattr(c, name)}")
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "intensity_jitter"):
        need(getattr(c, name) >= 0, name, f"{name} must be 0 or more, not {getattr(c, name)}")
    for name in ("center_momentum", "momentum_teacher", "flip_p"):
        need(0 <= getattr(c, name) <= 1, name,
             f"{name} must lie in [0, 1], not {getattr(c, name)}")
    need(0 <= c.drop_path_rate < 1, "drop_path_rate",
         f"drop_path_rate must lie in [0, 1), not {c.drop_path_rate}")
    if c.lr >= 0:  # a negative lr is said above; lr 0 keeps the weights (tests use it)
        need(c.min_lr <= c.lr, ("min_lr", "lr"),
             f"min_lr ({c.min_lr}) must not exceed the peak lr ({c.lr}): the learning rate "
             "would climb; lower min_lr or raise lr")
    return problems


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



def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


