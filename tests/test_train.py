"""The training engine on tiny generated caches: learning, pairing, checkpoints, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import make_cache, tiny_config, tiny_table

from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.model import CHECKPOINT_FORMAT, create_backbone, load_backbone_weights
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.train import (
    FieldSource,
    TrainConfig,
    TrainingError,
    build_models,
    load_checkpoint,
    train,
    train_channels,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache"))


def run(cache, config, out, **kw):
    return run_to_end(train(cache, config, out, **kw))


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- config ---------------------------------------------------------------------------
def test_fit_check_names_the_setting_its_limit_and_the_value_to_use(cache):
    """Core's fit check (the Train panel runs it before a run; the CLI leaves crops larger
    than the field to the resize, as before): 64 px fields take global crops of at most
    128 px, and crops are a multiple of the patch."""
    from napari_wsdino.core.train import TrainingError, check_fit

    with pytest.raises(TrainingError, match=r"global_size = 224 .* at most 128"):
        check_fit(tiny_config(global_size=224), cache.shape)
    check_fit(tiny_config(global_size=128), cache.shape)  # the limit itself fits
    with pytest.raises(TrainingError, match=r"local_size = 20 .* patch size 8: set it to 16"):
        check_fit(tiny_config(arch="wsdino_vit_pico_patch8", local_size=20), cache.shape)


def test_config_defaults_are_the_papers_and_round_trip(tmp_path):
    c = TrainConfig()
    assert (c.arch, c.drop_path_rate, c.out_dim, c.hidden_dim, c.bottleneck_dim) == (
        "vit_small_patch8_224", 0.1, 65536, 2048, 256)
    assert (c.norm_last_layer, c.freeze_last_layer) == (False, 1)
    assert (c.student_temp, c.teacher_temp, c.center_momentum, c.momentum_teacher) == (
        0.07, 0.04, 0.8, 0.99)
    assert (c.lr, c.warmup_epochs, c.weight_decay, c.clip_grad, c.batch_size, c.epochs) == (
        4e-6, 10, 0.0, 0.0, 16, 400)
    assert (c.global_size, c.local_size, c.local_crops) == (224, 96, 8)
    assert (c.global_scale, c.local_scale, c.flip_p) == ((0.1, 0.2), (0.04, 0.08), 0.5)
    custom = c.replace(weak_label="moa_or_compound", init='C:\\w "x".pth', lr=1e-3)
    path = custom.save(tmp_path / "c.toml")
    assert TrainConfig.load(path) == custom
    (tmp_path / "c.yaml").write_text("weak_label: compound\nepochs: 3\nlocal_scale: [0.05, 0.1]\n")
    assert TrainConfig.load(tmp_path / "c.yaml") == c.replace(
        weak_label="compound", epochs=3, local_scale=(0.05, 0.1))
    with pytest.raises(ValueError, match="Unknown training settings"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="weak_label"):
        TrainConfig(weak_label="plate")
    with pytest.raises(ValueError, match="global_scale"):
        TrainConfig(global_scale=(0.3, 0.2))


# -- learning and pairing -------------------------------------------------------------
def test_loss_falls_over_a_few_epochs(cache, tmp_path):
    # Teacher-temperature warm-up as DINO recommends. Epoch 1 starts with teacher = student,
    # so its loss is artificially low; from epoch 2 on the loss must fall (checked for
    # seeds 0-2 when written: by 0.5-0.8).
    config = tiny_config(epochs=12, batch_size=4, lr=5e-4, warmup_epochs=2,
                         momentum_teacher=0.99, freeze_last_layer=0, checkpoint_every=100,
                         warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_epochs=4)
    events = []
    path = run_to_end(train(cache, config, tmp_path), events.append)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").open()]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[1:4]) - 0.3
    assert path == tmp_path / "checkpoint.pth" and path.exists()
    last = events[-1]
    # DMSO fields are left out (dmso="exclude"), the last incomplete batch dropped.
    steps_per_epoch = int((cache.table.compound != "DMSO").sum()) // 4
    assert steps_per_epoch == 7                    # 30 treated fields of make_cache, batch 4
    assert [e.step for e in events] == list(range(1, 12 * steps_per_epoch + 1))
    assert last.total == 12 * steps_per_epoch
    assert set(last.info) >= {"epoch", "step", "loss", "lr", "teacher_temp", "momentum",
                              "images_per_s", "eta_s"}
    assert last.info["epoch"] == 12 and last.info["eta_s"] == 0


@pytest.mark.parametrize("weak_label", ["compound", "none"])
def test_local_crops_come_from_the_paired_field(cache, tmp_path, monkeypatch, weak_label):
    calls = []
    original = FieldSource.batch

    def spy(self, rows):
        calls.append(np.asarray(rows).copy())
        return original(self, rows)

    monkeypatch.setattr(FieldSource, "batch", spy)
    run(cache, tiny_config(epochs=1, weak_label=weak_label), tmp_path)
    table = cache.table
    if weak_label == "none":
        # Plain DINO: one read per step, global and local crops from the same fields.
        steps = json.loads((tmp_path / "log.jsonl").read_text())["step"]
        assert len(calls) == steps
        return
    assert len(calls) % 2 == 0
    g = np.concatenate(calls[0::2])
    loc = np.concatenate(calls[1::2])
    assert (table.compound.to_numpy()[g] == table.compound.to_numpy()[loc]).all()
    assert (g != loc).all()  # every compound here has several fields
    assert not (table.moa.to_numpy()[g] == "DMSO").any()
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["data"]["singleton_groups"] == []


def test_resident_fields_equal_memory_mapped_ones(cache):
    images = cache.images("DAPI")
    rows = np.array([5, 0, 5, 17])
    used = np.array([0, 5, 9, 17, 30])
    mapped = FieldSource(images, used, torch.device("cpu"), "memmap").batch(rows)
    resident = FieldSource(images, used, torch.device("cpu"), "device")
    assert resident.lookup is not None
    assert torch.equal(resident.batch(rows), mapped)
    assert mapped.shape == (4, 1, 64, 64) and mapped.dtype == torch.float32
    np.testing.assert_array_equal(mapped[1, 0].numpy(), images[0].astype(np.float32))


def test_bf16_autocast_path_trains(cache, tmp_path):
    path = run(cache, tiny_config(epochs=1, precision="bf16", preload="device"), tmp_path)
    ckpt = load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert ckpt["student"]["backbone.pos_embed"].dtype == torch.float32  # fp32 master weights


# -- checkpoints, resume, stop ----------------------------------------------------------
def test_checkpoint_contents_and_loading(cache, tmp_path):
    config = tiny_config(epochs=2)
    path = run(cache, config, tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["channel"] == "DAPI"
    assert ckpt["finished"] and ckpt["epoch"] == 2
    assert ckpt["data"]["weak_label"] == "compound" and len(ckpt["data"]["fingerprint"]) == 64
    # '' (the cache's first channel) is saved by name
    saved = config.replace(channel=config.channel or "DAPI",
                           nuclei_channel=config.nuclei_channel or "DAPI")
    assert TrainConfig.from_dict(ckpt["config"]) == saved
    assert TrainConfig.load(tmp_path / "config.toml") == saved
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert ckpt["optimizer"]["state"] and ckpt["dino_loss"]["center"].shape == (1, 256)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    assert not list(tmp_path.glob("*.tmp"))
    vit = load_backbone_weights(create_backbone("test_vit"), path)
    for k, v in vit.state_dict().items():
        assert torch.equal(v, ckpt["teacher"]["backbone." + k])
    with pytest.raises(FileExistsError, match="resume"):
        run(cache, config, tmp_path)
    with pytest.raises(TrainingError, match="settings differ"):
        run(cache, config.replace(lr=1.0), tmp_path, resume=True)


def test_resume_after_close_reproduces_the_uninterrupted_run(cache, tmp_path):
    config = tiny_config(epochs=3, checkpoint_every=2)
    full = load_checkpoint(run(cache, config, tmp_path / "a"))
    gen = train(cache, config, tmp_path / "b")
    for event in gen:
        if event.step == 4:  # mid-epoch 2 (3 steps per epoch)
            break
    gen.close()
    stopped = load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert stopped["step"] == 4 and not stopped["finished"]
    resumed = load_checkpoint(run(cache, config, tmp_path / "b", resume=True))
    assert resumed["step"] == full["step"] and resumed["finished"]
    assert_same_state(resumed["student"], full["student"])
    assert_same_state(resumed["teacher"], full["teacher"])
    assert torch.equal(resumed["dino_loss"]["center"], full["dino_loss"]["center"])
    a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").open()]
    b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").open()]
    assert [x["loss"] for x in a] == [x["loss"] for x in b]


def test_close_on_the_last_step_of_an_epoch_keeps_its_log_and_snapshot(cache, tmp_path):
    """Closing right after an epoch's last step (the GUI closing its dock) must not lose that
    epoch's log line or teacher snapshot, nor fold its stats into the next epoch."""
    config = tiny_config(epochs=3, checkpoint_every=5, snapshot_every=1)  # 3 steps per epoch
    full = run(cache, config, tmp_path / "a")
    gen = train(cache, config, tmp_path / "b")
    for event in gen:
        if event.step == 3:
            break
    gen.close()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pth")["step"] == 3
    run(cache, config, tmp_path / "b", resume=True)
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").open()] for d in ("a", "b")]
    assert [x["epoch"] for x in logs[1]] == [1, 2, 3]
    assert [x["loss"] for x in logs[1]] == [x["loss"] for x in logs[0]]
    assert [x["singleton_draws"] for x in logs[1]] == [x["singleton_draws"] for x in logs[0]]
    assert sorted(p.name for p in (tmp_path / "b").glob("teacher_epoch*.pth")) == [
        "teacher_epoch0001.pth", "teacher_epoch0002.pth", "teacher_epoch0003.pth"]
    assert full.exists()


