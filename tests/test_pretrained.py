"""The bundled pretrained weights: found by name, loaded into the cpu preset's models,
serving every stain, and refused where they do not fit. The official DINO weights by
name (issue 29): fetched from a loopback server or a prepared cache, never the network."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import socket
import threading
import time

import numpy as np
import pytest
import torch

from loopback import loopback

from napari_wsdino.core.errors import CheckpointError
from napari_wsdino.core.model import create_backbone, read_checkpoint
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.presets import PRESETS
from napari_wsdino.core.pretrained import (BUNDLED, OFFICIAL, bundled_arch, cached_official,
                                           resolve_weights, slim_init, weights_exist)
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


# -- the official DINO weights by name (issue 29) ----------------------------------------
FULL = "dino-vits8-full"
FULL_FILE = "dino_deitsmall8_pretrain_full_checkpoint.pth"
HUB_REPO = "models--timm--vit_small_patch8_224.dino"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """torch.hub's and huggingface_hub's caches in tmp_path, the hub offline: no test
    reaches the network."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def _rgb_test_vit():
    torch.manual_seed(4)
    return create_backbone("test_vit", in_chans=3).eval()


def _as_test_vit(monkeypatch, name, **changes):
    """The official entry made for the tiny test ViT (the real files are ViT-S/8's)."""
    monkeypatch.setitem(OFFICIAL, name, dataclasses.replace(OFFICIAL[name], arch="test_vit",
                                                            **changes))


def _same_as_rgb(model, rgb):
    grey = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(grey), rgb(grey.expand(-1, 3, -1, -1)),
                                   rtol=1e-5, atol=1e-5)


def test_official_names_are_listed_with_the_dino_vits8_architecture():
    assert set(OFFICIAL) == {"dino-vits8", FULL}
    assert {bundled_arch(n) for n in OFFICIAL} == {"vit_small_patch8_224"}
    assert OFFICIAL[FULL].url.endswith("dino_deitsmall8_pretrain/" + FULL_FILE)
    assert OFFICIAL["dino-vits8"].hub_repo() == ("timm/vit_small_patch8_224.dino", None)


def test_full_checkpoint_is_downloaded_once_into_torch_hubs_cache(caches, monkeypatch):
    """``--init dino-vits8-full``: fetched from its address (here a loopback server) into
    torch.hub's checkpoints folder on first use, read from there afterwards, and loaded
    by training and by the init-only baseline."""
    from napari_wsdino.core.train import TrainConfig
    from napari_wsdino.core.train.setup import build_models

    rgb = _rgb_test_vit()
    served = caches / "served"
    served.mkdir()
    sd = rgb.state_dict()
    torch.save({"student": {f"module.backbone.{k}": v for k, v in sd.items()},
                "teacher": {f"backbone.{k}": v for k, v in sd.items()}}, served / FULL_FILE)
    with loopback(served) as (address, hits):
        _as_test_vit(monkeypatch, FULL, url=f"{address}/{FULL_FILE}")
        assert weights_exist(FULL) and cached_official(FULL) is None  # known, not fetched
        path = resolve_weights(FULL)
        assert path == caches / "torch" / "hub" / "checkpoints" / FULL_FILE
        assert path.read_bytes() == (served / FULL_FILE).read_bytes()
        student, teacher = build_models(TrainConfig(arch="test_vit", init=FULL, out_dim=64,
                                                    hidden_dim=32, bottleneck_dim=16))
        _same_as_rgb(teacher.backbone.eval(), rgb)
        models = ModelSet.init_only("vit_small_patch8_224", FULL, ["DAPI", "Actin"])
        _same_as_rgb(models["Actin"].model, rgb)
        assert models["Actin"].source == f"init-only official {FULL}"  # not "bundled"
        assert hits == [f"/{FULL_FILE}"]  # one download, then the cache
    assert cached_official(FULL) == path


def test_backbone_is_read_from_huggingface_hubs_cache(caches, monkeypatch):
    """``--init dino-vits8``: timm's hub file found in huggingface_hub's cache (a prepared
    cache folder here, offline), read as safetensors and folded to one grey channel."""
    from safetensors.torch import save_file

    rgb = _rgb_test_vit()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = caches / "hf" / HUB_REPO
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()},
              str(snapshot / "model.safetensors"), metadata={"format": "pt"})
    _as_test_vit(monkeypatch, "dino-vits8")
    assert resolve_weights("dino-vits8") == snapshot / "model.safetensors"
    assert OFFICIAL["dino-vits8"].cache_path() == repo
    assert "pos_embed" in read_checkpoint("dino-vits8")
    _same_as_rgb(ModelSet.init_only("test_vit", "dino-vits8", ["DAPI"])["DAPI"].model, rgb)


def test_offline_the_message_names_the_file_and_where_to_put_it(caches, monkeypatch):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _as_test_vit(monkeypatch, FULL, url=f"http://127.0.0.1:{port}/{FULL_FILE}")
    with pytest.raises(CheckpointError) as err:
        resolve_weights(FULL)
    message = str(err.value)
    assert "\n" not in message and FULL_FILE in message
    assert str(caches / "torch" / "hub" / "checkpoints" / FULL_FILE) in message
    assert not (caches / "torch" / "hub" / "checkpoints" / FULL_FILE).exists()
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("dino-vits8")
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message
    assert str(caches / "hf" / HUB_REPO) in message and "--init" in message


