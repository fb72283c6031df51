"""``wsdino train CACHE``: train DINO / WS-DINO, one model per channel.

Settings come from the recipe's defaults (``--recipe``: ``default`` or ``paper-code``), then
``--config FILE`` (or, with ``--resume``, the run's saved ``config.toml``), then
``--set KEY=VALUE`` and the named options. ``--print-config`` prints the resolved settings
of every stage as TOML and exits. Ctrl-C stops between steps and writes a checkpoint
that ``--resume`` continues.
Multi-GPU: ``torchrun --nproc_per_node N --no-python wsdino train CACHE ...``.
"""

from __future__ import annotations

import os
import signal
import sys
import tomllib
from pathlib import Path

from napari_wsdino.cli._common import drive

# option dest -> TrainConfig field, for the named options (None = not given).
OPTIONS = {
    "weak_label": "weak_label", "dmso": "dmso", "arch": "arch", "epochs": "epochs",
    "batch_size": "batch_size", "lr": "lr", "min_lr": "min_lr",
    "warmup_epochs": "warmup_epochs", "init": "init", "device": "device",
    "local_crops": "local_crops", "global_size": "global_size", "local_size": "local_size",
    "out_dim": "out_dim", "checkpoint_every": "checkpoint_every", "seed": "seed",
    "precision": "precision", "center_momentum": "center_momentum",
    "student_temp": "student_temp", "teacher_temp": "teacher_temp",
    "init_parts": "init_parts", "epoch_split": "epoch_split",
}


