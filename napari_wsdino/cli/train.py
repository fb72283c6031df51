"""``wsdino train CACHE``: train DINO / WS-DINO, one model per channel.

Settings come from the recipe's defaults (``--recipe``: ``default`` or ``paper-code``), then
``--config FILE`` (or, with ``--resume``, the run's saved ``config.toml``), then
``--set KEY=VALUE`` and the named options, merged by
:func:`napari_wsdino.core.train.resolve_config` (the Train panel's rule too: a resume may
change only ``epochs`` and settings that leave the maths alone). Every named option's type,
choices and default come from :class:`~napari_wsdino.core.train.TrainConfig` and the core
registries. ``--print-config`` prints the resolved settings of every stage as TOML and exits. Ctrl-C stops between steps and writes a checkpoint
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
from napari_wsdino.core.recipes import DEFAULT_RECIPE

#: TrainConfig fields offered as named options (``--weak-label`` ...); any other via --set.
OPTIONS = (
    "weak_label", "dmso", "arch", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs",
    "init", "init_parts", "epoch_split", "device", "local_crops", "global_size", "local_size",
    "out_dim", "checkpoint_every", "snapshot_every", "seed", "precision", "center_momentum",
    "student_temp", "teacher_temp",
)


def _option_specs() -> dict[str, dict]:
    """Choices and help of each named option; types and defaults come from TrainConfig."""
    from napari_wsdino.core.model import ARCHITECTURES
    from napari_wsdino.core.pretrained import DEFAULT_INIT
    from napari_wsdino.core.sampler import DMSO_MODES, WEAK_LABELS, weak_label_help
    from napari_wsdino.core.train import DEVICES, EPOCH_SPLITS, INIT_PARTS, PRECISIONS

    return {
        "weak_label": dict(choices=WEAK_LABELS, help=weak_label_help()),
        "dmso": dict(choices=DMSO_MODES,
                     help="DMSO controls: exclude (paper), plate (one group per plate), together"),
        "arch": dict(help=f"any timm ViT name, e.g. {', '.join(ARCHITECTURES)}"),
        "epochs": dict(help="epochs to train (with --resume: extend the run to this many)"),
        "batch_size": dict(help="fields per step per process"),
        "lr": dict(help="peak learning rate"),
        "min_lr": dict(help="learning rate at the end of the cosine"),
        "warmup_epochs": dict(help="epochs of linear learning-rate warm-up"),
        "init": dict(metavar="PATH|random",
                     help="initial weights: ours, timm, or official DINO (the full checkpoint "
                     "dino_deitsmall8_pretrain_full_checkpoint.pth or the backbone-only "
                     "dino_deitsmall8_pretrain.pth), or a bundled name "
                     f"({DEFAULT_INIT}, the cpu preset's: plain DINO on another "
                     "replica seed, for "
                     "wsdino_vit_pico_patch8); 'random' for random weights. Required "
                     "(or 'random') with --recipe paper-code"),
        "init_parts": dict(choices=INIT_PARTS,
                           help="what a full checkpoint fills: backbone (its teacher backbone "
                           "into both nets) or full (student, teacher, heads, centre, "
                           "optimiser; paper-code)"),
        "epoch_split": dict(choices=EPOCH_SPLITS,
                            help="multi-GPU epochs: shard the fields over processes, or "
                            "replicate (every process draws the whole dataset; paper-code)"),
        "device": dict(choices=DEVICES, help="auto: CUDA when there is a GPU, else CPU"),
        "local_crops": dict(help="local crops per view set"),
        "global_size": dict(help="side of the global crops, px"),
        "local_size": dict(help="side of the local crops, px"),
        "out_dim": dict(help="DINO head outputs"),
        "checkpoint_every": dict(metavar="N", help="write a checkpoint every N epochs"),
        "snapshot_every": dict(metavar="N",
                               help="also keep a teacher snapshot every N epochs "
                               "(CHANNEL/teacher_epochNNNN.pth; the paper: 5, each one "
                               "evaluated, as wsdino study does); 0 = none"),
        "precision": dict(choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU"),
        "center_momentum": dict(help="0.8 (paper code) or 0.9 (DINO)"),
        "student_temp": dict(help="0.07 (paper code) or 0.1 (DINO)"),
        "teacher_temp": dict(help="teacher temperature after its warm-up"),
        "seed": dict(help="seed of the initial weights, crops and field draws"),
    }


def _add_config_options(p) -> None:
    """One ``--field-name`` per :data:`OPTIONS` entry, default None (= not given), its
    help ending in the default recipe's value."""
    from typing import get_type_hints

    from napari_wsdino.core.train import TrainConfig

    defaults, kinds, specs = TrainConfig(), get_type_hints(TrainConfig), _option_specs()
    for name in OPTIONS:
        spec = dict(specs.get(name, {}))
        default = getattr(defaults, name)
        shown = default if default != "" else "none"
        spec["help"] = f"{spec['help']} (default {shown})"
        p.add_argument("--" + name.replace("_", "-"), type=kinds[name], default=None, **spec)


