"""Issue 14: recipes bundle settings; --print-config shows them; weights required where
the paper starts from ImageNet; multi-GPU epochs replicated as WS-DINO's sampler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
import torch
from train_helpers import make_cache, tiny_config

from napari_wsdino.cli import main
from napari_wsdino.core import recipes
from napari_wsdino.core.preprocess import PreprocessSettings
from napari_wsdino.core.train import TrainConfig, describe_data, load_checkpoint


def _printed(capsys, *argv) -> dict:
    assert main(["train", "--print-config", *argv]) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_print_config_paper_code_shows_every_official_element(capsys):
    cfg = _printed(capsys, "--recipe", "paper-code")
    assert cfg["recipe"] == "paper-code"
    t, p, e, v = cfg["train"], cfg["preprocess"], cfg["embed"], cfg["evaluate"]
    assert t["min_lr"] == 3e-6 and t["precision"] == "fp32"
    assert t["init_parts"] == "full" and t["epoch_split"] == "replicate"
    assert (p["normalize"], p["clip"], p["borders"]) == ("paper", 10000.0, "in-image")
    assert (e["windows"], e["median"], e["l2"]) == ("official", "lower", False)
    assert (v["tvn"], v["nscb_multibatch"]) == ("per-channel", "official")
    # The rest is the paper's, shared with the default recipe.
    assert t["lr"] == 4e-6 and t["epochs"] == 400 and t["batch_size"] == 16


def test_default_recipe_is_the_unchanged_behaviour(capsys):
    # The default recipe written out: the WS-DINO paper's hyper-parameters (Cross-Zamirski
    # et al. 2022, DINO's ViT-S/8) and this package's own choices. Changing a value here
    # changes what `wsdino train` does with no flags: do it on purpose, in this list.
    train = {
        "channel": "", "weak_label": "compound", "dmso": "exclude", "balance": True,
        "arch": "vit_small_patch8_224", "init": "", "drop_path_rate": 0.1,
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256,
        "norm_last_layer": False, "freeze_last_layer": 1,
        "student_temp": 0.07, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0, "center_momentum": 0.8, "momentum_teacher": 0.99,
        "lr": 4e-06, "min_lr": 1e-06, "warmup_epochs": 10, "weight_decay": 0.0,
        "clip_grad": 0.0, "batch_size": 16, "epochs": 400,
        "local_crops": 8, "global_size": 224, "local_size": 96,
        "global_scale": [0.1, 0.2], "local_scale": [0.04, 0.08], "flip_p": 0.5,
        "input_mean": 0.0, "input_std": 1.0, "seed": 0,
        "checkpoint_every": 10, "snapshot_every": 0,
        "device": "auto", "precision": "auto", "preload": "auto", "compile": False,
        "crop_centres": "uniform", "nuclei_channel": "", "rotate90": False,
        "intensity_jitter": 0.0, "teacher_centering": "centre",
        "init_parts": "backbone", "epoch_split": "shard", "pos_embed": "timm",
    }
    cfg = _printed(capsys)
    assert cfg["recipe"] == "default"
    assert cfg["train"] == train
    # A TrainConfig made in code, with no recipe named, trains the same way.
    assert tomllib.loads(TrainConfig().to_toml())["train"] == train
    assert cfg["preprocess"] == {"clip": 10000.0, "filter_size": 320.0, "normalize": "zscore",
                                 "illumination": "fast", "borders": "reflect"}
    assert PreprocessSettings().normalize == "zscore"
    assert cfg["embed"] == {"crop": 224, "windows": "centre", "median": "mean-middle",
                            "l2": True, "precision": "auto", "pos_embed": "timm"}
    assert cfg["evaluate"] == {"tvn": "paper", "nscb_multibatch": "exempt"}


def test_flags_and_files_win_over_the_recipe(capsys, tmp_path):
    cfg = _printed(capsys, "--recipe", "paper-code", "--precision", "bf16",
                   "--set", "min_lr=1e-6")
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["min_lr"] == 1e-6
    assert cfg["embed"]["windows"] == "official"  # untouched elements stay the recipe's
    f = tmp_path / "mine.toml"
    f.write_text("[train]\nepochs = 7\n")
    cfg = _printed(capsys, "--recipe", "paper-code", "--config", str(f))
    assert cfg["train"]["epochs"] == 7 and cfg["train"]["min_lr"] == 3e-6
    assert recipes.resolve("paper-code", evaluate={"tvn": "paper"}).evaluate.tvn == "paper"
    with pytest.raises(ValueError, match="recipe"):
        recipes.resolve("paper-text")


def test_paper_code_refuses_random_weights_unless_said(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache", per_compound=4, size=32)
    code = main(["train", str(cache.path), "--recipe", "paper-code", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--init" in err and "random" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(recipes.InitRequired):
        recipes.check_init("", True, "the gpu preset")
    recipes.check_init("random", True, "the gpu preset")  # said out loud: fine
    recipes.check_init("", False, "--recipe default")


def test_replicated_epoch_steps(tmp_path, monkeypatch):
    """Two processes: sharded, each draws half the fields per epoch; replicated (the
    official WeightedRandomSampler without DistributedSampler), each draws them all."""
    cache = make_cache(tmp_path / "cache", per_compound=8, size=32)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shard = describe_data(cache, tiny_config(batch_size=4))
    repl = describe_data(cache, tiny_config(batch_size=4, epoch_split="replicate"))
    assert shard["steps_per_epoch"] == -(-shard["fields"] // 2) // 4
    assert repl["steps_per_epoch"] == shard["fields"] // 4


WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from train_helpers import tiny_config
    from napari_wsdino.core import train as T
    from napari_wsdino.core.progress import run_to_end

    rows = []
    batch = T.FieldSource.batch
    def spy_batch(self, r):
        rows.append(np.asarray(r).copy())
        return batch(self, r)
    T.FieldSource.batch = spy_batch
    rank = int(os.environ["RANK"])
    run_to_end(T.train({cache!r}, tiny_config(epochs=1, batch_size=4, epoch_split="replicate"),
                       {out!r}))
    np.save(os.path.join({out!r}, f"rows{{rank}}.npy"), np.concatenate(rows))
    """
)


