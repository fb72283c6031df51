"""Training settings: :class:`TrainConfig`, its TOML I/O, the choice lists, and the merge rule.

Every default, choice list and range of a training run is written once: the defaults
here, the choice lists, ranges and their checks in :mod:`~napari_wsdino.core.train.validate`
(importable from here too); the CLI's options and the Train panel read them.
:func:`resolve_config` layers the defaults it is given (a recipe's, from
:mod:`~napari_wsdino.core.recipes`, which combines the stages: this stage never reads a
recipe itself), a base config (or a run's saved one when resuming) and explicit overrides,
and applies the resume rule: a resumed run may change only its length and settings that do
not change the maths (:data:`RESUMABLE_CHANGES`).

Example
-------
>>> from napari_wsdino.core.train.settings import TrainConfig
>>> TrainConfig(epochs=3).replace(lr=1e-3).to_toml().splitlines()[1]
'[train]'
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, get_type_hints

from napari_wsdino.core.fsio import atomic_write_text
from napari_wsdino.core.layout import CHECKPOINT_FILE, CONFIG_FILE
from napari_wsdino.core.archs import DEFAULT_ARCH
from napari_wsdino.core.sampler import DEFAULT_WEAK_LABEL
from napari_wsdino.core.tomlfmt import toml_value

# The choice lists, ranges and checks (validate.py), importable from here as before.
from napari_wsdino.core.train.validate import (  # noqa: F401
    CROP_CENTRES,
    DEVICES,
    EPOCH_SPLITS,
    INIT_PARTS,
    MAX_EPOCHS,
    POS_EMBEDS,
    PRECISIONS,
    PRELOADS,
    SettingError,
    convert,
    type_problems,
    value_problems,
)
from napari_wsdino.core.train.validate import as_bool as _as_bool  # noqa: F401  (former name)

#: Global crops per view set (DINO's two).
N_GLOBAL = 2
# Settings that may differ between a run and its resumption (they do not change the maths).
RESUMABLE_CHANGES = {"device", "checkpoint_every", "snapshot_every", "preload", "compile"}
#: Channel settings where an empty value means the cache's first channel (the DNA stain:
#: DAPI in BBBC021, DNA in Cell Painting), filled in by :func:`with_cache_channels`.
CACHE_CHANNEL_FIELDS = ("channel", "nuclei_channel")
#: Where :func:`resolve_config`'s bottom layer comes from, in its messages, when it is
#: given no ``defaults``: TrainConfig's own, which the default recipe leaves unchanged.
DEFAULTS_SOURCE = "the default recipe's defaults"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


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
        problems = type_problems(self, _hints())
        if not problems:  # ranges are only read on values of the right type
            problems = value_problems(self)
        if problems:
            raise SettingError(problems)

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping (e.g. a parsed TOML file); unknown keys are refused."""
        return cls(**convert(values, _hints()))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        """The config as a TOML document (a ``[train]`` table)."""
        lines = ["# napari-wsdino training config", "[train]"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_toml())

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
        return convert(raw, _hints())
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
    defaults: Mapping | None = None,
    defaults_source: str = DEFAULTS_SOURCE,
    sources: Mapping[str, str] | None = None,
) -> TrainConfig:
    """The settings of one channel's run: the one merge rule of the CLI and the panels.

    Layers, lowest first: ``defaults``; ``base`` — a :class:`TrainConfig`
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
        ``defaults``.
    overrides
        TrainConfig fields to set, e.g. ``{"epochs": 20, "channel": "Actin"}``.
    resume_from
        The channel folder (``run/<channel>``, :func:`napari_wsdino.core.layout.channel_dir`)
        to resume; ``None`` for a new run.
    defaults
        TrainConfig fields under everything else: a recipe's
        (:func:`napari_wsdino.core.recipes.resolve_train` passes them); ``None``:
        TrainConfig's own defaults.
    defaults_source
        What ``defaults`` are, for messages (``"the paper-code recipe's defaults"``).
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
    saved = None
    if resume_from is not None and (Path(resume_from) / CONFIG_FILE).exists():
        saved = TrainConfig.load(Path(resume_from) / CONFIG_FILE)
    bottom = TrainConfig.from_dict(dict(defaults or {})).to_dict()
    values, where = _layered_values(bottom, defaults_source, base, saved, resume_from, overrides,
                                    sources)
    try:
        config = TrainConfig.from_dict(values)
    except SettingError as exc:
        raise exc.with_sources(where) from None
    if saved is not None and (Path(resume_from) / CHECKPOINT_FILE).exists():
        conflicts = resume_conflicts(saved, config)
        if conflicts:
            raise TrainingError(_differ_message(Path(resume_from) / CHECKPOINT_FILE, conflicts))
    return config


def _layered_values(bottom: dict, bottom_source: str, base, saved: TrainConfig | None,
                    resume_from, overrides: Mapping | None, sources: Mapping[str, str] | None
                    ) -> tuple[dict, dict[str, str]]:
    """:func:`resolve_config`'s layers merged, lowest first, and where each key was set."""
    values = dict(bottom)
    where = dict.fromkeys(values, bottom_source)
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
    return values, where


def _differ_message(path, diff) -> str:
    return (f"Cannot resume {path}: settings differ from the run's ({', '.join(diff)}). "
            "Resume with the saved config.toml, or start a new run folder.")


@functools.cache
def _hints() -> dict:
    return get_type_hints(TrainConfig)


