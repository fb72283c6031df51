"""Tune the ``cpu`` demo preset: train, embed and evaluate one configuration on a cache.

Each call trains WS-DINO (one model per channel) on an existing preprocessed cache with the
``cpu`` preset (or another) plus ``--set key=value`` overrides, embeds the fields with the
teacher, evaluates (TVN on DMSO, NSC / NSCB / mAP) and appends one JSON line to
``OUT/results.jsonl``: the settings, the last-epoch loss per channel next to ``ln(out_dim)``
(the loss of the uniform, collapsed output), NSC / NSCB and the CPU and wall time of training
and embedding. ``--baselines`` adds the random-init ViT and (with ``--data``) the classical
profile once, for comparison. Numbers are *synthetic replica* numbers.

Usage (the data and cache of ``wsdino demo``; results in ``benchmarks/RESULTS.md``)::

    wsdino synth /tmp/tune/data --subset mini --sites 2 --size 160 200 --seed 0
    wsdino preprocess /tmp/tune/data --out /tmp/tune/cache --size 160 200
    python benchmarks/tune_cpu_preset.py /tmp/tune/cache /tmp/tune/out --no-train \
        --baselines --data /tmp/tune/data                       # random-init ViT + classical
    python benchmarks/tune_cpu_preset.py /tmp/tune/cache /tmp/tune/out --name final_seed1 --seed 1
    python benchmarks/tune_cpu_preset.py /tmp/tune/cache /tmp/tune/out --channels DAPI \
        --name warm --set epochs=15 --set teacher_temp=0.07 --set warmup_teacher_temp_epochs=10

``--set`` values are JSON (``--set global_scale=[0.5,1.0]``); ``--channels DAPI`` makes a quick
one-channel probe. Set ``OMP_NUM_THREADS`` to compare runs: the thread count changes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _attention(cache, models) -> dict:
    """Attention-on-cells score per channel over evenly spaced fields."""
    from napari_wsdino.core.attention import cache_attention_on_cells

    return {ch: round(v, 3) for ch, v in cache_attention_on_cells(cache, models).items()}


def _evaluate(profiles) -> dict:
    from napari_wsdino.core.evaluation import evaluate_profiles

    d = evaluate_profiles(profiles, tvn="paper", drop_constant=True).to_dict()
    return {k: d[k] for k in ("nsc", "nscb", "map_nsc", "map_nscb", "n_nsc", "n_nscb")}


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def run_config(cache_dir: Path, out: Path, name: str, preset: str, overrides: dict,
               embed_crop: int | None, weak_label: str, seed: int,
               channels: list[str] | None = None, pooling: str = "cls",
               windows: str = "centre") -> dict:
    """Train, embed, evaluate one configuration; return the result row."""
    from napari_wsdino.core.cache import open_cache
    from napari_wsdino.core.embed import embed_cache
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.presets import resolve_preset
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.train import TrainConfig, train_channels

    cache = open_cache(cache_dir)
    p = resolve_preset(preset, **overrides)
    crop = embed_crop or p.embed_crop
    config = TrainConfig(weak_label=weak_label, seed=seed, device="cpu", **p.train)
    run = out / name
    c0, w0 = _clock()
    run_to_end(train_channels(cache, config, run / "run", channels, resume=True))
    c1, w1 = _clock()
    models = ModelSet.from_run(run / "run")
    profiles = run_to_end(embed_cache(
        cache, models, run / f"profiles_crop{crop}_{pooling}_{windows}.parquet", crop=crop,
        device="cpu", pooling=pooling, windows=windows))
    c2, w2 = _clock()
    losses = {}
    for ch in models.channels:
        lines = (run / "run" / ch / "log.jsonl").read_text().splitlines()
        losses[ch] = round(json.loads(lines[-1])["loss"], 4)
    row = {"name": name, "channels": list(models.channels), "preset": preset,
           "overrides": overrides, "embed_crop": crop,
           "weak_label": weak_label, "seed": seed, "cache_shape": list(cache.shape),
           "n_fields": len(cache.table), "final_loss": losses,
           "ln_out_dim": round(math.log(config.out_dim), 4),
           "train_cpu_s": round(c1 - c0, 1), "train_wall_s": round(w1 - w0, 1),
           "embed_cpu_s": round(c2 - c1, 1), "embed_wall_s": round(w2 - w1, 1),
           "torch_threads": torch.get_num_threads(), "pooling": pooling, "windows": windows,
           "attention_on_cells": _attention(cache, models), **_evaluate(profiles)}
    return row


def run_baselines(cache_dir: Path, out: Path, arch: str, crop: int, data: Path | None,
                  channels: list[str] | None = None, seed: int = 0,
                  pooling: str = "cls", windows: str = "centre") -> list[dict]:
    """Random-init ViT (same arch and crop) and, with ``data``, the classical profile."""
    from napari_wsdino.core.cache import open_cache
    from napari_wsdino.core.embed import embed_cache
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.profiles import ProfileTable
    from napari_wsdino.core.progress import run_to_end

    cache = open_cache(cache_dir)
    rows = []
    channels = channels or list(cache.channels)
    models = ModelSet.random(arch, channels, seed=seed)
    path = out / f"random_{arch}_crop{crop}_{pooling}_{windows}_{'-'.join(channels)}_seed{seed}.parquet"
    profiles = run_to_end(embed_cache(cache, models, path, crop=crop, device="cpu",
                                      pooling=pooling, windows=windows))
    rows.append({"name": f"random-init {arch}", "seed": seed, "channels": channels,
                 "embed_crop": crop, "pooling": pooling, "windows": windows,
                 "attention_on_cells": _attention(cache, models), **_evaluate(profiles)})
    if data is not None:
        from napari_wsdino.core.classical import dataset_features, feature_names
        from napari_wsdino.core.metadata import load_metadata

        meta = load_metadata(data)
        X = dataset_features(meta.table, meta.channels)
        profiles = ProfileTable.from_fields(meta.table, X, feature_names(meta.channels))
        rows.append({"name": "classical", "channels": list(meta.channels), **_evaluate(profiles)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", default=None, help="run name (default: from the overrides)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig override, JSON value (repeatable)")
    ap.add_argument("--embed-crop", type=int, default=None)
    ap.add_argument("--weak-label", default="compound")
    ap.add_argument("--seed", type=int, default=0, help="training seed (and random-init seed)")
    ap.add_argument("--channels", default=None, help="comma list (default: all); quick probes")
    ap.add_argument("--baselines", action="store_true", help="random-init ViT (+ classical)")
    ap.add_argument("--data", type=Path, default=None,
                    help="raw replica, for the classical profile")
    ap.add_argument("--no-train", action="store_true", help="baselines only")
    ap.add_argument("--pooling", default="cls", help="cls | cls+mean (embedding)")
    ap.add_argument("--windows", default="centre", help="centre | official | cells (embedding)")
    args = ap.parse_args(argv)

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    args.out.mkdir(parents=True, exist_ok=True)

    def emit(new):
        with open(args.out / "results.jsonl", "a") as fh:
            for row in new:
                fh.write(json.dumps(row, default=str) + "\n")
                print(json.dumps(row, default=str), flush=True)

    channels = args.channels.split(",") if args.channels else None
    if args.baselines:
        from napari_wsdino.core.presets import resolve_preset

        p = resolve_preset(args.preset, **overrides)
        emit(run_baselines(args.cache, args.out, p.train.get("arch", "vit_small_patch8_224"),
                           args.embed_crop or p.embed_crop, args.data, channels, args.seed,
                           args.pooling, args.windows))
    if not args.no_train:
        name = args.name or ("_".join(f"{k}-{v}" for k, v in overrides.items()) or args.preset)
        emit([run_config(args.cache, args.out, name, args.preset, overrides,
                         args.embed_crop, args.weak_label, args.seed, channels, args.pooling,
                         args.windows)])


if __name__ == "__main__":
    main()