def add_parser(sub) -> None:
    from napari_wsdino.core.recipes import RECIPES
    from napari_wsdino.core.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train DINO / WS-DINO on a preprocessed cache",
        description="Train one ViT per channel with DINO (--weak-label none) or WS-DINO "
        "(local crops from another field of the same treatment / compound / MoA). "
        f"Defaults are the paper's: {d.arch}, {d.epochs} epochs, batch {d.batch_size}, "
        f"lr {d.lr}. Writes RUN/<channel>/checkpoint.pth, config.toml and log.jsonl. Every "
        "setting is checked (type, range, order) before any work, and one process at a time "
        "writes a channel folder: a second 'wsdino train' on it is refused, naming the first.",
        epilog="Multi-GPU: torchrun --nproc_per_node 4 --no-python wsdino train CACHE ...",
    )
    p.add_argument("cache", nargs="?", help="preprocessed cache folder (wsdino preprocess)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="bundle of defaults: " + "; ".join(
                       f"{k}: {v.description}" for k, v in RECIPES.items()))
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (train, preprocess, embed, evaluate) as "
                   "TOML and exit")
    p.add_argument("--channel", default=d.channel,
                   help="channel to train, a comma list, or 'all' (default: "
                   + (d.channel or "the cache's first channel") + ")")
    p.add_argument("--out", metavar="RUN", help="run folder (default: CACHE/../runs/<weak label>)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN/<channel>/checkpoint.pth with its saved config; with "
                   "--epochs N, extend a finished or interrupted run to N epochs (continue "
                   "training; see docs/training.md for the schedule)")
    p.add_argument("--config", metavar="FILE", help="TOML (or YAML) file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set local_scale=[0.05,0.1] (repeatable)")
    _add_config_options(p)
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
    by :func:`napari_wsdino.core.train.resolve_config` (the panels' rule too), given the
    recipe's defaults by :func:`napari_wsdino.core.recipes.resolve_train`."""
    from napari_wsdino.core.recipes import resolve_train

    overrides = parse_set(args.set)
    sources = {k: f"--set {k}" for k in overrides}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
            sources[name] = "--" + name.replace("_", "-")
    if channel is not None:
        overrides["channel"] = channel
        sources["channel"] = "--channel"
    return resolve_train(getattr(args, "recipe", DEFAULT_RECIPE), args.config, overrides,
                         resume_from=resume_from, sources=sources)


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
    try:  # every setting checked before the cache is opened or anything written
        config = build_config(args)
        if not args.resume:
            check_init(config.init, get_recipe(args.recipe).requires_init,
                       f"--recipe {args.recipe}")
    except ValueError as exc:
        print(f"wsdino train: error: {exc}", file=sys.stderr)
        return 2
    cache = open_cache(args.cache)
    if args.channel == "all":
        channels = list(cache.channels)
    else:
        channels = [c.strip() for c in (args.channel or "").split(",") if c.strip()]
        channels = channels or list(cache.channels[:1])  # default: the first (nuclear) stain
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
        run_dir = Path(args.out) if args.out else default_run_dir(args.cache, config.weak_label)
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
