"""Embedding throughput: fields per second through ``core.embed.embed_cache``.

Builds a throw-away cache of random fields in a temporary folder, embeds it with a
random-initialised model set (weights do not change the speed), and prints fields/s,
crops/s and the forward FLOPs per field (counted with ``torch.utils.flop_counter``:
four crops x channels; one multiply-add = 2 FLOPs).

CPU, tiny ViT (what runs on a laptop or CI)::

    OMP_NUM_THREADS=1 python benchmarks/bench_embed.py --arch test_vit --size 128 160 --crop 64

GPU, the paper's settings (ViT-S/8, 224-px crops, 3 channels; CUDA + bf16 autocast)::

    python benchmarks/bench_embed.py --arch vit_small_patch8_224 --size 512 640 --crop 224 \
        --fields 1024 --batch-size 64 --device cuda

Results go to ``benchmarks/RESULTS.md`` (machine and date in each section).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.embed import crop_geometry, embed_cache
from napari_wsdino.core.metadata import CHANNELS, treatment_name
from napari_wsdino.core.model import pick_device
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.progress import run_to_end


def _cache(root: Path, n: int, size: tuple[int, int], channels) -> object:
    table = pd.DataFrame({
        "plate": "P1", "batch": "Week1", "well": [f"B{i:03d}" for i in range(n)], "site": 1,
        "replicate": 1, "compound": "DMSO", "concentration": 0.0,
        "treatment": treatment_name("DMSO", 0.0), "moa": "DMSO",
    })
    rng = np.random.default_rng(0)
    images = {c: rng.random((n, *size), dtype=np.float32) for c in channels}
    return write_cache(root / "cache", table, images)


def flops_per_field(models: ModelSet, size: tuple[int, int], crop: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for entry in models:
        side, _ = crop_geometry(size, crop, entry.patch_size)
        x = torch.zeros(4, 1, side, side)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            entry.model.cpu()(x)
        total += counter.get_total_flops()
    return int(total)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="test_vit")
    p.add_argument("--fields", type=int, default=64)
    p.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channels", nargs="+", default=list(CHANNELS))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size)
    models = ModelSet.random(args.arch, args.channels, seed=0)
    flops = flops_per_field(models, size, args.crop)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cache = _cache(Path(tmp), args.fields, size, args.channels)
        # warm-up (allocations, cuDNN/oneDNN choices) on one batch
        run_to_end(embed_cache(cache, models, None, crop=args.crop, batch_size=args.batch_size,
                               device=str(device), indices=range(min(args.batch_size, args.fields))))
        rates = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_to_end(embed_cache(cache, models, None, crop=args.crop, batch_size=args.batch_size,
                                   device=str(device)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(args.fields / (time.perf_counter() - t0))
    side = crop_geometry(size, args.crop, models[args.channels[0]].patch_size)[0]
    best = max(rates)
    print(f"arch={args.arch} device={device} threads={torch.get_num_threads()} fields={args.fields} "
          f"field={size[0]}x{size[1]} crop={side} channels={len(args.channels)} batch={args.batch_size}")
    print(f"fields/s: best {best:.2f}, median {np.median(rates):.2f} over {args.repeats} runs; "
          f"crops/s {best * 4 * len(args.channels):.1f}")
    print(f"forward FLOPs per field: {flops / 1e9:.3f} GFLOP "
          f"(4 crops x {len(args.channels)} channels); {best * flops / 1e9:.2f} GFLOP/s achieved")


if __name__ == "__main__":
    main()
