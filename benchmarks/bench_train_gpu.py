"""Training throughput of the real engine on a GPU at the paper's settings, with MFU.

Runs :func:`napari_wsdino.core.train.train` (WS-DINO, compound label, ViT-S/8, 2 global
224-px + 8 local 96-px crops, head of 65,536 outputs, batch 16 unless told otherwise) on
a synthetic cache of BBBC021's size (2,528 annotated fields of 512 x 640, float16, kept
on the GPU), times fields per second after a warm-up, counts the model FLOPs of one
training step with :class:`torch.utils.flop_counter.FlopCounterMode` (teacher forward on
the global crops, student forward + backward on all crops, loss; a multiply-add counts
2), and reports model FLOP utilisation against the card's dense bf16 peak.

It also projects the paper's full protocol — 3 channels x 400 epochs x 2,528 fields —
from the measured rate (goal on one H100: under 1.5 hours).

Run (on a machine with a GPU)::

    python benchmarks/bench_train_gpu.py                      # paper settings
    python benchmarks/bench_train_gpu.py --batch-size 64 --compile
    torchrun --nproc_per_node 2 benchmarks/bench_train_gpu.py  # the paper used 2 GPUs

``--flops-only`` prints the FLOP count without a GPU (on the meta device).
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_wsdino.core.dino import DINOLoss
from napari_wsdino.core.train import N_GLOBAL, TrainConfig, build_models, train

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0}


def step_flops_per_field(config: TrainConfig) -> float:
    """Model FLOPs of one training step per field (shape-based; counted on ``meta``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        student, teacher = build_models(config.replace(init=""))
        loss_fn = DINOLoss(config.out_dim, N_GLOBAL + config.local_crops)
        views = [torch.randn(1, 1, config.global_size, config.global_size)] * N_GLOBAL
        views += [torch.randn(1, 1, config.local_size, config.local_size)] * config.local_crops
        counter = FlopCounterMode(display=False)
        with counter:
            with torch.no_grad():
                t_out = teacher(views[:N_GLOBAL])
            loss_fn(student(views), t_out, config.teacher_temp).backward()
    return float(counter.get_total_flops())


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def make_cache(root: Path, n: int, size: tuple[int, int]):
    from napari_wsdino.core.cache import write_cache
    from napari_wsdino.core.metadata import bundled_metadata_dir, load_metadata

    table = load_metadata(bundled_metadata_dir(), check_files=False).table
    table = table[table.moa != "DMSO"].reset_index(drop=True)
    table = table.iloc[np.resize(np.arange(len(table)), n)].reset_index(drop=True)
    rng = np.random.default_rng(0)
    imgs = rng.random((n, *size), dtype=np.float32).astype(np.float16)
    return write_cache(root, table, {"DAPI": imgs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small_patch8_224")
    ap.add_argument("--fields", type=int, default=2528)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 640), metavar=("H", "W"))
    ap.add_argument("--batch-size", type=int, default=16, help="per process (paper: 16)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    ap.add_argument("--peak-tflops", type=float, help="override the card's bf16 peak")
    ap.add_argument("--flops-only", action="store_true")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=400)
    args = ap.parse_args()

    config = TrainConfig(arch=args.arch, weak_label="compound", batch_size=args.batch_size,
                         epochs=1000, precision=args.precision, compile=args.compile,
                         checkpoint_every=1000, device="cuda" if not args.flops_only else "cpu")
    flops = step_flops_per_field(config)
    print(f"{args.arch}: {flops / 1e9:.1f} GFLOP per field per training step "
          f"(2 x {config.global_size} px + {config.local_crops} x {config.local_size} px crops)")
    if args.flops_only:
        return
    if not torch.cuda.is_available():
        raise SystemExit("No GPU visible: run with --flops-only, or on a machine with CUDA.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_rank = int(os.environ.get("RANK", "0")) == 0
    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp) / "cache", args.fields, tuple(args.size))
        times: list[float] = []
        gen = train(cache, config, Path(tmp) / "run",
                    stop=lambda: len(times) >= args.warmup + args.steps)
        for _ in gen:
            times.append(time.perf_counter())
    if not main_rank:
        return
    fields_s = args.steps * args.batch_size * world / (times[-1] - times[args.warmup - 1])
    achieved = flops * fields_s / 1e12
    peak = args.peak_tflops or peak_tflops(name)
    mfu = achieved / (peak * world) if peak else float("nan")
    hours = args.channels * args.epochs * 2528 / fields_s / 3600
    print(f"device: {world} x {name}, precision {args.precision}, compile {args.compile}")
    print(f"throughput: {fields_s:.1f} fields/s ({1000 * args.batch_size * world / fields_s:.1f} ms "
          f"per step of {args.batch_size} x {world})")
    print(f"achieved: {achieved:.1f} TFLOP/s; MFU {100 * mfu:.1f}% of {peak} TFLOP/s per GPU")
    print(f"paper protocol ({args.channels} channels x {args.epochs} epochs x 2,528 fields): "
          f"{hours:.2f} h")
    print(f"| {world} x {name} | {args.arch} | {args.batch_size} | {args.precision} | "
          f"{args.compile} | {fields_s:.1f} | {achieved:.1f} | {100 * mfu:.1f}% | {hours:.2f} h "
          f"| {datetime.date.today()} |")


if __name__ == "__main__":
    main()