@pytest.mark.slow
def test_two_processes_each_draw_the_whole_epoch(tmp_path):
    """As WS-DINO's script (one WeightedRandomSampler per process, every process seeded
    alike by DINO's fix_random_seeds): both ranks draw the same whole-dataset epoch."""
    cache = make_cache(tmp_path / "cache", per_compound=4, size=32)
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__), cache=str(cache.path),
                                    out=str(out)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", str(script)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    r0, r1 = np.load(out / "rows0.npy"), np.load(out / "rows1.npy")
    fields = ckpt["data"]["fields"]
    assert ckpt["steps_per_epoch"] == fields // 4
    assert len(r0) == 2 * (fields // 4) * 4  # global and partner rows of a whole epoch each
    assert np.array_equal(r0, r1)
    assert torch.is_tensor(ckpt["dino_loss"]["center"])


def test_gpu_preset_and_paper_code_refuse_random_weights_in_demo_and_study(tmp_path, capsys):
    """Issue 14: the gpu preset starts from ImageNet weights; without --init it stops with
    a message (exit 2, nothing written), in the demo and the study alike."""
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--gpu", "--device", "cpu"]) == 2
    assert "--init" in capsys.readouterr().err and not out.exists()
    assert main(["demo", str(out), "--preset", "test", "--recipe", "paper-code"]) == 2
    assert "paper-code" in capsys.readouterr().err and not out.exists()
    cache = make_cache(tmp_path / "cache", per_compound=4, size=32)
    study = tmp_path / "study"
    assert main(["study", str(cache.path), "--out", str(study), "--preset", "gpu"]) == 2
    assert "--init random" in capsys.readouterr().err and not study.exists()
    # Chosen by the cache's field size, the gpu preset says so when it refuses.
    big = make_cache(tmp_path / "big", per_compound=1, size=448)
    assert main(["study", str(big.path), "--out", str(study)]) == 2
    err = capsys.readouterr().err
    assert "preset gpu (chosen for the cache's 448 x 448 px fields" in err
    assert "--init random" in err and not study.exists()


def test_paper_code_embeds_in_fp32_and_trains_without_tf32_on_cuda():
    """Issue 29: the official code embeds and trains in fp32 (``--use_fp16 False``);
    under paper-code the precision chosen for a CUDA device is no autocast and no TF32,
    while the default recipe keeps bf16 autocast and TF32 (no GPU needed to check)."""
    from contextlib import nullcontext

    from napari_wsdino.core.embed.features import embed_autocast
    from napari_wsdino.core.model import allows_tf32, autocast_dtype

    paper, ours = recipes.resolve("paper-code"), recipes.resolve()
    cuda = torch.device("cuda")
    assert (paper.embed.precision, paper.train.precision) == ("fp32", "fp32")
    assert autocast_dtype(cuda, paper.embed.precision) is None
    assert autocast_dtype(cuda, paper.train.precision) is None
    assert isinstance(embed_autocast(cuda, paper.embed.precision), nullcontext)
    assert not allows_tf32(paper.train.precision)
    assert autocast_dtype(cuda, ours.embed.precision) == torch.bfloat16
    assert autocast_dtype(cuda, ours.train.precision) == torch.bfloat16
    assert autocast_dtype("cpu", ours.embed.precision) is None and allows_tf32(ours.train.precision)
    assert (paper.embed.pos_embed, ours.embed.pos_embed) == ("dino", "timm")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_embedding_runs_in_the_precision_asked_for(precision, dtype):
    """The precision reaches the forward pass: the dtype of a linear layer's output, seen by a
    hook (CPU autocast stands in for CUDA's, chosen by the same function)."""
    from napari_wsdino.core.embed import embed_channel
    from napari_wsdino.core.model import create_backbone

    vit = create_backbone("test_vit").eval()
    seen = []
    vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    images = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    feats = embed_channel(vit, images, crop=32, patch=16, precision=precision)
    assert set(seen) == {dtype} and feats.dtype == np.float32


def test_print_config_says_what_each_precision_is_and_why(capsys):
    assert main(["train", "--print-config", "--recipe", "paper-code"]) == 0
    out = capsys.readouterr().out
    cfg = tomllib.loads(out)
    assert (cfg["embed"]["precision"], cfg["embed"]["pos_embed"]) == ("fp32", "dino")
    assert "TF32 off (the official code" in out and "bf16 autocast and TF32" in out
    assert "dino = DINO's interpolate_pos_encoding" in out
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        recipes.resolve(embed={"pos_embed": "nearest"})


def test_paper_code_trains_and_embeds_with_dinos_position_interpolation(tmp_path):
    from napari_wsdino.core.embed import embed_cache
    from napari_wsdino.core.model import pos_embed_mode
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.train.setup import build_models

    config = TrainConfig(**{**recipes.get_recipe("paper-code").train, "init_parts": "backbone"},
                         arch="test_vit", out_dim=64, hidden_dim=32, bottleneck_dim=16)
    student, teacher = build_models(config)
    assert pos_embed_mode(student.backbone) == pos_embed_mode(teacher.backbone) == "dino"
    assert pos_embed_mode(build_models(config.replace(pos_embed="timm"))[0].backbone) == "timm"
    cache = make_cache(tmp_path / "cache")
    models = ModelSet.random("test_vit", cache.channels, seed=0)
    e = recipes.resolve("paper-code").embed
    kw = dict(windows=e.windows, median=e.median, l2=e.l2, crop=32)
    ours = run_to_end(embed_cache(cache, models, **kw))
    dino = run_to_end(embed_cache(cache, models, precision=e.precision, pos_embed=e.pos_embed, **kw))
    assert not np.allclose(ours.features, dino.features)
