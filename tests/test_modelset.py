"""ModelSet: per-channel backbones from our runs, timm/DINO files, baselines; channel checks."""

from __future__ import annotations

import pickle

import pytest
import torch

from napari_wsdino.core.model import CHECKPOINT_FORMAT, CheckpointError, create_backbone
from napari_wsdino.core.modelset import ChannelMismatchError, ModelSet, load_channel_model, parse_model_specs

ARCH = "test_vit"


def _backbone(seed: int, in_chans: int = 1):
    torch.manual_seed(seed)
    return create_backbone(ARCH, in_chans=in_chans)


def _our_checkpoint(path, channel: str, teacher_seed: int, student_seed: int, arch: str = ARCH):
    """What core.train writes: wrapper state dicts with backbone.* and head.* keys."""
    def wrap(model):
        sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        sd["head.mlp.0.weight"] = torch.zeros(4, 64)
        return sd

    teacher, student = _backbone(teacher_seed), _backbone(student_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "channel": channel, "epoch": 3,
                "config": {"arch": arch, "epochs": 3}, "teacher": wrap(teacher),
                "student": wrap(student)}, path)
    return teacher, student


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_from_run_loads_teacher_by_default_and_student_on_request(tmp_path):
    run = tmp_path / "run"
    expected = {c: _our_checkpoint(run / c / "checkpoint.pth", c, i, 10 + i)
                for i, c in enumerate(("Actin", "DAPI"))}
    models = ModelSet.from_run(run)
    assert models.channels == ("DAPI", "Actin")  # BBBC021 order, whatever the folder order
    assert models.kind == "trained"
    for c in ("DAPI", "Actin"):
        assert _same(models[c].model, expected[c][0])
        assert not _same(models[c].model, expected[c][1])
    students = ModelSet.from_run(run, ["DAPI"], which="student")
    assert _same(students["DAPI"].model, expected["DAPI"][1])
    assert models.embed_dim == 128
    with pytest.raises(CheckpointError, match=r"no model for \['Tubulin'\]"):
        ModelSet.from_run(run, ["DAPI", "Tubulin"])


def test_from_files_accepts_run_folder_channel_folder_and_file(tmp_path):
    run = tmp_path / "run"
    t_dapi, _ = _our_checkpoint(run / "DAPI" / "checkpoint.pth", "DAPI", 1, 2)
    t_tub, _ = _our_checkpoint(run / "Tubulin" / "checkpoint.pth", "Tubulin", 3, 4)
    t_act, _ = _our_checkpoint(tmp_path / "actin.pth", "Actin", 5, 6)
    models = ModelSet.from_files({"DAPI": run, "Tubulin": run / "Tubulin", "Actin": tmp_path / "actin.pth"})
    assert models.channels == ("DAPI", "Tubulin", "Actin")
    assert _same(models["DAPI"].model, t_dapi)
    assert _same(models["Tubulin"].model, t_tub)
    assert _same(models["Actin"].model, t_act)


def test_checkpoint_of_another_channel_is_refused(tmp_path):
    _our_checkpoint(tmp_path / "actin.pth", "Actin", 0, 1)
    with pytest.raises(ChannelMismatchError, match="channel 'Actin', not 'DAPI'"):
        ModelSet.from_files({"DAPI": tmp_path / "actin.pth"})
    _our_checkpoint(tmp_path / "run" / "DAPI" / "checkpoint.pth", "Actin", 0, 1)
    with pytest.raises(ChannelMismatchError):
        ModelSet.from_run(tmp_path / "run", ["DAPI"])


def test_model_set_refuses_images_of_channels_it_does_not_serve():
    models = ModelSet.random(ARCH, ("DAPI", "Actin"), seed=0)
    models.check_channels(("Actin", "Tubulin", "DAPI"))
    with pytest.raises(ChannelMismatchError, match=r"no \['Actin'\]"):
        models.check_channels(("DAPI", "Tubulin"))
    with pytest.raises(ChannelMismatchError, match="No model for channel 'Tubulin'"):
        models["Tubulin"]


