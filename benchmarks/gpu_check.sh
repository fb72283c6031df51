#!/usr/bin/env bash
# GPU readiness check (issue 14): one table, in at most 8 minutes on one H100 / H200.
#
#   benchmarks/gpu_check.sh          # on a machine with CUDA
#   benchmarks/gpu_check.sh --cpu    # the same code paths, tiny sizes, on the CPU (a test runs this)
#
# Rows:
#   train fp32 / bf16, eager / torch.compile   ViT-S/8 WS-DINO at the paper's settings (compound
#                                              label, 2 x 224 + 8 x 96 px crops, head 65,536,
#                                              batch 16) on a synthetic 512 x 640 cache kept on
#                                              the GPU: fields/s, MFU (model FLOPs counted by
#                                              torch's FlopCounterMode, against the card's dense
#                                              bf16 peak), peak memory
#   embed                                      3 channels of ViT-S/8, official windows: fields/s
#   resume                                     2 epochs on a small cache, stopped mid-epoch and
#                                              resumed, against one uninterrupted run: bit-exact
#                                              or the largest weight difference
#   bf16 vs fp32                               mean and largest |loss difference| over 100 steps
#
# Targets (issue 14): the paper's protocol (3 channels x 400 epochs x 2,528 fields) in <= 1.5 h
# on one H100, i.e. >= 562 fields/s; 3,848 fields embedded in <= 30 s (>= 128 fields/s).
# Record the table in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="gpu"
if [[ "${1:-}" == "--cpu" ]]; then MODE="cpu"; fi
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" exec timeout "$BUDGET" python3 - "$MODE" <<'PY'
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_train_gpu import make_cache, peak_tflops, step_flops_per_field
from napari_wsdino.core.embed import embed_cache
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.train import TrainConfig, load_checkpoint, train

CPU = sys.argv[1] == "cpu"
if not CPU and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible; run with --cpu for the plumbing check.")
DEVICE = "cpu" if CPU else "cuda"
T0 = time.perf_counter()
ROWS = []
if CPU:  # tiny sizes: the same calls, seconds on a laptop
    SIZE, FIELDS, STEPS, WARMUP = (64, 80), 48, 4, 2
    MODEL = dict(arch="test_vit", global_size=32, local_size=16, out_dim=256, hidden_dim=64,
                 bottleneck_dim=32, batch_size=4)
    EMBED_ARCH, EMBED_FIELDS, LOSS_STEPS = "test_vit", 16, 6
else:  # the paper's settings
    SIZE, FIELDS, STEPS, WARMUP = (512, 640), 256, 40, 12
    MODEL = dict(batch_size=16)
    EMBED_ARCH, EMBED_FIELDS, LOSS_STEPS = "vit_small_patch8_224", 512, 100


def row(check, value, note=""):
    ROWS.append((check, value, note))
    print(f"[{time.perf_counter() - T0:6.1f} s] {check}: {value} {note}", file=sys.stderr)


def sync():
    if not CPU:
        torch.cuda.synchronize()


def time_training(cache, precision, compile_, tmp):
    config = TrainConfig(weak_label="compound", epochs=1000, precision=precision,
                         compile=compile_, checkpoint_every=1000, device=DEVICE, **MODEL)
    if not CPU:
        torch.cuda.reset_peak_memory_stats()
    times = []
    gen = train(cache, config, Path(tmp) / f"run_{precision}_{compile_}",
                stop=lambda: len(times) >= WARMUP + STEPS)
    for _ in gen:
        sync()
        times.append(time.perf_counter())
    fields_s = STEPS * config.batch_size / (times[-1] - times[WARMUP - 1])
    flops = step_flops_per_field(config)
    peak = None if CPU else peak_tflops(torch.cuda.get_device_name(0))
    mfu = flops * fields_s / (peak * 1e12) if peak else float("nan")
    mem = torch.cuda.max_memory_allocated() / 2**30 if not CPU else float("nan")
    hours = 3 * 400 * 2528 / fields_s / 3600
    name = f"train {precision} {'compile' if compile_ else 'eager'}"
    if CPU:
        row(name, f"{fields_s:.1f} fields/s", "MFU and memory are measured on CUDA only")
    else:
        row(name, f"{fields_s:.1f} fields/s", f"MFU {100 * mfu:.1f} % of {peak} TFLOP/s, peak "
            f"{mem:.1f} GiB, paper protocol {hours:.2f} h (target >= 562 fields/s, <= 1.5 h)")


