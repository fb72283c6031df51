"""Training throughput on CPU: our engine vs a per-sample pipeline like the paper's code.

*Ours* is :func:`napari_wsdino.core.train.train` itself (WS-DINO, compound label): the
batch is gathered from the memory-mapped cache, all crops of the batch are cut and
resized in one ``grid_sample`` per crop size, and the backbone takes one grey channel
(RGB patch filters summed).

*Per-sample* follows the paper's published scripts (DINO's data pipeline): every field
is turned into an 8-bit RGB PIL image, each of its 2 + 8 views goes through
torchvision's ``RandomResizedCrop`` (bicubic) + flips + ``ToTensor`` + ``Normalize``,
the views are stacked, and the same DINO step runs on a 3-channel backbone.

Both use the same tiny ViT, head, loss, optimiser and EMA, so the difference is the data
path and the grey input. Fields per second are timed after a warm-up.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_train_cpu.py [--steps 20] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.dino import DINOHead, DINOLoss, MultiCropWrapper, ema_update
from napari_wsdino.core.metadata import bundled_metadata_dir, load_metadata
from napari_wsdino.core.model import create_backbone
from napari_wsdino.core.train import TrainConfig, train


def make_cache(root: Path, n: int, size: tuple[int, int], seed: int = 0):
    table = load_metadata(bundled_metadata_dir(), check_files=False).table
    table = table[table.moa != "DMSO"].head(n).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    imgs = rng.random((len(table), *size), dtype=np.float32)
    return write_cache(root, table, {"DAPI": imgs})


def bench_ours(cache, config: TrainConfig, steps: int, warmup: int, out: Path) -> float:
    times = []
    gen = train(cache, config, out, stop=lambda: len(times) >= warmup + steps)
    for _ in gen:
        times.append(time.perf_counter())
    return steps * config.batch_size / (times[-1] - times[warmup - 1])


def per_sample_transform(config: TrainConfig):
    """DINO-style torchvision transforms on PIL images, as the paper's code uses them."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC

    def view(size, scale):
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale, ratio=(1.0, 1.0), interpolation=bicubic),
            T.RandomHorizontalFlip(config.flip_p),
            T.RandomVerticalFlip(config.flip_p),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    g, l_ = view(config.global_size, config.global_scale), view(config.local_size, config.local_scale)
    return lambda img: [g(img), g(img)] + [l_(img) for _ in range(config.local_crops)]


def bench_per_sample(cache, config: TrainConfig, steps: int, warmup: int) -> float:
    from PIL import Image

    torch.manual_seed(0)
    images = cache.images("DAPI")
    student = MultiCropWrapper(
        create_backbone(config.arch, in_chans=3, drop_path_rate=config.drop_path_rate),
        DINOHead(64 if config.arch == "test_vit" else 384, config.out_dim, config.hidden_dim,
                 config.bottleneck_dim))
    teacher = MultiCropWrapper(create_backbone(config.arch, in_chans=3),
                               DINOHead(student.head.mlp[0].in_features, config.out_dim,
                                        config.hidden_dim, config.bottleneck_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = DINOLoss(config.out_dim, 2 + config.local_crops)
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    transform = per_sample_transform(config)
    rng = np.random.default_rng(0)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        rows = rng.integers(0, len(images), config.batch_size)
        per_field = []
        for r in rows:  # Dataset.__getitem__: one field at a time
            grey = np.asarray(images[r], dtype=np.float32)
            rgb = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).convert("RGB")
            per_field.append(transform(rgb))
        views = [torch.stack([f[v] for f in per_field]) for v in range(2 + config.local_crops)]
        with torch.no_grad():
            t_out = teacher(views[:2])
        loss = loss_fn(student(views), t_out, config.teacher_temp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(teacher, student, 0.996)
    return steps * config.batch_size / (time.perf_counter() - t0)


def bench_views(cache, config: TrainConfig, reps: int) -> tuple[float, float]:
    """Data path only (fields/s): ours (gather + batched crops) vs per-sample PIL."""
    from PIL import Image

    from napari_wsdino.core.train import FieldSource
    from napari_wsdino.core.views import multi_crop

    images = cache.images("DAPI")
    rng = np.random.default_rng(1)
    source = FieldSource(images, np.arange(len(images)), torch.device("cpu"), "memmap")
    gen = torch.Generator().manual_seed(0)
    transform = per_sample_transform(config)
    best_ours = best_theirs = 0.0
    for _ in range(reps):
        rows = rng.integers(0, len(images), config.batch_size)
        t0 = time.perf_counter()
        x = source.batch(rows)
        multi_crop(x, source.batch(rows[::-1].copy()), n_local=config.local_crops,
                   global_size=config.global_size, local_size=config.local_size,
                   global_scale=config.global_scale, local_scale=config.local_scale,
                   generator=gen)
        t1 = time.perf_counter()
        for r in rows:
            grey = np.asarray(images[r], dtype=np.float32)
            rgb = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).convert("RGB")
            transform(rgb)
        t2 = time.perf_counter()
        best_ours = max(best_ours, config.batch_size / (t1 - t0))
        best_theirs = max(best_theirs, config.batch_size / (t2 - t1))
    return best_ours, best_theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="test_vit")
    ap.add_argument("--fields", type=int, default=64)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 640), metavar=("H", "W"))
    ap.add_argument("--global-size", type=int, default=64)
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="alternate runs; best of each")
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md table row")
    args = ap.parse_args()
    config = TrainConfig(arch=args.arch, weak_label="compound", batch_size=args.batch_size,
                         epochs=1000, global_size=args.global_size, local_size=args.local_size,
                         out_dim=4096, hidden_dim=256, bottleneck_dim=64, device="cpu",
                         checkpoint_every=1000, lr=1e-4, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp) / "cache", args.fields, tuple(args.size))
        ours, theirs = 0.0, 0.0
        for rep in range(args.repeats):  # alternate: the machine's load drifts
            ours = max(ours, bench_ours(cache, config, args.steps, args.warmup,
                                        Path(tmp) / f"run{rep}"))
            theirs = max(theirs, bench_per_sample(cache, config, args.steps, args.warmup))
        views_ours, views_theirs = bench_views(cache, config, 10)
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"ours (batched crops on device, grey input): {ours:8.1f} fields/s")
    print(f"per-sample PIL pipeline (paper style, RGB): {theirs:8.1f} fields/s")
    print(f"ratio: {ours / theirs:.1f}x")
    print(f"data path only (read + crop + resize + flip): ours {views_ours:.1f}, per-sample "
          f"{views_theirs:.1f} fields/s, ratio {views_ours / views_theirs:.1f}x")
    if args.markdown:
        print(f"| {args.arch} | {args.size[0]} x {args.size[1]} | {args.global_size} / "
              f"{args.local_size} | {args.batch_size} | {ours:.1f} | {theirs:.1f} | "
              f"{ours / theirs:.1f}x | {views_ours:.1f} | {views_theirs:.1f} | "
              f"{views_ours / views_theirs:.1f}x | {datetime.date.today()} |")


if __name__ == "__main__":
    main()
