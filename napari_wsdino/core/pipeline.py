"""One command from nothing to a result: the ``wsdino demo`` pipeline.

Stages, each cached in the output folder so that a rerun skips what is finished:

1. ``replica``    — synthetic replica, BBBC021's three stains or Cell Painting's five
                   (``layout``; :mod:`napari_wsdino.core.synth`)
2. ``preprocess`` — illumination correction, resize, clip, normalise (:mod:`~.preprocess`)
3. ``train``      — one WS-DINO model per channel (:mod:`~.train`)
4. ``embed``      — field profiles of the trained models, and of a random-init baseline
5. ``evaluate``   — TVN, aggregation, NSC / NSCB / mAP (:mod:`~.evaluation`)
6. ``report``     — ``report.html`` (+ JSON, CSV, figures)

The stage list and presets are plain data; :func:`run_demo` is a generator of
:class:`~napari_wsdino.core.progress.Progress` events, like every long task here.

Example
-------
>>> from napari_wsdino.core.progress import run_to_end
>>> summary = run_to_end(run_demo("wsdino_demo", preset="cpu"))     # doctest: +SKIP
>>> summary["results"][0]["nsc"]                                     # doctest: +SKIP
>>> run_to_end(run_demo("cp_demo", preset="test", layout="cellpainting"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generator

from napari_wsdino.core.fsio import atomic_write_text
from napari_wsdino.core.layout import demo_paths, log_path
from napari_wsdino.core.metadata import LAYOUTS, DataError
from napari_wsdino.core.presets import (  # noqa: F401  (re-exported)
    DEFAULT_PRESET, PRESETS, Preset, embed_settings, headline, preprocess_settings,
    resolve_preset)
from napari_wsdino.core.recipes import DEFAULT_RECIPE
from napari_wsdino.core.sampler import DEFAULT_WEAK_LABEL, weak_label_note
from napari_wsdino.core.progress import Progress

STAGES = ("replica", "preprocess", "train", "embed", "evaluate", "report")
STATE_FILE = "stages.json"
#: The screen layout of the demo's replica unless another is asked for.
DEFAULT_LAYOUT = "bbbc021"


def _load_state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _mark(out: Path, state: dict, stage: str, **info: Any) -> None:
    state[stage] = {"done": True, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, default=str))


def _without_prose(settings: dict) -> dict:
    """A demo folder's settings less the preset's description: rewording a preset's help
    text does not make earlier folders unresumable."""
    preset = {k: v for k, v in settings.get("preset", {}).items() if k != "description"}
    return {**settings, "preset": preset}


def _check_device(preset: Preset, device: str) -> None:
    """Refuse, before any file is written, a GPU-sized run on a machine without CUDA,
    unless ``device="cpu"`` was asked for."""
    import torch

    if device == "cpu" or torch.cuda.is_available():
        return
    if device == "cuda":
        raise DataError("--device cuda was asked for but no CUDA GPU is visible: check the "
                        "driver (nvidia-smi) and the PyTorch build, or use --device cpu.")
    if preset.name == "gpu" and device == "auto":
        raise DataError(
            "The gpu preset (ViT-S/8, the paper's 400 epochs on 3,848 full-size fields, "
            "about 40 GB of disk) needs a CUDA GPU and none is visible: on this CPU it would "
            "take days. Run it on a GPU machine, use the cpu preset (minutes), or add "
            "--device cpu to run it here anyway."
        )


def run_demo(
    out: str | Path,
    preset: str | Preset = DEFAULT_PRESET,
    *,
    weak_label: str = DEFAULT_WEAK_LABEL,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    recipe: str = DEFAULT_RECIPE,
    layout: str = DEFAULT_LAYOUT,
    **train_overrides,
) -> Generator[Progress, None, dict]:
    """Replica → preprocess → WS-DINO per channel → embed → evaluate → report.

    Parameters
    ----------
    out
        Output folder; rerunning with the same folder skips finished stages.
    preset
        ``"cpu-hires"`` (default, about 15 minutes on 2 cores on replica v2), ``"cpu"`` (the same
        recipe at half the resolution, 6 minutes), ``"test"`` (seconds) or ``"gpu"`` (the
        paper's settings), or a :class:`Preset`.
    weak_label
        WS-DINO weak label: ``none`` (plain DINO), ``treatment``, ``compound``, ``moa``.
    seed
        Seed of the replica and of training.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    workers
        Processes for replica generation and preprocessing.
    recipe
        :mod:`~napari_wsdino.core.recipes` name (``default`` or ``paper-code``): its
        preprocessing, training, embedding and evaluation settings. The ``gpu`` preset and
        ``paper-code`` need ``init=FILE`` (or ``init="random"``, said on purpose).
    layout
        The replica's screen layout, a name of :data:`~napari_wsdino.core.screens.LAYOUTS`:
        ``"bbbc021"`` (DAPI, Tubulin, Actin) or ``"cellpainting"`` (JUMP-style
        ``load_data.csv``, DNA, ER, RNA, AGP, Mito: five models, five attention columns;
        its one design takes the preset's sites and sizes, not its BBBC021 subset).
    train_overrides
        Any :class:`~napari_wsdino.core.train.TrainConfig` field (e.g. ``epochs=5``).

    Returns
    -------
    dict
        ``results`` (one row per model: NSC, NSCB, mAP ...), ``paths`` and ``skipped``
        (stages that were already done).
    """
    demo = _open_demo(out, preset, weak_label, seed, device, workers, recipe, layout,
                      train_overrides)
    meta = yield from _replica_stage(demo)
    cache = yield from _preprocess_stage(demo, meta)
    from napari_wsdino.core.train import TrainConfig

    config = TrainConfig(weak_label=weak_label, seed=seed, device=device, **demo.preset.train)
    # The models compared: WS-DINO, plain DINO at the same budget (unless WS-DINO is plain
    # DINO already), the initial weights alone (when there are some), a random-init ViT of
    # the same architecture, and the classical profile.
    compared = _compared_models(weak_label, cache.channels, config.init,
                                truth=demo.paths["truth_profiles"].exists())
    yield from _train_stage(demo, cache, config, compared)
    yield from _embed_stage(demo, meta, cache, config, compared)
    evaluated = yield from _evaluate_stage(demo, cache, config, compared)
    yield from _report_stage(demo, cache, evaluated)
    return {"results": demo.results()["results"],
            "weak_label": weak_label_note(cache.table, weak_label, brief=True),
            "paths": {k: str(v) for k, v in demo.paths.items()}, "skipped": demo.skipped}


@dataclass
class _Demo:
    """A demo run in progress: its folder, resolved settings and finished stages."""

    out: Path
    preset: Preset
    stages: Any              # the recipe's resolved Settings
    recipe: str
    layout: str
    seed: int
    device: str
    workers: int
    state: dict
    settings: dict
    paths: dict[str, Path]
    replica: str
    skipped: list[str] = field(default_factory=list)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier run (then it is skipped)."""
        if self.state.get(stage, {}).get("done"):
            self.skipped.append(stage)
            return True
        return False

    def mark(self, stage: str) -> None:
        _mark(self.out, self.state, stage)

    def results(self) -> dict:
        return json.loads(self.paths["results"].read_text())


def _open_demo(out, preset, weak_label, seed, device, workers, recipe, layout,
               train_overrides) -> _Demo:
    """Resolve the preset and recipe, check the machine, and open (or resume) ``out``."""
    from napari_wsdino.core.recipes import check_init, get_recipe, resolve

    from napari_wsdino.core.synth import LAYOUTS as REPLICA_LAYOUTS, default_config

    if layout not in REPLICA_LAYOUTS:
        raise DataError(f"Unknown replica layout {layout!r}; choose one of "
                        f"{', '.join(REPLICA_LAYOUTS)}.")
    rec = get_recipe(recipe)
    preset = resolve_preset(preset, **{**rec.train, **train_overrides})
    check_init(preset.train.get("init", ""), preset.name == "gpu" or rec.requires_init,
               f"The {preset.name} preset" + (f" with recipe {recipe}" if rec.requires_init else ""))
    _check_device(preset, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out)
    replica = default_config(layout).version
    settings = json.loads(json.dumps(
        {"preset": asdict(preset), "weak_label": weak_label, "seed": seed,
         # The replica's version: a v1 folder is never resumed as v2 (issue 27).
         **({"replica": replica} if layout == DEFAULT_LAYOUT else {}),
         **({"recipe": recipe} if recipe != DEFAULT_RECIPE else {}),
         **({"layout": layout} if layout != DEFAULT_LAYOUT else {})}))
    old = state.get("settings")
    if old is not None and _without_prose(old) != _without_prose(settings):
        raise DataError(
            f"{out} holds a demo run with other settings ({state['settings']}). "
            "Use a new output folder, or delete this one to start over."
        )
    state["settings"] = settings
    return _Demo(out, preset, resolve(recipe), recipe, layout, seed, device, workers, state,
                 settings, demo_paths(out), replica)


def _replica_stage(demo: _Demo):
    from napari_wsdino.core.metadata import load_metadata
    from napari_wsdino.core.synth import replica_config, write_replica

    p = demo.preset
    if not demo.done("replica"):
        # The Cell Painting replica has one design ("mini"); the preset's subset is BBBC021's.
        subset = p.subset if demo.layout == DEFAULT_LAYOUT else "mini"
        yield from write_replica(demo.paths["data"], subset, p.sites, p.image_size,
                                 seed=demo.seed, workers=demo.workers, layout=demo.layout,
                                 config=replica_config(demo.replica))
        demo.mark("replica")
    return load_metadata(demo.paths["data"], demo.layout)


def _preprocess_stage(demo: _Demo, meta):
    from napari_wsdino.core.cache import open_cache
    from napari_wsdino.core.preprocess import preprocess

    if not demo.done("preprocess"):
        ps = preprocess_settings(demo.preset, demo.stages.preprocess, demo.recipe)
        yield from preprocess(meta, demo.paths["cache"], ps, workers=demo.workers)
        demo.mark("preprocess")
    return open_cache(demo.paths["cache"])


def _model_set(demo: _Demo, cache, config, model: ComparedModel):
    """A compared row's models: its trained run, or the random-init ViT of the same arch."""
    from napari_wsdino.core.modelset import ModelSet

    if model.kind == "init-only":
        return ModelSet.init_only(config.arch, config.init, cache.channels)
    if model.run is None:
        return ModelSet.random(config.arch, cache.channels, seed=demo.seed)
    return ModelSet.from_run(demo.paths[model.run])


def _train_stage(demo: _Demo, cache, config, compared):
    from napari_wsdino.core.train import train_channels

    if demo.done("train"):
        return
    for model in compared:
        if model.run is not None:
            yield from train_channels(cache, config.replace(weak_label=model.weak_label),
                                      demo.paths[model.run], resume=True)
    demo.mark("train")


def _embed_stage(demo: _Demo, meta, cache, config, compared):
    from napari_wsdino.core.embed import embed_cache

    if demo.done("embed"):
        return
    settings = embed_settings(demo.preset, demo.stages, demo.recipe)
    for model in compared:
        if model.kind == "classical":
            yield from classical_profiles(meta, cache, demo.paths[model.profiles])
            continue
        if model.kind == "truth":  # written with the replica
            continue
        yield from embed_cache(cache, _model_set(demo, cache, config, model),
                               demo.paths[model.profiles], device=demo.device, **settings)
    demo.mark("embed")


def _evaluate_stage(demo: _Demo, cache, config, compared):
    """Every compared row's headline numbers and attention; writes results.json."""
    from napari_wsdino.core.profiles import ProfileTable

    evaluated = {}
    if demo.done("evaluate"):
        return evaluated
    n = len(compared)
    yield Progress("evaluate", 0, n, "TVN, aggregation, NSC / NSCB / mAP, attention on cells")
    rows = []
    for i, model in enumerate(compared):
        res = _evaluate(ProfileTable.read(demo.paths[model.profiles]), demo.stages)
        evaluated[model.profiles] = res
        row = {"model": model.name, "weak_label": model.weak_label, **headline(res)}
        if model.kind not in ("classical", "truth"):
            row.update(_attention_scores(cache, _model_set(demo, cache, config, model)))
        rows.append(row)
        yield Progress("evaluate", i + 1, n, f"{model.name}: NSC {row['nsc']:.2f}")
    atomic_write_text(demo.paths["results"], json.dumps(
        {"data": "synthetic replica", "replica": demo.replica, "results": rows, "metrics": METRIC_NOTES,
         "reading": READING_NOTE,
         "weak_label": weak_label_note(cache.table, demo.settings["weak_label"]),
         "detail": {k: v.to_dict() for k, v in evaluated.items()}}, indent=2))
    demo.mark("evaluate")
    return evaluated


def _report_stage(demo: _Demo, cache, evaluated: dict):
    from napari_wsdino.core.profiles import ProfileTable

    if demo.done("report"):
        return
    yield Progress("report", 0, 1, "writing report.html")
    result = (evaluated["profiles"] if evaluated
              else _evaluate(ProfileTable.read(demo.paths["profiles"]), demo.stages))
    _write_demo_report(demo.out, demo.paths, demo.results(), result, cache, demo.preset,
                       demo.settings, LAYOUTS[demo.layout].display_name)
    demo.mark("report")
    yield Progress("report", 1, 1, str(demo.paths["report"]))


#: One sentence per number of the demo's results (shown in the report and results.json).
METRIC_NOTES = {
    "nsc": "NSC (not-same-compound): share of treatments whose nearest other treatment "
           "(cosine, after TVN on DMSO), excluding the same compound, has the same MoA.",
    "nscb": "NSCB (not-same-compound-or-batch): as NSC, but the neighbour must also come from "
            "another batch (week), so batch effects cannot help; the harder, fairer number.",
    "map_nsc": "mAP: mean over treatments of the average precision of ranking the other "
               "treatments of the same MoA first (same-compound neighbours excluded).",
    "map_nscb": "mAP under the NSCB rule (same-compound and same-batch neighbours excluded).",
    "attention_on_cells": "Attention on cells (per channel): the CLS attention's mass on the "
                          "channel's foreground (Otsu) over the foreground's area share; 1 is "
                          "uniform, above 1 the model looks at the cells.",
}

#: How to read the demo's rows side by side (shown in the report and results.json).
READING_NOTE = (
    "How far apart rows must be: on the synthetic replica (about 100 treatments of 12 MoAs) one "
    "model's NSC and NSCB move by 0.05-0.10 from one replica seed to another, so read gaps "
    "below about 0.05 between rows of one run as ties (benchmarks/RESULTS.md has means over "
    "seeds). NSCB sits below NSC mostly because each batch changes how its cells respond to "
    "drugs; DMSO does not show that change, so TVN cannot remove it (docs/training.md, "
    "'Where the NSCB is lost')."
)


#: The demo's row of the replica's own per-field biology (``truth.parquet``): the ceiling.
GROUND_TRUTH_ROW = "ground truth (the replica's cell biology, no imaging)"


@dataclass(frozen=True)
class ComparedModel:
    """One row of the demo's comparison: its name, weak label, run key and profiles key."""

    name: str
    weak_label: str
    kind: str                # "trained" | "init-only" | "random" | "classical" | "truth"
    run: str | None          # key in paths of the run folder (trained models)
    profiles: str            # key in paths of the profile table


def _compared_models(weak_label: str, channels, init: str = "",
                     truth: bool = False) -> list[ComparedModel]:
    """The demo's rows; the classical row names its feature count on ``channels``. With
    initial weights (``init``), an "init-only" row shows them before any fine-tuning; with
    ``truth`` (a BBBC021 replica's ``truth.parquet``), the ground-truth row comes last."""
    from napari_wsdino.core.classical import feature_names
    from napari_wsdino.core.model import RANDOM_INIT

    rows = []
    if weak_label != "none":
        rows.append(ComparedModel(f"WS-DINO ({weak_label})", weak_label, "trained", "run",
                                  "profiles"))
        rows.append(ComparedModel("DINO (none), same budget", "none", "trained", "run_dino",
                                  "dino_profiles"))
    else:
        rows.append(ComparedModel("DINO (none)", "none", "trained", "run", "profiles"))
    if init and init != RANDOM_INIT:
        rows.append(ComparedModel("init-only (initial weights, not fine-tuned)", "none",
                                  "init-only", None, "init_profiles"))
    rows.append(ComparedModel("random-init ViT", "none", "random", None, "baseline_profiles"))
    n = len(feature_names(list(channels)))
    rows.append(ComparedModel(f"classical profile ({n} features)", "none", "classical", None,
                              "classical_profiles"))
    if truth:
        rows.append(ComparedModel(GROUND_TRUTH_ROW, "none", "truth", None, "truth_profiles"))
    return rows


def classical_profiles(meta, cache, path: Path):
    """The hand-crafted profile of the cached fields, from the raw images (a generator)."""
    from napari_wsdino.core.classical import feature_names, iter_dataset_features
    from napari_wsdino.core.embed import write_profiles
    from napari_wsdino.core.profiles import ProfileTable

    keys = ["plate", "well", "site"]
    table = cache.table[keys].merge(meta.table, on=keys, how="left")
    features = yield from iter_dataset_features(table, list(cache.channels))
    names = feature_names(list(cache.channels))
    profiles = ProfileTable.from_fields(table, features, names)
    write_profiles(profiles, path, {"method": f"classical: {len(names)} intensity and texture "
                                              "features (napari_wsdino.core.classical)"})
    return profiles


def _attention_scores(cache, models) -> dict[str, float]:
    """Attention-on-cells per channel, as result columns ``attention_<channel>``."""
    from napari_wsdino.core.attention import cache_attention_on_cells

    return {f"attention_{ch}": round(v, 3)
            for ch, v in cache_attention_on_cells(cache, models).items()}


def _evaluate(profiles, stages=None):
    from napari_wsdino.core.evaluation import evaluate_profiles
    from napari_wsdino.core.tvn import DEFAULT_TVN

    ev = stages.evaluate if stages is not None else None
    return evaluate_profiles(profiles, tvn=ev.tvn if ev else DEFAULT_TVN, drop_constant=True,
                             nscb_multibatch=ev.nscb_multibatch if ev else "exempt")


def _write_demo_report(out: Path, paths: dict, results: dict, result, cache, preset: Preset,
                       settings: dict, screen: str = LAYOUTS[DEFAULT_LAYOUT].display_name) -> None:
    from napari_wsdino.core.figures import (attention_examples, attention_grid_figure,
                                            confusion_figure, per_moa_figure, png_bytes, read_log,
                                            training_curves_figure, umap_figures)
    from napari_wsdino.core.report import SYNTHETIC_LABEL, Report, write_report

    figures = {
        "MoA confusion matrix (NSC)": png_bytes(confusion_figure(result.confusion_nsc, "NSC")),
        "Per-MoA NSC accuracy": png_bytes(per_moa_figure(result.to_dict()["per_moa"], "per-MoA")),
    }
    if result.confusion_nscb is not None:
        figures["MoA confusion matrix (NSCB)"] = png_bytes(
            confusion_figure(result.confusion_nscb, "NSCB"))
    figures.update(umap_figures(result.treatments))
    logs = {ch: read_log(log_path(paths["run"], ch)) for ch in cache.channels}
    figures["Training curves"] = png_bytes(training_curves_figure(logs))
    figures["Self-attention, one field per MoA"] = png_bytes(
        attention_grid_figure(attention_examples(cache, paths["run"], per_moa=1, max_panels=6)))
    per_moa = [{"moa": m, **v} for m, v in result.to_dict()["per_moa"].items()]
    report = Report(
        title=" ".join(filter(None, ["napari-wsdino demo: WS-DINO on the synthetic replica",
                                     settings.get("replica"), f"of {screen}"])),
        data_label=SYNTHETIC_LABEL,
        rows=results["results"],
        sections={"Per-MoA accuracy (WS-DINO)": per_moa},
        figures=figures,
        settings={**settings, "cache": cache.settings},
        notes=[f"Preset '{preset.name}': {preset.description}. NSC/NSCB use cosine 1-NN on "
               "treatment profiles after TVN on DMSO (Ando et al. 2017). All models are "
               "evaluated on the same fields; the random-init ViT has the trained models' "
               "architecture and embedding.", *_init_note(preset), *METRIC_NOTES.values(),
               READING_NOTE, *filter(None, [weak_label_note(cache.table,
                                                            settings["weak_label"])])],
    )
    write_report(report, out)


def _init_note(preset: Preset) -> list[str]:
    """What the trained rows started from, and what the init-only row is."""
    from napari_wsdino.core.model import RANDOM_INIT
    from napari_wsdino.core.pretrained import BUNDLED

    init = preset.train.get("init", "")
    if not init or init == RANDOM_INIT:
        return ["The trained models start from random weights."]
    about = f" ({BUNDLED[init].about})" if init in BUNDLED else ""
    return [f"The trained models are fine-tuned from the initial weights {init}{about}, as "
            "the paper fine-tunes DINO-pretrained weights; the init-only row is those "
            "weights before any fine-tuning, so the gap between it and the trained rows is "
            "what this run's training added."]