def check_embed(tmp):
    channels = ("DAPI", "Tubulin", "Actin")
    cache = make_cache(Path(tmp) / "embed_cache", EMBED_FIELDS, SIZE)
    from napari_wsdino.core.cache import write_cache

    imgs = cache.images("DAPI")[:]
    cache = write_cache(Path(tmp) / "embed_cache3", cache.table, {c: imgs for c in channels})
    models = ModelSet.random(EMBED_ARCH, channels, seed=0)
    run_to_end(embed_cache(cache, models, device=DEVICE, indices=range(min(16, len(cache))),
                           windows="official", median="lower", l2=False))  # warm-up
    sync()
    t = time.perf_counter()
    run_to_end(embed_cache(cache, models, device=DEVICE, batch_size=64 if not CPU else 8,
                           windows="official", median="lower", l2=False))
    sync()
    rate = len(cache) / (time.perf_counter() - t)
    row("embed 3 ch official windows", f"{rate:.1f} fields/s",
        f"3,848 fields in {3848 / rate:.1f} s" + (" (target <= 30 s)" if not CPU else ""))


def check_resume(tmp):
    from napari_wsdino.core.cache import write_cache

    small = make_cache(Path(tmp) / "small", 64, (96, 120))
    config = TrainConfig(arch="wsdino_vit_pico_patch8", weak_label="compound", epochs=2,
                         batch_size=8, global_size=48, local_size=24, local_crops=2,
                         out_dim=512, hidden_dim=128, bottleneck_dim=64, precision="fp32",
                         checkpoint_every=1, device=DEVICE, lr=1e-4, min_lr=1e-5,
                         warmup_epochs=1)
    whole = run_to_end(train(small, config, Path(tmp) / "whole"))
    steps = []
    part = Path(tmp) / "part"
    for _ in train(small, config, part, stop=lambda: len(steps) >= 5):
        steps.append(1)
    run_to_end(train(small, config, part, resume=True))
    a, b = load_checkpoint(whole), load_checkpoint(part / "checkpoint.pth")
    diff = max(float((a[k][n].float() - b[k][n].float()).abs().max())
               for k in ("student", "teacher") for n in a[k])
    verdict = "bit-exact" if diff == 0 else f"max |weight diff| {diff:.2e}"
    row("resume 2 epochs, stopped at step 5", verdict,
        f"{a['step']} steps; centre {'equal' if torch.equal(a['dino_loss']['center'], b['dino_loss']['center']) else 'differs'}")


def check_bf16_loss(cache, tmp):
    losses = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(weak_label="compound", epochs=1000, precision=precision,
                             checkpoint_every=1000, device=DEVICE, **MODEL)
        seen = []
        for ev in train(cache, config, Path(tmp) / f"loss_{precision}",
                        stop=lambda: len(seen) >= LOSS_STEPS):
            seen.append(ev.info["loss"])
        losses[precision] = np.array(seen[:LOSS_STEPS])
    d = np.abs(losses["bf16"] - losses["fp32"])
    row(f"bf16 vs fp32 loss, {LOSS_STEPS} steps", f"mean abs diff {d.mean():.2e}",
        f"max {d.max():.2e}; fp32 mean loss {losses['fp32'].mean():.4f}")


with tempfile.TemporaryDirectory() as tmp:
    cache = make_cache(Path(tmp) / "cache", FIELDS, SIZE)
    for precision in ("fp32", "bf16"):
        for compile_ in (False, True):
            if CPU and compile_:
                row(f"train {precision} compile", "skipped", "torch.compile is timed on CUDA only")
                continue
            try:
                time_training(cache, precision, compile_, tmp)
            except Exception as exc:  # one failing row must not hide the others
                row(f"train {precision} {'compile' if compile_ else 'eager'}", "FAILED",
                    f"{type(exc).__name__}: {exc}"[:200])
    for fn, args in ((check_embed, (tmp,)), (check_resume, (tmp,)),
                     (check_bf16_loss, (cache, tmp))):
        try:
            fn(*args)
        except Exception as exc:
            row(fn.__name__, "FAILED", f"{type(exc).__name__}: {exc}"[:200])

device = "CPU (plumbing check)" if CPU else torch.cuda.get_device_name(0)
print(f"\ngpu_check on {device}, torch {torch.__version__}, "
      f"{time.perf_counter() - T0:.0f} s\n")
print("| check | result | detail |")
print("| --- | --- | --- |")
for check, value, note in ROWS:
    print(f"| {check} | {value} | {note} |")
sys.exit(1 if any(v == "FAILED" for _, v, _ in ROWS) else 0)
PY