def test_resume_after_a_crash_rewinds_the_log_to_the_checkpoint(cache, tmp_path, monkeypatch):
    import napari_wsdino.core.train.loop as train_mod  # the loop looks its helpers up there

    config = tiny_config(epochs=4, checkpoint_every=2)  # 3 steps per epoch
    clean = load_checkpoint(run(cache, config, tmp_path / "clean"))
    original, count = train_mod.multi_crop, {"n": 0}

    def crash(*args, **kw):
        count["n"] += 1
        if count["n"] == 10:  # first step of epoch 4: epoch 3 logged, checkpoint at 2
            raise MemoryError("simulated crash")
        return original(*args, **kw)

    monkeypatch.setattr(train_mod, "multi_crop", crash)
    with pytest.raises(MemoryError):
        run(cache, config, tmp_path / "b")
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(train_mod, "multi_crop", original)
    resumed = load_checkpoint(run(cache, config, tmp_path / "b", resume=True))
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").open()] for d in ("clean", "b")]
    assert [x["epoch"] for x in logs[1]] == [1, 2, 3, 4]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]]
    assert_same_state(resumed["teacher"], clean["teacher"])


def test_stop_request_leaves_a_loadable_checkpoint(cache, tmp_path):
    events = []
    steps = lambda: sum("loss" in e.info for e in events)  # noqa: E731
    gen = train(cache, tiny_config(epochs=5), tmp_path, stop=lambda: steps() >= 2)
    path = run_to_end(gen, events.append)
    assert events[0].info["singleton_groups"] == [] and events[0].info["fields"] == 30
    assert "fields" not in events[1].info
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 2 and ckpt["epoch"] == 0 and not ckpt["finished"]
    student, _ = build_models(tiny_config())
    student.load_state_dict(ckpt["student"])  # loadable into the same architecture


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(cache, tmp_path,
                                                                        monkeypatch):
    import napari_wsdino.core.train.loop as train_mod  # the loop looks its helpers up there

    original = train_mod.multi_crop
    count = {"n": 0}

    def poisoned(*args, **kw):
        count["n"] += 1
        views = original(*args, **kw)
        if count["n"] == 5:  # epoch 2, after the epoch-1 checkpoint
            views[0] = views[0] * float("nan")
        return views

    monkeypatch.setattr(train_mod, "multi_crop", poisoned)
    with pytest.raises(TrainingError, match=r"Loss became nan .*step 5.*last good checkpoint"):
        run(cache, tiny_config(epochs=3), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_nan_pixels_in_the_cache_are_caught(tmp_path):
    table = tiny_table(4)
    bad = np.full((len(table), 64, 64), np.nan, dtype=np.float32)
    cache = write_cache(tmp_path / "c", table, {"DAPI": bad})
    with pytest.raises(TrainingError, match="no checkpoint had been written yet.*NaN"):
        run(cache, tiny_config(epochs=1, batch_size=4), tmp_path / "r")


def test_every_channel_starts_from_the_same_weights(cache, tmp_path):
    config = tiny_config(epochs=1, lr=0.0, min_lr=0.0)  # lr 0: weights stay the initial ones
    paths = run_to_end(train_channels(cache, config, tmp_path, ["DAPI", "Actin"]))
    assert set(paths) == {"DAPI", "Actin"}
    for ch in paths:
        assert {p.name for p in (tmp_path / ch).iterdir()} >= {"checkpoint.pth", "config.toml",
                                                               "log.jsonl"}
    a, b = (load_checkpoint(paths[c]) for c in ("DAPI", "Actin"))
    assert (a["channel"], b["channel"]) == ("DAPI", "Actin")
    assert a["data"]["fingerprint"] != b["data"]["fingerprint"]
    assert_same_state(a["student"], b["student"])
    initial, _ = build_models(config)
    assert_same_state(a["student"], initial.state_dict())


# -- weights --------------------------------------------------------------------------
def test_summed_patch_filters_equal_rgb_replication():
    torch.manual_seed(0)
    rgb = create_backbone("test_vit", in_chans=3).eval()
    grey = load_backbone_weights(create_backbone("test_vit", in_chans=1), rgb.state_dict()).eval()
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


def test_official_dino_layouts_load_like_timm(tmp_path):
    torch.manual_seed(1)
    rgb = create_backbone("test_vit", in_chans=3).eval()
    sd = rgb.state_dict()
    head = {"mlp.0.weight": torch.zeros(8, 64), "last_layer.weight_g": torch.ones(4, 1)}
    full = {"teacher": {**{"module.backbone." + k: v for k, v in sd.items()},
                        **{"module.head." + k: v for k, v in head.items()}},
            "student": {"module.backbone." + k: torch.zeros_like(v) for k, v in sd.items()},
            "epoch": 100}
    torch.save(full, tmp_path / "dino_full_checkpoint.pth")
    torch.save(sd, tmp_path / "dino_deitsmall_pretrain.pth")  # bare backbone layout
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = rgb(x.repeat(1, 3, 1, 1))
        for name in ("dino_full_checkpoint.pth", "dino_deitsmall_pretrain.pth"):
            vit = create_backbone("test_vit", weights=tmp_path / name).eval()
            torch.testing.assert_close(vit(x), want, atol=1e-5, rtol=1e-4)
    # The same file as a training init: the student (and teacher) start from it.
    student, teacher = build_models(tiny_config(init=str(tmp_path / "dino_full_checkpoint.pth")))
    with torch.no_grad():
        torch.testing.assert_close(teacher.backbone.eval()(x), want, atol=1e-5, rtol=1e-4)
    assert torch.equal(student.backbone.pos_embed, sd["pos_embed"])
