"""One source of truth (issue 17): every option of every ``wsdino`` command is either CLI-only
(a path, an output switch) or takes its default and its choices from core.

A new option must be added to the tables below, saying where its default lives; a default
changed in core changes the CLI with it (the CLI reads it), and this test catches a CLI that
writes its own. ``DEFER`` means the CLI passes nothing unless asked, so core decides.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from napari_wsdino.cli import build_parser

DEFER = object()


@dataclasses.dataclass(frozen=True)
class Core:
    """The core's default (or ``DEFER``) and the core's list of choices (None: free)."""

    default: object
    choices: tuple | None = None


CLI = "cli-only"


def param(fn, name):
    return inspect.signature(fn).parameters[name].default


def fields_of(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def expected() -> dict[str, dict[str, object]]:
    from napari_wsdino.core import recipes
    from napari_wsdino.core.attention import DEFAULT_KEEP, MODES, attention_maps
    from napari_wsdino.core.embed import MEDIANS, POOLINGS, WINDOWS, embed_cache
    from napari_wsdino.core.evaluation import UNANNOTATED as EVAL_UNANNOTATED
    from napari_wsdino.core.evaluation import iter_evaluate
    from napari_wsdino.core.metrics import NSCB_MULTIBATCH
    from napari_wsdino.core.tvn import TVN_METHODS
    from napari_wsdino.core.fetch import SUBSETS as FETCH_SUBSETS
    from napari_wsdino.core.fetch import FetchOptions
    from napari_wsdino.core.metadata import UNANNOTATED, load_metadata
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.pipeline import run_demo
    from napari_wsdino.core.preprocess import (ILLUMINATION_METHODS, NORMALIZATIONS,
                                               PreprocessSettings, preprocess)
    from napari_wsdino.core.presets import PRESETS
    from napari_wsdino.core.sampler import WEAK_LABELS
    from napari_wsdino.core.study import run_study
    from napari_wsdino.core.synth import (DEFAULT_SIZE, LAYOUTS, REPLICA_VERSIONS, SUBSETS,
                                          write_replica)

    pre = fields_of(PreprocessSettings)
    fetch = fields_of(FetchOptions)
    recipe = Core(recipes.DEFAULT_RECIPE, tuple(recipes.RECIPES))
    layout = CLI  # a JSON file or a layout name: no core default
    return {
        "info": {"data": CLI, "json": CLI, "no_check": CLI, "layout": layout,
                 # info counts what would be dropped: it drops where preprocess refuses
                 "unannotated": Core("drop", UNANNOTATED)},
        "synth": {
            "out": CLI, "quiet": CLI,
            "layout": Core(param(write_replica, "layout"), tuple(LAYOUTS)),
            "subset": Core(param(write_replica, "subset"), tuple(SUBSETS)),
            "sites": Core(param(write_replica, "sites")),
            "size": Core(DEFAULT_SIZE), "seed": Core(param(write_replica, "seed")),
            "workers": Core(param(write_replica, "workers")),
            # the replica version's calibrated knobs (v2 for bbbc021, v1 for cellpainting)
            "replica": Core(DEFER, REPLICA_VERSIONS),
            "batch_strength": Core(DEFER), "phenotype_strength": Core(DEFER)},
        "preprocess": {
            "data": CLI, "out": CLI, "quiet": CLI, "layout": layout, "shard": CLI, "merge": CLI,
            "drop_missing": Core(param(load_metadata, "drop_missing")),
            "size": Core(DEFER), "clip": Core(pre["clip"]), "filter_size": Core(pre["filter_size"]),
            # --preset: a preset's size and normalisation (core.presets.preprocess_settings)
            "preset": Core(DEFER, tuple(PRESETS)),
            "normalize": Core(DEFER, NORMALIZATIONS),  # PreprocessSettings' or the preset's
            "illumination": Core(pre["illumination"], ILLUMINATION_METHODS),
            "workers": Core(param(preprocess, "workers")),
            "unannotated": Core(param(load_metadata, "unannotated"), UNANNOTATED)},
        "embed": {
            "cache": CLI, "model": CLI, "run": CLI, "init_only": CLI, "random": CLI, "out": CLI,
            "channels": CLI, "student": CLI, "overwrite": CLI, "export_safetensors": CLI,
            "quiet": CLI, "arch": Core(DEFER),
            "seed": Core(param(ModelSet.random, "seed")),
            # crop and pooling: embed_cache's, or the --preset's (core.presets.embed_settings)
            "preset": Core(DEFER, tuple(PRESETS)),
            "crop": Core(DEFER), "recipe": recipe,
            "windows": Core(DEFER, WINDOWS), "median": Core(DEFER, MEDIANS), "l2": Core(DEFER),
            "pooling": Core(DEFER, POOLINGS),
            "batch_size": Core(param(embed_cache, "batch_size")),
            "chunk_size": Core(param(embed_cache, "chunk_size")),
            "device": Core(param(embed_cache, "device"))},
        "attention": {
            "data": CLI, "model": CLI, "field": CLI, "index": CLI, "region": CLI, "out": CLI,
            "student": CLI, "layout": layout, "arch": Core(DEFER),
            "channel": Core(DEFER),  # the data's first channel
            "mode": Core(param(attention_maps, "mode"), MODES),
            "keep": Core(DEFAULT_KEEP), "device": Core("auto")},
        "demo": {
            "out": CLI, "json": CLI, "init": Core(DEFER), "epochs": Core(DEFER),
            "preset": Core(param(run_demo, "preset"), tuple(PRESETS)),
            "weak_label": Core(param(run_demo, "weak_label"), WEAK_LABELS),
            "seed": Core(param(run_demo, "seed")), "device": Core(param(run_demo, "device")),
            "workers": Core(param(run_demo, "workers")),
            "recipe": recipe,
            "layout": Core(param(run_demo, "layout"), tuple(LAYOUTS))},
        "study": {
            "cache": CLI, "out": CLI, "json": CLI, "data_label": CLI, "epochs": Core(DEFER),
            "labels": Core(",".join(param(run_study, "labels"))),
            "init": Core(param(run_study, "init")),
            "recipe": recipe,
            "seeds": Core(param(run_study, "seeds")),
            "preset": Core(param(run_study, "preset"), tuple(PRESETS)),
            "eval_every": Core(param(run_study, "eval_every")),
            "last": Core(param(run_study, "last_k")),
            "holdout_folds": Core(param(run_study, "holdout_folds")),
            "channels": Core(param(run_study, "channels")),
            "device": Core(param(run_study, "device"))},
        "evaluate": {
            "profiles": CLI, "json": CLI, "out": CLI, "quiet": CLI, "recipe": recipe,
            "no_nscb": CLI,  # the inverse of iter_evaluate(nscb=True)
            "tvn": Core(DEFER, tuple(TVN_METHODS)),
            "nscb_multibatch": Core(DEFER, NSCB_MULTIBATCH),
            "shrinkage": Core(param(iter_evaluate, "shrinkage")),
            "k": Core(list(param(iter_evaluate, "ks"))),
            "unannotated": Core(param(iter_evaluate, "unannotated"), EVAL_UNANNOTATED),
            "drop_constant": Core(param(iter_evaluate, "drop_constant"))},
        "fetch": {
            "dest": CLI, "plates": CLI, "all_plates": CLI, "metadata_only": CLI, "manifest": CLI,
            "keep_zips": CLI, "yes": CLI, "quiet": CLI,
            "subset": Core(DEFER, FETCH_SUBSETS), "base_url": Core(fetch["base_url"]),
            "retries": Core(fetch["retries"]), "timeout": Core(fetch["timeout"])},
    }


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(sp: argparse.ArgumentParser):
    for action in sp._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.dest == "preset" and action.const is not None:  # demo --gpu: a shorthand
            continue
        yield action


#: Commands whose options another test checks (test_train_settings walks TrainConfig).
CHECKED_ELSEWHERE = {"train"}


def test_every_option_of_every_command_is_classified():
    table = expected()
    missing = []
    for name, sp in subcommands().items():
        if name in CHECKED_ELSEWHERE or name == "fetch-bbbc021":  # same parser as its alias fetch
            continue
        known = table.get(name, {})
        missing += [f"wsdino {name} --{a.dest}" for a in options(sp) if a.dest not in known]
    assert not missing, ("options with no stated source of their default (add them to "
                         f"tests/test_cli_defaults.py): {missing}")


@pytest.mark.parametrize("command", sorted(expected()))
def test_defaults_and_choices_come_from_core(command):
    sp = subcommands()[command]
    wrong = []
    for action in options(sp):
        want = expected()[command].get(action.dest)
        if not isinstance(want, Core):
            continue
        default = None if want.default is DEFER else want.default
        if action.default != default:
            wrong.append(f"--{action.dest}: default {action.default!r}, core says {default!r}")
        if want.choices is not None and set(action.choices or ()) != set(want.choices):
            wrong.append(f"--{action.dest}: choices {action.choices}, core says {want.choices}")
    assert not wrong, wrong


def test_a_default_changed_in_core_reaches_the_cli(monkeypatch):
    """The CLI reads core at parser build time: change core, and --help changes with it."""
    from napari_wsdino.core import presets

    monkeypatch.setattr(presets, "DEFAULT_PRESET", "test")
    import importlib

    import napari_wsdino.cli.demo as demo

    try:
        importlib.reload(demo)
        sp = argparse.ArgumentParser()
        demo.add_parser(sp.add_subparsers())
        (demo_parser,) = sp._subparsers._group_actions[0].choices.values()
        assert next(a for a in demo_parser._actions if a.dest == "preset").default == "test"
    finally:
        monkeypatch.undo()
        importlib.reload(demo)


def test_every_preset_has_a_display_name():
    from napari_wsdino.core.presets import PRESET_TITLES, PRESETS

    assert set(PRESET_TITLES) == set(PRESETS)
    assert all(PRESET_TITLES.values())