def test_arch_mismatch_and_missing_files_are_clear(tmp_path):
    _our_checkpoint(tmp_path / "dapi.pth", "DAPI", 0, 1)
    with pytest.raises(CheckpointError, match="holds a test_vit model"):
        load_channel_model("DAPI", tmp_path / "dapi.pth", arch="vit_tiny_patch16_224")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_channel_model("DAPI", tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="checkpoint.pth"):
        load_channel_model("DAPI", tmp_path)  # a folder without a checkpoint


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_files_needing_pickled_code_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    sd = _backbone(0).state_dict()
    sd["payload"] = _Evil()
    torch.save(sd, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_channel_model("DAPI", path, arch=ARCH)
    assert "pickled code ran" not in capsys.readouterr().out


def test_timm_rgb_and_dino_style_files_fold_into_grey(tmp_path):
    rgb = _backbone(7, in_chans=3)
    torch.save({"state_dict": rgb.state_dict()}, tmp_path / "timm.pth")
    # official DINO pretrained files are the bare backbone, sometimes with a module. prefix
    torch.save({f"module.{k}": v for k, v in rgb.state_dict().items()}, tmp_path / "dino.pth")
    for name in ("timm.pth", "dino.pth"):
        entry = load_channel_model("Tubulin", tmp_path / name, arch=ARCH)
        w = entry.model.patch_embed.proj.weight
        assert w.shape[1] == 1
        assert torch.allclose(w, rgb.patch_embed.proj.weight.sum(dim=1, keepdim=True))
        # grey image through the folded model == grey replicated to RGB through the original
        x = torch.rand(2, 1, 32, 32)
        with torch.no_grad():
            assert torch.allclose(entry.model(x), rgb.eval()(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_random_and_init_only_baselines(tmp_path):
    a = ModelSet.random(ARCH, ("DAPI", "Tubulin"), seed=0)
    b = ModelSet.random(ARCH, ("DAPI", "Tubulin"), seed=0)
    c = ModelSet.random(ARCH, ("DAPI", "Tubulin"), seed=1)
    assert a.kind == "random" and a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not _same(a["DAPI"].model, a["Tubulin"].model)

    init = _backbone(3, in_chans=3)
    torch.save(init.state_dict(), tmp_path / "imagenet.pth")
    models = ModelSet.init_only(ARCH, tmp_path / "imagenet.pth", ("DAPI", "Tubulin", "Actin"))
    assert models.kind == "init-only" and models.channels == ("DAPI", "Tubulin", "Actin")
    assert _same(models["DAPI"].model, models["Actin"].model)
    assert torch.equal(models["DAPI"].model.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)


def test_init_only_takes_a_checkpoint_of_another_stain(tmp_path):
    """A chained pretraining ends on one stain's checkpoint; as initial weights it serves
    every stain (init-only), while a trained model set still refuses it."""
    from napari_wsdino.core.model import CHECKPOINT_FORMAT
    from napari_wsdino.core.modelset import ChannelMismatchError

    net = _backbone(5)
    ckpt = {"format": CHECKPOINT_FORMAT, "channel": "Actin", "config": {"arch": ARCH},
            "teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()}}
    torch.save(ckpt, tmp_path / "pre.pth")
    models = ModelSet.init_only(ARCH, tmp_path / "pre.pth", ("DAPI", "Tubulin", "Actin"))
    assert models.channels == ("DAPI", "Tubulin", "Actin")
    assert torch.equal(models["DAPI"].model.cls_token, net.cls_token)
    with pytest.raises(ChannelMismatchError, match="channel 'Actin', not 'DAPI'"):
        ModelSet.from_files({"DAPI": tmp_path / "pre.pth"})


def test_safetensors_export_round_trip_keeps_channels(tmp_path):
    models = ModelSet.random(ARCH, ("DAPI", "Actin"), seed=2)
    files = models.export_safetensors(tmp_path / "st")
    assert [f.name for f in files] == ["DAPI.safetensors", "Actin.safetensors"]
    back = ModelSet.from_files({"DAPI": files[0], "Actin": files[1]})
    assert back.fingerprint() == models.fingerprint()
    assert back["DAPI"].arch == ARCH
    with pytest.raises(ChannelMismatchError):
        ModelSet.from_files({"Actin": files[0]})


def test_parse_model_specs():
    assert parse_model_specs(["DAPI=runs/a", "Actin=x=1.pth"]) == {"DAPI": "runs/a", "Actin": "x=1.pth"}
    with pytest.raises(ValueError, match="CHANNEL=RUN_OR_FILE"):
        parse_model_specs(["runs/a"])
    with pytest.raises(ValueError, match="twice"):
        parse_model_specs(["DAPI=a", "DAPI=b"])


def test_training_input_normalisation_is_recorded_and_applied(tmp_path):
    from napari_wsdino.core.embed import embed_fields
    import numpy as np

    teacher, _ = _our_checkpoint(tmp_path / "d.pth", "DAPI", 0, 1)
    ckpt = torch.load(tmp_path / "d.pth", weights_only=True)
    ckpt["config"].update(input_mean=0.25, input_std=0.5)
    torch.save(ckpt, tmp_path / "d.pth")
    models = ModelSet.from_files({"DAPI": tmp_path / "d.pth"})
    entry = models["DAPI"]
    assert (entry.input_mean, entry.input_std) == (0.25, 0.5)
    img = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    got = embed_fields(models, {"DAPI": img}, crop=16)
    plain = ModelSet({"DAPI": type(entry)("DAPI", teacher, ARCH, "plain")})
    expected = embed_fields(plain, {"DAPI": (img - 0.25) / 0.5}, crop=16)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, embed_fields(plain, {"DAPI": img}, crop=16), atol=1e-3)
    # kept through a safetensors export
    back = ModelSet.from_files({"DAPI": models.export_safetensors(tmp_path / "st")[0]})
    assert (back["DAPI"].input_mean, back["DAPI"].input_std) == (0.25, 0.5)
    assert back.fingerprint() == models.fingerprint()
