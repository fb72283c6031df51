"""The Train panel's values as one training config (GUI values -> one validated config).

Plain functions, no Qt: the merge is ``core.train.resolve_config``'s (the CLI's too), over
a TOML file, a preset, or WS-DINO's defaults; Continue takes the run's saved settings.
Importing this loads no torch (the panel opens without it); the fit check imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_wsdino.core import layout
from napari_wsdino.core.archs import RANDOM_INIT
from napari_wsdino.core.pretrained import weights_exist
from napari_wsdino.core.presets import PRESET_TITLES, PRESETS, preset_for
from napari_wsdino.core.train import TrainConfig, TrainingError, resolve_config

#: Widget fields that go straight into TrainConfig.
CONFIG_FIELDS = ("weak_label", "arch", "epochs", "batch_size", "lr", "init", "device",
                 "global_size", "local_size", "local_crops", "out_dim")


def preset_config(name: str) -> TrainConfig:
    """WS-DINO's defaults with a demo preset's training settings."""
    return resolve_config(overrides=PRESETS[name].train if name in PRESETS else None)


def make_train_config(values: dict[str, Any], base_file: str = "", preset: str = "") -> TrainConfig:
    """Widget values over a base config (a TOML file, else a preset, else WS-DINO's defaults).

    The merge is ``core.train.resolve_config``'s, the CLI's too. Raises ``ValueError`` /
    ``FileNotFoundError`` with a message naming the bad setting.
    """
    changes = {k: values[k] for k in CONFIG_FIELDS if k in values}
    if changes.get("init") not in (None, "", RANDOM_INIT) and not weights_exist(changes["init"]):
        raise FileNotFoundError(f"Initial weights file {changes['init']} does not exist.")
    base = base_file if str(base_file).strip() else preset_config(preset)
    return resolve_config(base, changes)



def check_fit(config: TrainConfig, shape) -> None:
    """Core's fit check (:func:`napari_wsdino.core.train.check_fit`), plus the preset
    whose crops fit such a cache when the global crop is too large."""
    from napari_wsdino.core.train import check_fit as core_check_fit  # torch

    try:
        core_check_fit(config, shape)
    except TrainingError as exc:
        if "too large" not in str(exc):
            raise
        raise TrainingError(f"{exc} Or choose the preset "
                            f"'{PRESET_TITLES[preset_for(shape)]}'.") from None


def continue_config(run: str | Path, channels, epochs: int, device: str) -> TrainConfig:
    """The run's saved settings with a new number of epochs (Continue training).

    The CLI's resume rule (``core.train.resolve_config`` with ``resume_from``): the saved
    ``config.toml`` of each ticked channel, checked before any work; the first one is run.
    Raises ``TrainingError`` when a channel's saved settings cannot be resumed so.
    """
    configs = [resolve_config(None, {"epochs": int(epochs), "device": device},
                              resume_from=layout.channel_dir(run, channel))
               for channel in channels if layout.config_path(run, channel).exists()]
    if not configs:
        raise ValueError(f"{run} holds no run of {', '.join(channels)} to continue: press Start.")
    return configs[0]