def add_parser(sub) -> None:
    from napari_wsdino.core.model import ARCHITECTURES, DEFAULT_ARCH
    from napari_wsdino.core.recipes import RECIPES
    from napari_wsdino.core.sampler import (
        DEFAULT_WEAK_LABEL,
        DMSO_MODES,
        WEAK_LABELS,
        weak_label_help,
    )
    from napari_wsdino.core.train import DEVICES, EPOCH_SPLITS, INIT_PARTS, PRECISIONS

    p = sub.add_parser(
        "train",
        help="train DINO / WS-DINO on a preprocessed cache",
        description="Train one ViT per channel with DINO (--weak-label none) or WS-DINO "
        "(local crops from another field of the same treatment / compound / MoA). "
        "Defaults are the paper's: ViT-S/8, 400 epochs, batch 16, lr 4e-6. Writes "
        "RUN/<channel>/checkpoint.pth, config.toml and log.jsonl.",
        epilog="Multi-GPU: torchrun --nproc_per_node 4 --no-python wsdino train CACHE ...",
    )
    p.add_argument("cache", nargs="?", help="preprocessed cache folder (wsdino preprocess)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="bundle of defaults: " + "; ".join(
                       f"{k}: {v.description}" for k, v in RECIPES.items()))
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (train, preprocess, embed, evaluate) as "
                   "TOML and exit")
    p.add_argument("--channel", default="DAPI",
                   help="channel to train, a comma list, or 'all' (default DAPI)")
    p.add_argument("--weak-label", choices=WEAK_LABELS, default=None,
                   help=f"{weak_label_help()}. Default {DEFAULT_WEAK_LABEL}")
    p.add_argument("--dmso", choices=DMSO_MODES, default=None,
                   help="DMSO controls: exclude (paper), plate (one group per plate), together")
    p.add_argument("--arch", help=f"any timm ViT name, e.g. {', '.join(ARCHITECTURES)} "
                   f"(default {DEFAULT_ARCH})")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="fields per step per process (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 4e-6)")
    p.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--init", metavar="PATH|random",
                   help="initial weights: ours, timm, or official DINO (the full checkpoint "
                   "dino_deitsmall8_pretrain_full_checkpoint.pth or the backbone-only "
                   "dino_deitsmall8_pretrain.pth); 'random' for random weights. Required "
                   "(or 'random') with --recipe paper-code")
    p.add_argument("--init-parts", choices=INIT_PARTS,
                   help="what a full checkpoint fills: backbone (its teacher backbone into "
                   "both nets) or full (student, teacher, heads, centre, optimiser; paper-code)")
    p.add_argument("--epoch-split", choices=EPOCH_SPLITS,
                   help="multi-GPU epochs: shard the fields over processes, or replicate "
                   "(every process draws the whole dataset; paper-code)")
    p.add_argument("--out", metavar="RUN", help="run folder (default: CACHE/../runs/<weak label>)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN/<channel>/checkpoint.pth with its saved config; with "
                   "--epochs N, extend a finished or interrupted run to N epochs (continue "
                   "training; see docs/training.md for the schedule)")
    p.add_argument("--device", choices=DEVICES, default=None)
    p.add_argument("--config", metavar="FILE", help="TOML (or YAML) file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set local_scale=[0.05,0.1] (repeatable)")
    p.add_argument("--local-crops", type=int)
    p.add_argument("--global-size", type=int)
    p.add_argument("--local-size", type=int)
    p.add_argument("--out-dim", type=int, help="DINO head outputs (default 65536)")
    p.add_argument("--checkpoint-every", type=int, metavar="N")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--center-momentum", type=float, help="0.8 (paper code) or 0.9 (DINO)")
    p.add_argument("--student-temp", type=float, help="0.07 (paper code) or 0.1 (DINO)")
    p.add_argument("--teacher-temp", type=float)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_set(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs, values read as TOML (strings may be left unquoted)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {item!r}.")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def build_config(args, resume_from: Path | None = None, channel: str | None = None):
    """Recipe < --config (or, resuming ``resume_from``, its saved config) < --set < options,
    by :func:`napari_wsdino.core.train.resolve_config` (the panels' rule too)."""
    from napari_wsdino.core.train import resolve_config

    overrides = parse_set(args.set)
    for dest, key in OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    if channel is not None:
        overrides["channel"] = channel
    return resolve_config(args.config, overrides, resume_from=resume_from,
                          recipe=getattr(args, "recipe", "default"))


def print_config(args) -> int:
    """``--print-config``: the recipe's settings of every stage with this command's
    training settings on top, as TOML."""
    from napari_wsdino.core.recipes import resolve

    try:
        config = build_config(args)
        print(resolve(args.recipe, train=config.to_dict()).to_toml(), end="")
    except ValueError as exc:
        print(f"wsdino train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args) -> int:
    from napari_wsdino.core import distributed
    from napari_wsdino.core.cache import open_cache
    from napari_wsdino.core.layout import channel_dir, default_run_dir
    from napari_wsdino.core.model import CheckpointError
    from napari_wsdino.core.recipes import check_init, get_recipe
    from napari_wsdino.core.train import TrainingError, describe_data, train

    if args.print_config:
        return print_config(args)
    if not args.cache:
        print("wsdino train: error: give the cache folder (or --print-config)", file=sys.stderr)
        return 2
    if not args.resume:
        try:
            check_init(build_config(args).init, get_recipe(args.recipe).requires_init,
                       f"--recipe {args.recipe}")
        except ValueError as exc:
            print(f"wsdino train: error: {exc}", file=sys.stderr)
            return 2
    cache = open_cache(args.cache)
    if args.channel == "all":
        channels = list(cache.channels)
    else:
        channels = [c.strip() for c in args.channel.split(",") if c.strip()]
    main = distributed.env_world_size() <= 1 or int(os.environ.get("RANK", "0")) == 0
    stop_flag = {"stop": False}

    def on_sigint(signum, frame):
        if stop_flag["stop"]:
            raise KeyboardInterrupt
        stop_flag["stop"] = True
        if main:
            print("\nwsdino train: stopping after this step (Ctrl-C again to abort)...",
                  file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        run_dir = Path(args.out) if args.out else default_run_dir(
            args.cache, build_config(args).weak_label)
        for ch in channels:
            out = channel_dir(run_dir, ch)
            try:
                config = build_config(args, out if args.resume else None, channel=ch)
                if main and not args.quiet:
                    d = describe_data(cache, config)
                    singles = d["singleton_groups"]
                    print(f"{ch}: {d['fields']} fields in {d['groups']} {config.weak_label} "
                          f"groups, {d['steps_per_epoch']} steps/epoch; {len(singles)} groups "
                          f"of one field{': ' + ', '.join(singles[:5]) if singles else ''} "
                          f"-> {out}", file=sys.stderr)
                path = drive(train(cache, config, out, resume=args.resume,
                                   stop=lambda: stop_flag["stop"]),
                             quiet=args.quiet or not main)
            except (TrainingError, CheckpointError, ValueError) as exc:
                print(f"wsdino train: error: {exc}", file=sys.stderr)
                return 2
            if stop_flag["stop"]:
                if main:
                    print(f"\nStopped; checkpoint {path}. Continue with the same command "
                          "and --resume.", file=sys.stderr)
                return 130
            if main:
                print(f"{ch}: {path}")
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
