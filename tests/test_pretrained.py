"""The bundled pretrained weights: found by name, loaded into the cpu preset's models,
serving every stain, and refused where they do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wsdino.core.errors import CheckpointError
from napari_wsdino.core.model import read_checkpoint
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.presets import PRESETS
from napari_wsdino.core.pretrained import BUNDLED, resolve_weights, slim_init, weights_exist
from napari_wsdino.core.train import TrainConfig
from napari_wsdino.core.train.setup import build_models

NAME = "replica-dino-pico8-cells"


def test_every_bundled_file_ships_and_is_small():
    for name, bundled in BUNDLED.items():
        assert weights_exist(name) and bundled.path.stat().st_size < 4_000_000
        ckpt = read_checkpoint(name)                     # read by name, weights only
        assert ckpt["arch"] == bundled.arch and "channel" not in ckpt
        assert {k.split(".")[0] for k in ckpt["teacher"]} == {"backbone", "head"}


def test_cpu_preset_starts_from_the_bundled_weights():
    config = TrainConfig(**PRESETS["cpu"].train)
    assert config.init == NAME
    student, teacher = build_models(config)
    saved = read_checkpoint(NAME)["teacher"]
    for net in (student, teacher):
        state = net.state_dict()
        for key in ("backbone.cls_token", "backbone.blocks.3.attn.qkv.weight",
                    "head.mlp.0.weight", "head.last_layer.weight_v"):
            torch.testing.assert_close(state[key], saved[key].float())
    # ... and not from the seed's random draw.
    scratch, _ = build_models(config.replace(init="random"))
    assert not torch.allclose(scratch.state_dict()["backbone.cls_token"],
                              student.state_dict()["backbone.cls_token"])


def test_hires_preset_sees_the_same_cells_at_twice_the_resolution():
    """cpu-hires is the cpu recipe on fields of twice the side: its views keep their pixel
    size at native scale (a quarter of the area fraction, so a quarter of the cells), and
    its embedding's cell crops are twice as wide, holding the same cells as the cpu ones;
    it fine-tunes for fewer epochs, to embed those larger crops in the same time budget."""
    cpu, hires = PRESETS["cpu"], PRESETS["cpu-hires"]
    assert hires.image_size == hires.cache_size == tuple(2 * v for v in cpu.cache_size)
    assert hires.embed_crop == 2 * cpu.embed_crop
    for key in ("global_scale", "local_scale"):
        assert [round(4 * v, 6) for v in hires.train[key]] == list(cpu.train[key])
    assert hires.train["epochs"] < cpu.train["epochs"]
    changed = ("global_scale", "local_scale", "epochs")
    rest = {k: v for k, v in hires.train.items() if k not in changed}
    assert rest == {k: v for k, v in cpu.train.items() if k not in changed}
    assert TrainConfig(**hires.train).init == NAME


def test_bundled_weights_serve_every_stain_whatever_arch_is_asked():
    models = ModelSet.init_only("vit_small_patch8_224", NAME, ("DAPI", "Tubulin", "Actin"))
    assert set(models.archs.values()) == {BUNDLED[NAME].arch}
    img = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    out = [models[ch].model(torch.from_numpy(img)) for ch in models.channels]
    assert all(o.shape == (1, 96) and torch.isfinite(o).all() for o in out)
    assert torch.equal(out[0], out[2])                    # one model, every stain
    single = ModelSet.from_files({"Actin": NAME})
    assert single["Actin"].source.startswith("bundled")


def test_bundled_weights_refused_by_another_architecture():
    with pytest.raises(CheckpointError, match="another architecture"):
        build_models(TrainConfig(arch="test_vit", init=NAME))


def test_slim_init_keeps_only_the_teacher(tmp_path):
    full = {"teacher": {"backbone.w": torch.ones(2), "head.b": torch.zeros(1)},
            "student": {"backbone.w": torch.ones(2)}, "optimizer": {"state": {}}}
    slim = slim_init(full, "about", "test_vit")
    assert set(slim) == {"teacher", "arch", "about"}
    assert slim["teacher"]["backbone.w"].dtype == torch.float16
    torch.save(slim, tmp_path / "w.pth")
    assert str(resolve_weights(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
    assert not weights_exist(tmp_path / "missing.pth")


def test_bundled_weights_look_at_the_nuclei_of_a_generated_field():
    # The cpu preset's init was pretrained on cell-scale views: its CLS attention on a
    # whole replica field (a seed it never saw) sits on the DAPI foreground, several times
    # its area share; a random-init ViT of the same architecture spreads it evenly.
    from napari_wsdino.core.attention import attention_maps, attention_on_cells
    from napari_wsdino.core.synth import field_specs, render_spec

    specs = [s for s in field_specs("mini", sites=1, seed=7) if s["moa"] != "DMSO"][:3]
    fields = [render_spec(s, (160, 200), seed=7)[0].astype(np.float32) for s in specs]
    fields = [(f - f.mean()) / f.std() for f in fields]
    arch = BUNDLED[NAME].arch

    def score(model):
        return np.mean([attention_on_cells(attention_maps(model, f), f).score for f in fields])

    assert score(ModelSet.init_only(arch, NAME, ["DAPI"])["DAPI"].model) > 2.0
    assert 0.8 < score(ModelSet.random(arch, ["DAPI"], seed=0)["DAPI"].model) < 1.2
