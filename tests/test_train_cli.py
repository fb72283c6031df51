"""``wsdino train`` end to end on a tiny cache."""

from __future__ import annotations

import pytest
from train_helpers import make_cache

from napari_wsdino.cli import build_parser, main
from napari_wsdino.cli.train import OPTIONS
from napari_wsdino.core.model import ARCHITECTURES
from napari_wsdino.core.sampler import DMSO_MODES, WEAK_LABEL_INFO
from napari_wsdino.core.train import (
    DEVICES,
    EPOCH_SPLITS,
    INIT_PARTS,
    PRECISIONS,
    TrainConfig,
    load_checkpoint,
)

TINY = ["--arch", "test_vit", "--epochs", "1", "--batch-size", "8", "--global-size", "32",
        "--local-size", "16", "--local-crops", "2", "--out-dim", "128", "--device", "cpu",
        "--set", "hidden_dim=32", "--set", "bottleneck_dim=16", "--set", "local_scale=[0.05, 0.1]",
        "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache"))


def test_train_all_channels_then_resume(cache, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", str(cache.path), "--channel", "all", "--weak-label", "moa",
               "--out", str(run), *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    for ch in ("DAPI", "Actin"):
        ckpt = load_checkpoint(run / ch / "checkpoint.pth")
        assert ckpt["channel"] == ch and ckpt["weak_label"] == "moa" and ckpt["finished"]
        config = TrainConfig.load(run / ch / "config.toml")
        assert (config.hidden_dim, config.local_scale, config.out_dim) == (32, (0.05, 0.1), 128)
        assert f"{ch}: " in printed
    # Resuming a finished run reads its saved config and does nothing more.
    assert main(["train", str(cache.path), "--channel", "DAPI", "--out", str(run),
                 "--resume", "--quiet"]) == 0
    # A changed setting cannot be resumed: a clear error and exit code 2.
    assert main(["train", str(cache.path), "--channel", "DAPI", "--out", str(run),
                 "--resume", "--lr", "0.5", "--quiet"]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_bad_settings_exit_2(cache, tmp_path, capsys):
    assert main(["train", str(cache.path), "--out", str(tmp_path), "--set", "nope=1",
                 *TINY]) == 2
    assert "Unknown training settings" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_every_option_is_checked_against_train_config():
    """Types, choices and the defaults shown come from TrainConfig and the registries."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {a.dest: a for a in sub.choices["train"]._actions}
    defaults, fields = TrainConfig(), TrainConfig().to_dict()
    choices = {"weak_label": tuple(WEAK_LABEL_INFO), "dmso": DMSO_MODES, "device": DEVICES,
               "init_parts": INIT_PARTS, "epoch_split": EPOCH_SPLITS, "precision": PRECISIONS}
    for name in OPTIONS:
        action = actions[name]
        assert name in fields and action.option_strings == ["--" + name.replace("_", "-")]
        assert action.default is None  # not given = the recipe / config / saved run decides
        assert action.type is type(fields[name]), name
        assert tuple(action.choices or ()) == choices.get(name, ()), name
        value = getattr(defaults, name)
        assert action.help.endswith(f"(default {'none' if value == '' else value})"), name
    assert actions["channel"].default == defaults.channel
    assert all(name in actions["arch"].help for name in ARCHITECTURES)
    assert set(choices) <= set(OPTIONS)
