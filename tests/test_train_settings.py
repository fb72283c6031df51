"""Training settings: the registries (weak labels, architectures) and the one merge rule
(:func:`napari_wsdino.core.train.resolve_config`) the CLI and the Train panel share, with a
recipe's defaults under it (:func:`napari_wsdino.core.recipes.resolve_train`)."""

from __future__ import annotations

import pandas as pd
import pytest
import timm

from napari_wsdino.core.model import ARCHITECTURES, CPU_ARCHS, DEFAULT_ARCH, arch_patch_size
from napari_wsdino.core.model import create_backbone
from napari_wsdino.core.recipes import resolve_train, train_defaults
from napari_wsdino.core.sampler import (
    DEFAULT_WEAK_LABEL,
    WEAK_LABEL_INFO,
    WEAK_LABELS,
    weak_label_help,
    weak_labels,
)
from napari_wsdino.core.train import SettingError, TrainConfig, TrainingError, resolve_config


# -- registries -------------------------------------------------------------------------
def test_weak_label_registry_is_the_list_every_user_reads():
    assert WEAK_LABELS == tuple(WEAK_LABEL_INFO) == (
        "none", "treatment", "compound", "moa", "moa_or_compound")
    assert TrainConfig().weak_label == DEFAULT_WEAK_LABEL == "compound"
    assert {w.method for w in WEAK_LABEL_INFO.values()} == {"DINO", "WS-DINO"}
    assert WEAK_LABEL_INFO["none"].method == "DINO"
    table = pd.DataFrame({"compound": list("aabb"), "moa": ["X", "X", "Y", "Y"],
                          "treatment": list("aabb"), "plate": ["p"] * 4})
    for name, info in WEAK_LABEL_INFO.items():
        assert info.name == name and info.title and info.help
        assert len(weak_labels(table, name)) == 4  # the sampler knows every registered label
        assert f"{name}: {info.help}" in weak_label_help()
        TrainConfig(weak_label=name)
    with pytest.raises(ValueError, match="weak_label must be one of none, treatment"):
        TrainConfig(weak_label="plate")


def test_architecture_registry_names_buildable_vits_with_their_patch_size():
    assert next(iter(ARCHITECTURES)) == DEFAULT_ARCH == TrainConfig().arch
    assert set(CPU_ARCHS) < set(ARCHITECTURES)
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name and arch.title and arch.help
        assert timm.is_model(name), name
        assert arch_patch_size(name) == arch.patch_size
    for name in CPU_ARCHS:  # the small ones are cheap to build: check the real patch size
        assert create_backbone(name).patch_embed.patch_size == (ARCHITECTURES[name].patch_size,) * 2
    assert arch_patch_size("vit_tiny_patch16_224") == 16
    assert arch_patch_size("test_vit") is None


# -- resolve_config ---------------------------------------------------------------------
def test_layers_recipe_then_base_file_then_overrides(tmp_path):
    assert resolve_config() == resolve_train() == TrainConfig()
    assert resolve_train("paper-code").min_lr == 3e-6
    # the recipe's defaults reach train as an argument: train never reads a recipe
    assert resolve_config(defaults=train_defaults("paper-code")) == resolve_train("paper-code")
    assert resolve_config(defaults={"min_lr": 3e-6}) == TrainConfig(min_lr=3e-6)
    base = tmp_path / "base.toml"
    base.write_text("[train]\nepochs = 7\nlr = 0.001\n")
    config = resolve_train("paper-code", base, {"lr": 0.5, "channel": "Actin"})
    # the file's keys over the recipe, the overrides over the file, the rest the recipe's
    assert (config.epochs, config.lr, config.channel, config.min_lr) == (7, 0.5, "Actin", 3e-6)
    # a TrainConfig as base is taken whole (the recipe does not show through)
    config = resolve_train("paper-code", TrainConfig(epochs=9), {"seed": 3})
    assert config == TrainConfig(epochs=9, seed=3)
    # a message names the recipe whose default it was
    with pytest.raises(SettingError, match=r"\(from the paper-code recipe's defaults, --lr\)"):
        resolve_train("paper-code", overrides={"lr": 1e-6}, sources={"lr": "--lr"})
    with pytest.raises(ValueError, match="Unknown training settings"):
        resolve_config(overrides={"learning_rate": 1})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_config(tmp_path / "missing.toml")


def _saved_run(folder, config: TrainConfig, checkpoint: bool = True):
    folder.mkdir(parents=True)
    config.save(folder / "config.toml")
    if checkpoint:
        (folder / "checkpoint.pth").write_bytes(b"")  # resolve_config reads no weights
    return folder


