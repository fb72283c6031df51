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

The package splits as DINO does (``train_dino`` builds, ``train_one_epoch`` runs):
:mod:`~napari_wsdino.core.train.settings` (:class:`TrainConfig`, TOML, the choice lists,
:func:`resolve_config`), :mod:`~napari_wsdino.core.train.setup` (models, data, optimiser:
:func:`setup_run`), :mod:`~napari_wsdino.core.train.checkpoint` (save, load, resume) and
:mod:`~napari_wsdino.core.train.loop` (:func:`train`, :func:`train_one_epoch`, one step,
:func:`train_channels`). Every name stays importable from ``napari_wsdino.core.train``.
Importing the package or its settings loads no torch (a panel builds its form, a command
checks a config without it); the names of the other three modules load them, and torch,
on first use.

A run folder holds, per channel: ``checkpoint.pth``, ``config.toml`` and ``log.jsonl``
(:mod:`napari_wsdino.core.layout`).

Example
-------
>>> from napari_wsdino.core.train import TrainConfig, train
>>> from napari_wsdino.core.progress import run_to_end
>>> cfg = TrainConfig(arch="test_vit", epochs=2, global_size=32, local_size=16,
...                   out_dim=256, hidden_dim=64, weak_label="compound")
>>> path = run_to_end(train("cache/", cfg, "run/DAPI"))     # doctest: +SKIP
"""

from __future__ import annotations

# The settings are torch-free: imported now.
from napari_wsdino.core.layout import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE
from napari_wsdino.core.train.settings import (  # noqa: F401
    CROP_CENTRES,
    DEVICES,
    EPOCH_SPLITS,
    INIT_PARTS,
    MAX_EPOCHS,
    N_GLOBAL,
    PRECISIONS,
    PRELOADS,
    RESUMABLE_CHANGES,
    SettingError,
    TrainConfig,
    TrainingError,
    _as_bool,
    config_file_values,
    resolve_config,
    resume_conflicts,
)

__all__ = [
    "CHECKPOINT_FILE", "CHECKPOINT_VERSION", "CONFIG_FILE", "CROP_CENTRES", "DEVICES",
    "EPOCH_SPLITS", "INIT_PARTS", "LOG_FILE", "MAX_EPOCHS", "N_GLOBAL", "PRECISIONS",
    "PRELOADS", "RESUMABLE_CHANGES", "FieldSource", "SettingError", "TrainConfig",
    "TrainState", "TrainingError",
    "build_models", "check_fit", "config_file_values", "dataset_fingerprint", "describe_data",
    "load_checkpoint", "resolve_config", "resume_conflicts", "save_checkpoint", "setup_run",
    "train", "train_channels", "train_one_epoch",
]

#: The names of the modules that need torch, imported on first use (PEP 562), private ones
#: included (tests and benchmarks use some of them).
_TORCH_NAMES = {
    "checkpoint": ("CHECKPOINT_VERSION", "_check_resume", "_rng_state", "_set_rng_state",
                   "_step_seed", "_truncate_log", "end_epoch", "last_good", "load_checkpoint",
                   "restore", "save_checkpoint", "snapshot", "write_checkpoint"),
    "setup": ("FieldSource", "TrainState", "_crop_centres", "_load_init_state",
              "_maybe_load_head", "_params_groups", "_patch_size", "build_models", "check_fit",
              "dataset_fingerprint", "describe_data", "setup_run"),
    "loop": ("train", "train_channels", "train_one_epoch"),
}


def __getattr__(name: str):
    """A name of ``_TORCH_NAMES`` (or one of its modules), imported now."""
    import importlib

    if name in _TORCH_NAMES:  # a module not imported yet: ``train.loop``
        return importlib.import_module(f"{__name__}.{name}")
    for module, names in _TORCH_NAMES.items():
        if name in names:
            value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
