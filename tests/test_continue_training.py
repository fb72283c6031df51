"""Continue training: ``wsdino train CACHE --resume --epochs N`` extends a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train_helpers import make_cache, tiny_config

from napari_wsdino.cli import main
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.schedules import Schedules
from napari_wsdino.core.train import (
    TrainConfig,
    TrainingError,
    load_checkpoint,
    resolve_config,
    train,
    train_channels,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cont") / "cache", per_compound=6, size=32)


def _lrs(events):
    return [e.info["lr"] for e in events if "lr" in e.info]


def test_extend_a_finished_run_reads_the_new_totals_schedule(cache, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(epochs=1)
    run_to_end(train(cache, config, out))
    first = load_checkpoint(out / "checkpoint.pth")
    n = first["steps_per_epoch"]
    assert first["finished"] and first["step"] == n
    events = []
    run_to_end(train(cache, config.replace(epochs=3), out, resume=True), events.append)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["finished"] and ckpt["step"] == 3 * n and ckpt["epoch"] == 3
    assert TrainConfig.load(out / "config.toml").epochs == 3
    # from the step where it stopped, the 3-epoch schedule (a warm restart of the cosine)
    sched = Schedules.from_config(config.replace(epochs=3), n)
    np.testing.assert_allclose(_lrs(events), sched.lr[n:3 * n])
    assert [e.step for e in events if "lr" in e.info][0] == n + 1
    assert [json.loads(l)["epoch"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # fewer epochs than already trained: refused, naming the option
    with pytest.raises(TrainingError, match="--epochs 3 or more"):
        run_to_end(train(cache, config.replace(epochs=2), out, resume=True))
    # other settings still cannot change
    with pytest.raises(TrainingError, match="settings differ .*lr"):
        run_to_end(train(cache, config.replace(epochs=4, lr=0.1), out, resume=True))


def test_extend_an_interrupted_run_equals_a_run_planned_that_long(cache, tmp_path):
    """Stopped at epoch 1 of 2, continued to 3: the same weights as a 3-epoch run stopped
    and resumed at the same step (bit-exact resume is kept, only the plan changes)."""
    config = tiny_config(epochs=2)
    steps = []

    def stop_after_first():
        return len(steps) >= 1

    run_to_end(train(cache, config, tmp_path / "a", stop=stop_after_first),
               lambda e: steps.append(e.step))
    run_to_end(train(cache, config.replace(epochs=3), tmp_path / "a", resume=True))
    steps.clear()
    run_to_end(train(cache, config.replace(epochs=3), tmp_path / "b", stop=stop_after_first),
               lambda e: steps.append(e.step))
    run_to_end(train(cache, config.replace(epochs=3), tmp_path / "b", resume=True))
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pth") for r in ("a", "b"))
    assert a["step"] == b["step"]
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key


def test_cli_resume_with_more_epochs(cache, tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--arch", "test_vit", "--epochs", "1", "--batch-size", "8", "--global-size", "32",
            "--local-size", "16", "--local-crops", "2", "--out-dim", "128", "--device", "cpu",
            "--set", "hidden_dim=32", "--set", "bottleneck_dim=16", "--quiet"]
    assert main(["train", str(cache.path), "--out", str(run), *tiny]) == 0
    assert main(["train", str(cache.path), "--out", str(run), "--resume", "--epochs", "2",
                 "--quiet"]) == 0
    ckpt = load_checkpoint(run / "DAPI" / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and ckpt["finished"]


def test_continue_channels_trained_with_different_settings(cache, tmp_path):
    """Each channel resumes with its own saved settings (resolve_config per channel folder),
    as the CLI's --resume does; one config for all would be refused for the second."""
    run = tmp_path / "run"
    for ch, lr in (("DAPI", 1e-3), ("Actin", 2e-3)):
        run_to_end(train_channels(cache, tiny_config(epochs=1, lr=lr), run, [ch]))
    configs = {ch: resolve_config(None, {"epochs": 2, "channel": ch}, resume_from=run / ch)
               for ch in ("DAPI", "Actin")}
    paths = run_to_end(train_channels(cache, configs, run, resume=True))
    assert list(paths) == ["DAPI", "Actin"]
    for ch, lr in (("DAPI", 1e-3), ("Actin", 2e-3)):
        ckpt = load_checkpoint(paths[ch])
        assert ckpt["epoch"] == 2 and ckpt["finished"] and ckpt["config"]["lr"] == lr
    with pytest.raises(TrainingError, match="settings differ .*lr"):  # one config for both
        run_to_end(train_channels(cache, configs["DAPI"].replace(epochs=3), run, resume=True))
    with pytest.raises(ValueError, match="config given for channel Actin trains DAPI"):
        run_to_end(train_channels(cache, {"Actin": configs["DAPI"]}, run, resume=True))