# -- the same fetch as a progress generator (the Load models panel's) ---------------------
def _served_full(caches, size=3_000_000):
    """A file of ``size`` bytes under the full checkpoint's name, to be served."""
    served = caches / "served"
    served.mkdir(exist_ok=True)
    (served / FULL_FILE).write_bytes(np.random.default_rng(0).bytes(size))
    return served


def _partials(caches):
    return [p.name for p in (caches / "torch").rglob("*") if p.is_file()]


def test_download_official_reports_bytes_and_caches(caches, monkeypatch):
    from napari_wsdino.core.pretrained import download_official

    served = _served_full(caches)
    with loopback(served) as (address, hits):
        _as_test_vit(monkeypatch, FULL, url=f"{address}/{FULL_FILE}")
        gen = download_official(FULL)
        events = []
        try:
            while True:
                events.append(next(gen))
        except StopIteration as stop:
            path = stop.value
        assert path == caches / "torch" / "hub" / "checkpoints" / FULL_FILE
        assert path.read_bytes() == (served / FULL_FILE).read_bytes()
        assert events[-1].step == events[-1].total == 3_000_000
        assert [e.step for e in events] == sorted(e.step for e in events)
        assert events[-1].info["file"] == FULL_FILE and not events[-1].info["cached"]
        # cached now: one event, no request
        again = list(download_official(FULL))
        assert len(again) == 1 and again[0].info["cached"] and hits == [f"/{FULL_FILE}"]
    assert _partials(caches) == [FULL_FILE]


def test_closing_download_official_stops_and_keeps_no_partial_file(caches, monkeypatch):
    from napari_wsdino.core.pretrained import download_official

    served = _served_full(caches)
    with loopback(served, delay=0.01) as (address, _hits):  # 3 MB in 0.5 s
        _as_test_vit(monkeypatch, FULL, url=f"{address}/{FULL_FILE}")
        gen = download_official(FULL)
        for event in gen:
            if event.step > 0:
                break
        assert any(p.endswith(".partial") for p in _partials(caches))
        gen.close()
    assert _partials(caches) == [] and cached_official(FULL) is None


def test_download_official_offline_names_the_file_and_where(caches, monkeypatch):
    from napari_wsdino.core.pretrained import download_official

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _as_test_vit(monkeypatch, FULL, url=f"http://127.0.0.1:{port}/{FULL_FILE}")
    with pytest.raises(CheckpointError) as err:
        list(download_official(FULL, by_hand="choose that file by hand"))
    message = str(err.value)
    assert "\n" not in message and FULL_FILE in message and "--init" not in message
    assert str(caches / "torch" / "hub" / "checkpoints" / FULL_FILE) in message
    assert "choose that file by hand" in message and _partials(caches) == []
    with pytest.raises(CheckpointError, match="model.safetensors"):  # hub offline
        list(download_official("dino-vits8"))


@contextlib.contextmanager
def _loopback_hub(body, delay=0.0):
    """A stand-in for the Hugging Face hub on 127.0.0.1: answers huggingface_hub's
    metadata request (commit, ETag, size) and serves ``body`` as any file."""
    commit = "0123456789abcdef0123456789abcdef01234567"

    class Handler(http.server.BaseHTTPRequestHandler):
        def _head(self):
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", '"fake-etag"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def do_HEAD(self):
            self._head()

        def do_GET(self):
            self._head()
            try:
                for start in range(0, len(body), 1 << 16):
                    self.wfile.write(body[start:start + (1 << 16)])
                    time.sleep(delay)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", commit
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub_online(caches, monkeypatch):
    """huggingface_hub online, its address to be set by the test (never the real hub)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # 10 MB: one report

    def point_at(address):
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            address + "/{repo_id}/resolve/{revision}/{filename}")
    return point_at


def test_download_official_backbone_through_huggingface_hub(caches, hub_online, monkeypatch):
    """``dino-vits8`` through huggingface_hub (its cache layout, its temporary file),
    bytes relayed from its progress bar; closing stops it and leaves no partial file."""
    from safetensors.torch import save
    from napari_wsdino.core.pretrained import download_official

    rgb = _rgb_test_vit()
    body = save({k: v.contiguous() for k, v in rgb.state_dict().items()},
                {"format": "pt", "pad": "x" * 2_000_000})  # 2 MB to download
    _as_test_vit(monkeypatch, "dino-vits8")
    repo = caches / "hf" / HUB_REPO
    with _loopback_hub(body, delay=0.01) as (address, commit):
        hub_online(address)
        gen = download_official("dino-vits8")
        assert next(gen).step == 0
        next(e for e in gen if e.step > 0)
        gen.close()
        assert not [p for p in repo.rglob("*") if p.is_file() and p.parent.name == "blobs"]
        assert cached_official("dino-vits8") is None

        events = []
        gen = download_official("dino-vits8")
        try:
            while True:
                events.append(next(gen))
        except StopIteration as stop:
            path = stop.value
    assert path == repo / "snapshots" / commit / "model.safetensors"
    assert path.read_bytes() == body and events[-1].step == events[-1].total == len(body)
    assert len(events) > 3 and cached_official("dino-vits8") == path
    _same_as_rgb(ModelSet.init_only("test_vit", "dino-vits8", ["DAPI"])["DAPI"].model, rgb)
