"""Checks of training settings: the choice lists and ranges, types, and :class:`SettingError`.

:class:`~napari_wsdino.core.train.settings.TrainConfig` runs :func:`type_problems` then
:func:`value_problems` on every config it makes, and :func:`convert` on what a file,
``--set`` pairs or widgets give; each problem names the key, its value and the rule.
Every name here is also importable from :mod:`napari_wsdino.core.train.settings`.

Example
-------
>>> from napari_wsdino.core.train.validate import as_bool
>>> as_bool("compile", "yes"), as_bool("compile", False)
(True, False)
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from napari_wsdino.core.archs import CENTERINGS
from napari_wsdino.core.errors import DataError
from napari_wsdino.core.sampler import DMSO_MODES, WEAK_LABELS

#: Where crops are centred: anywhere (the paper) or on nuclei (cell-centred crops).
CROP_CENTRES = ("uniform", "nuclei")
INIT_PARTS = ("backbone", "full")
EPOCH_SPLITS = ("shard", "replicate")
#: How the position embedding meets crops of another size (core.pos_embed.POS_EMBED_MODES).
POS_EMBEDS = ("timm", "dino")
#: Devices offered (any torch device name, e.g. ``cuda:1``, is accepted).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
PRELOADS = ("auto", "device", "memmap")

#: The longest run accepted: a longer one would not end (and its learning-rate schedule,
#: one float per step, would not fit in memory).
MAX_EPOCHS = 100_000
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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


def convert(values: Mapping, hints: Mapping) -> dict:
    """``values`` (a parsed file, ``--set`` pairs, widget values) as ``hints`` (TrainConfig's
    field types); unknown keys and values of the wrong type raise :class:`SettingError`
    naming the key."""
    values = dict(values.get("train", values))
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_type(key: str, kind, value):
    """One value as ``kind`` (what TOML, YAML or a widget gave may be a string)."""
    if kind is bool:
        return as_bool(key, value)
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


def type_problems(config, hints: Mapping) -> list[tuple[str, str]]:
    """Fields of ``config`` (a TrainConfig; field types ``hints``) of the wrong type; the others
    are stored as their field's type (1 -> 1.0, [0.1, 0.2] -> (0.1, 0.2)), so that equal
    settings compare equal."""
    problems = []
    for key, kind in hints.items():
        try:
            object.__setattr__(config, key, _as_type(key, kind, getattr(config, key)))
        except ValueError as exc:
            problems.append((key, str(exc)))
    return problems


def value_problems(c) -> list[tuple]:
    """Signs, ranges, choices and orderings of a well-typed TrainConfig ``c``, each with its
    fix."""
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


def as_bool(key, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"{key} must be true or false, not {value!r}.")