def test_resume_reads_each_channels_saved_config_and_refuses_other_maths(tmp_path):
    run = tmp_path / "run"
    dapi = _saved_run(run / "DAPI", TrainConfig(channel="DAPI", epochs=5, lr=1e-3))
    actin = _saved_run(run / "Actin", TrainConfig(channel="Actin", epochs=6, lr=2e-3))
    # The Train panel's Continue and the CLI's --resume: saved settings, new length.
    for folder, ch, lr in ((dapi, "DAPI", 1e-3), (actin, "Actin", 2e-3)):
        config = resolve_config(None, {"epochs": 20, "device": "cpu", "channel": ch},
                                resume_from=folder)
        assert config == TrainConfig(channel=ch, epochs=20, lr=lr, device="cpu")
    with pytest.raises(TrainingError, match=r"settings differ from the run's \(lr\)"):
        resolve_config(None, {"lr": 0.5}, resume_from=dapi)
    # a base that disagrees with the run is refused too, naming every setting
    with pytest.raises(TrainingError, match=r"\(lr, seed\)"):
        resolve_config(TrainConfig(seed=1), {}, resume_from=dapi)
    # no saved run there (yet): a resume starts fresh from the layers
    assert resolve_config(None, {"epochs": 2}, resume_from=run / "Tubulin").epochs == 2


def test_a_run_that_never_checkpointed_may_restart_with_other_settings(tmp_path):
    folder = _saved_run(tmp_path / "DAPI", TrainConfig(lr=1e-3), checkpoint=False)
    assert resolve_config(None, {"lr": 0.5}, resume_from=folder) == TrainConfig(lr=0.5)


# -- every setting checked before work (issue 30, case a) ---------------------------------
@pytest.mark.parametrize("overrides, words", [
    ({"lr": -1.0}, ["lr must be 0 or more", "-1.0", "from --lr"]),
    ({"lr": float("nan")}, ["lr must be a finite number", "nan"]),
    ({"seed": "ten"}, ["seed must be a whole number", "'ten'"]),
    ({"seed": -1}, ["seed must be 0 or more", "-1"]),
    ({"epochs": "abc"}, ["epochs must be a whole number", "'abc'"]),
    ({"epochs": 10**9}, ["epochs must be at most 100,000"]),
    ({"global_scale": 5}, ["global_scale must be two numbers [low, high]", "not 5"]),
    ({"global_scale": [0.5, 0.2]}, ["global_scale must be [low, high] with 0 < low <= high"]),
    ({"local_scale": [0.0, 0.1]}, ["local_scale must be [low, high]"]),
    ({"device": "tpu"}, ["device must be one of auto, cpu, cuda", "'tpu'"]),
    ({"min_lr": 0.1}, ["min_lr (0.1) must not exceed the peak lr",
                              "from --min-lr, the default recipe's defaults"]),
    ({"weight_decay": -0.1}, ["weight_decay must be 0 or more"]),
    ({"drop_path_rate": 1.5}, ["drop_path_rate must lie in [0, 1)"]),
    ({"balance": "maybe"}, ["balance must be true or false"]),
])
def test_every_setting_is_checked_naming_key_value_and_source(overrides, words):
    sources = {k: "--" + k.replace("_", "-") for k in overrides}
    with pytest.raises(SettingError) as info:
        resolve_config(None, overrides, sources=sources)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    for w in words:
        assert w in message, (w, message)
    key = next(iter(overrides))
    assert f"from --{key.replace('_', '-')}" in message


def test_a_config_file_value_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nlr = -0.001\nseed = 3\n')
    with pytest.raises(SettingError, match=r"lr must be 0 or more, not -0.001 \(from config "
                       rf"file {path}\)"):
        resolve_config(path)
    path.write_text('[train]\nseed = "ten"\n')
    with pytest.raises(SettingError, match=rf"seed must be a whole number, not 'ten' \(from config "
                       rf"file {path}\)"):
        resolve_config(path)
    path.write_text('[train]\nseed = -1\n')
    with pytest.raises(SettingError, match=rf"seed must be 0 or more, not -1 \(from config file"):
        resolve_config(path)
    # a file may set what only the options on top make valid: checked once merged
    path.write_text('[train]\nmin_lr = 0.001\n')
    assert resolve_config(path, {"lr": 0.01}).min_lr == 0.001
    with pytest.raises(SettingError, match=rf"min_lr .* \(from config file {path}, the default "):
        resolve_config(path)


def test_direct_configs_are_checked_and_normalised():
    assert TrainConfig(lr=1, global_scale=[0.1, 0.2]) == TrainConfig(lr=1.0,
                                                                     global_scale=(0.1, 0.2))
    with pytest.raises(SettingError, match="epochs must be a whole number, not 2.5"):
        TrainConfig(epochs=2.5)
    assert TrainConfig(device="cuda:1").device == "cuda:1"
