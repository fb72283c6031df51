"""The paper's study protocol on any cache: init-only vs DINO vs WS-DINO per weak label.

For each weak label and seed, one model per channel is trained with the same budget; a
teacher snapshot is kept every ``eval_every`` epochs (the paper: every 5) and every one is
embedded and evaluated. The table reports, per model, the mean and spread of NSC / NSCB /
mAP over seeds and the last ``last_k`` snapshots, and the paper's two numbers: the best
epoch by NSC (its Table 1, after Janssens et al. 2021; marked as selected with the MoA
labels, which are also the test labels) and the mean over every evaluated epoch (its
Table 2). :attr:`StudyResult.per_epoch` holds NSC / NSCB against epoch.

MoA as a weak label leaks the evaluation label. The honest variant, ``holdout_folds=K``,
splits the annotated compounds into K folds; for each fold, the MoA labels of that fold's
compounds are hidden during training (they fall back to their compound, the hierarchical
``moa_or_compound`` label) and NSC / NSCB are scored on that fold's treatments only.

Every stage is cached under the output folder (training resumes, finished embeddings are
reused), so an interrupted study resumes where it stopped.

Example
-------
>>> from napari_wsdino.core.progress import run_to_end
>>> out = run_to_end(run_study("cache/", "study/", labels=("none", "compound")))  # doctest: +SKIP
>>> out.rows[0]["nsc_mean"]                                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generator, Sequence

import numpy as np
import pandas as pd

from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.fsio import atomic_write_text
from napari_wsdino.core.layout import CHECKPOINT_FILE, LOG_FILE, channel_dir, snapshot_path
from napari_wsdino.core.metadata import CONTROL, DataError
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.recipes import DEFAULT_RECIPE
from napari_wsdino.core.sampler import WEAK_LABEL_INFO, weak_label_note

#: The method each weak label trains ("DINO" or "WS-DINO"), from the weak-label registry.
LABEL_NAMES = {name: w.method for name, w in WEAK_LABEL_INFO.items()}


@dataclass
class StudyResult:
    """What a study produced.

    Attributes
    ----------
    rows
        Summary table: one row per model (baseline, each weak label, holdout).
    evaluations
        Every evaluation: model, label, seed, epoch, nsc, nscb, map_nsc, map_nscb, and
        ``last`` (one of the last ``last_k`` snapshots).
    out
        The study folder.
    per_epoch
        NSC / NSCB / mAP against epoch: one dict per (model, label, epoch), averaged over
        seeds (held-out folds: pooled).
    """

    rows: list[dict]
    evaluations: list[dict]
    out: Path
    notes: list[str] = field(default_factory=list)
    per_epoch: list[dict] = field(default_factory=list)


#: How the best epoch is flagged: chosen on the labels it is scored with (the paper says so).
SELECTED = "selected with MoA labels"


def snapshot_epochs(epochs: int, every: int) -> list[int]:
    """The epochs with a teacher snapshot, every one evaluated: each multiple of ``every``
    up to ``epochs``, and ``epochs`` itself.

    >>> snapshot_epochs(12, 5)
    [5, 10, 12]
    """
    snaps = list(range(every, epochs + 1, every))
    if not snaps or snaps[-1] != epochs:
        snaps.append(epochs)
    return snaps


def _mean_std(values) -> tuple[float | None, float | None]:
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    if not np.isfinite(vals).any():
        return None, None
    return float(np.nanmean(vals)), float(np.nanstd(vals))


def epoch_curve(evals: list[dict]) -> list[dict]:
    """NSC / NSCB / mAP per evaluated epoch, each the mean over seeds, in epoch order."""
    by_epoch: dict[int, list[dict]] = {}
    for e in evals:
        if e.get("epoch") is not None:
            by_epoch.setdefault(e["epoch"], []).append(e)
    return [{"epoch": epoch, "n": len(group),
             **{m: _mean_std([e.get(m) for e in group])[0] for m in ("nsc", "nscb", "map_nsc")}}
            for epoch, group in sorted(by_epoch.items())]


def _epoch_columns(curve: list[dict]) -> dict:
    """The paper's two numbers from a curve: best epoch by NSC (Table 1; NSCB breaks ties)
    and the mean over every evaluated epoch (Table 2)."""
    scored = [p for p in curve if p.get("nsc") is not None]
    if not scored:
        return {}
    best = max(scored, key=lambda p: (p["nsc"], p.get("nscb") or 0.0))
    return {"best_epoch": f"{best['epoch']} ({SELECTED})", "best_epoch_nsc": best["nsc"],
            "best_epoch_nscb": best.get("nscb"),
            "nsc_over_epochs": _mean_std([p["nsc"] for p in curve])[0],
            "nscb_over_epochs": _mean_std([p.get("nscb") for p in curve])[0],
            "n_epochs": len(curve)}


def compound_folds(table: pd.DataFrame, k: int, seed: int = 0) -> list[list[str]]:
    """Split the annotated (non-control) compounds into ``k`` folds, deterministically."""
    compounds = sorted(table.loc[(table.moa != CONTROL) & (table.moa != ""), "compound"].unique())
    if k < 2 or k > len(compounds):
        raise DataError(f"--holdout-folds must be between 2 and {len(compounds)} (compounds).")
    order = np.random.default_rng(seed).permutation(len(compounds))
    return [sorted(compounds[i] for i in order[f::k]) for f in range(k)]


def _hide_moa(cache: Cache, compounds: Sequence[str]) -> Cache:
    """The same cache with the MoA of ``compounds`` blanked (training labels only)."""
    table = cache.table.copy()
    table.loc[table.compound.isin(compounds), "moa"] = ""
    return replace(cache, table=table)


def _summary(evals: list[dict], model: str, label: str) -> tuple[dict, list[dict]]:
    """A model's summary row and its curve against epoch."""
    allr = [e for e in evals if e["model"] == model and e["label"] == label]
    sel = [e for e in allr if e.get("last")]
    row = {"model": model, "weak_label": label, "n_evals": len(sel)}
    for m in ("nsc", "nscb", "map_nsc"):
        row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([e.get(m) for e in sel])
    curve = epoch_curve(allr)
    return {**row, **_epoch_columns(curve)}, curve


def run_study(
    cache: Cache | str | Path,
    out: str | Path,
    labels: Sequence[str] = ("none", "treatment", "compound", "moa"),
    *,
    seeds: int = 1,
    init: str = "",
    preset: str = "",
    eval_every: int | None = None,
    last_k: int = 3,
    holdout_folds: int = 0,
    embed_crop: int | None = None,
    channels: Sequence[str] | None = None,
    device: str = "auto",
    recipe: str = DEFAULT_RECIPE,
    **train_overrides,
) -> Generator[Progress, None, StudyResult]:
    """Run the protocol; a generator of progress events returning a :class:`StudyResult`.

    Parameters
    ----------
    cache
        Preprocessed cache (:func:`~napari_wsdino.core.cache.open_cache`).
    out
        Study folder (created; reused to resume).
    labels
        Weak labels to train with (``none`` is plain DINO).
    seeds
        Training seeds per label.
    init
        Initial weights for every model (e.g. the official ``dino_deitsmall8_pretrain.pth``);
        an init-only row embeds them unchanged. Empty: the preset's (the ``cpu`` preset:
        the bundled ``replica-dino-pico8-cells``); ``"random"``: random weights. A random-init
        ViT row is always there.
    preset
        Model/training size from :data:`napari_wsdino.core.presets.PRESETS`; empty (the
        default): the one whose views fit the cache's fields
        (:func:`~napari_wsdino.core.presets.preset_for`: ``cpu-hires`` for the default demo's
        320 x 400 cache, ``cpu`` from 64 px, ``gpu`` from 448 px).
    eval_every
        Epochs between teacher snapshots, every one evaluated (the paper: 5; default: a
        fifth of the epochs).
    last_k
        The last snapshots per run averaged in the mean ± sd columns (0: all). The best
        epoch and the mean over epochs take every snapshot.
    holdout_folds
        K > 1 adds the honest MoA variant: compound-fold cross-validation.
    channels
        Channels to model and concatenate (default: all the cache holds).
    recipe
        :mod:`~napari_wsdino.core.recipes` name: its training, embedding and evaluation
        settings go over the preset's (``paper-code`` and the ``gpu`` preset need ``init``;
        ``"random"`` says random weights on purpose).
    train_overrides
        Any :class:`~napari_wsdino.core.train.TrainConfig` field (e.g. ``epochs=20``).
    """
    plan = _plan_study(cache, out, preset, init, recipe, device, channels, embed_crop,
                       eval_every, last_k, train_overrides)
    # What each weak label can teach about batches on these fields (BBBC021: 1 of 38
    # compounds spans weeks), beside the table that compares them.
    plan.notes += [n for n in (weak_label_note(plan.cache.table, w) for w in labels) if n]
    evals = yield from _baselines(plan)
    runs = [(label, seed, None) for label in labels for seed in range(seeds)]
    folds = compound_folds(plan.cache.table, holdout_folds) if holdout_folds else []
    runs += [("moa_or_compound", 0, f) for f in range(len(folds))]
    for i, (label, seed, fold) in enumerate(runs):
        yield Progress("study", i, len(runs), f"training {_run_tag(label, seed, fold)}")
        evals += yield from _train_and_evaluate(plan, label, seed,
                                                None if fold is None else (fold, folds[fold]))
    yield Progress("study", len(runs), len(runs), "summarising")
    return _summarise(plan, evals)


@dataclass
class _StudyPlan:
    """What every run of a study shares: the cache, folder, base config and embedding."""

    cache: Cache
    out: Path
    channels: tuple[str, ...]
    base: object            # TrainConfig
    stages: object          # the recipe's resolved Settings
    embed: dict             # embed_cache keyword arguments (crop, pooling, windows ...)
    device: str
    epochs_eval: list[int]  # every snapshot
    last_epochs: list[int]  # the last ``last_k`` of them
    notes: list[str]


def _plan_study(cache, out, preset, init, recipe, device, channels, embed_crop, eval_every,
                last_k, train_overrides) -> _StudyPlan:
    from napari_wsdino.core.model import RANDOM_INIT
    from napari_wsdino.core.presets import embed_settings, preset_for, resolve_preset
    from napari_wsdino.core.recipes import check_init, get_recipe, resolve
    from napari_wsdino.core.train import TrainConfig

    r = get_recipe(recipe)
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    chosen = "" if preset else (f" (chosen for the cache's {cache.shape[0]} x {cache.shape[1]}"
                                " px fields; --preset names another)")
    preset = preset or preset_for(cache.shape)      # the one whose views fit the fields
    p = resolve_preset(preset)
    init = init or p.train.get("init", "")          # the cpu preset's: bundled weights
    check_init(init, r.requires_init or preset == "gpu",
               f"The study with preset {preset}{chosen} and recipe {recipe}")
    stages = resolve(recipe)
    init = "" if init == RANDOM_INIT else init
    channels = tuple(channels or cache.channels)
    missing = [c for c in channels if c not in cache.channels]
    if missing:
        raise DataError(f"Cache {cache.path} has no channel(s) {missing}; it has {list(cache.channels)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    embed = embed_settings(p, stages, recipe)
    embed["crop"] = embed_crop or p.embed_crop
    base = TrainConfig(device=device, **{**p.train, **r.train, **train_overrides, "init": init})
    if (eval_every is not None and eval_every < 0) or last_k < 0:
        raise DataError(f"--snapshot-every and --last are counts of epochs (>= 0), not "
                        f"{eval_every} and {last_k}.")
    eval_every = eval_every or max(1, base.epochs // 5)
    epochs_eval = snapshot_epochs(base.epochs, eval_every)
    last_epochs = epochs_eval[-last_k:] if last_k else list(epochs_eval)
    base = base.replace(snapshot_every=eval_every)
    notes = [f"preset {p.name}: {base.arch}, {base.epochs} epochs, snapshots every "
             f"{eval_every} epochs, all evaluated: {epochs_eval}; mean ± sd over epochs "
             f"{last_epochs}; channels {', '.join(channels)}",
             f"best epoch: the snapshot of highest NSC (mean over seeds), {SELECTED}, the "
             "labels it is scored with, as the paper notes for its Table 1; over epochs: the "
             "mean over every evaluated snapshot, as its Table 2"]
    return _StudyPlan(cache, out, channels, base, stages, embed, device, epochs_eval,
                      last_epochs, notes)


def _baselines(plan: _StudyPlan):
    """The no-fine-tuning rows: a random-init ViT, and the initial weights (init-only)
    when the study starts from some."""
    from napari_wsdino.core.modelset import ModelSet

    base = plan.base
    rows = [("random-init ViT", "baseline",
             lambda: ModelSet.random(base.arch, plan.channels, seed=0))]
    if base.init:
        rows.append(("init-only (no fine-tuning)", "baseline_init",
                     lambda: ModelSet.init_only(base.arch, base.init, plan.channels)))
    evals = []
    for name, folder, models in rows:
        res = yield from _embed_eval(plan, models(), plan.out / folder / "profiles.parquet")
        evals.append({"model": name, "label": "none", "seed": 0, "epoch": None, "last": True,
                      **res})
    return evals


def _run_tag(label: str, seed: int, fold: int | None) -> str:
    return f"{label}_seed{seed}" if fold is None else f"moa_holdout_fold{fold}"


def _train_and_evaluate(plan: _StudyPlan, label: str, seed: int, fold):
    """Train one run (resuming), then embed and evaluate its snapshots.
    ``fold``: ``(index, held-out compounds)`` for the MoA holdout, else None."""
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.train import train_channels

    run_dir = plan.out / _run_tag(label, seed, None if fold is None else fold[0])
    train_cache = plan.cache if fold is None else _hide_moa(plan.cache, fold[1])
    config = plan.base.replace(weak_label=label, seed=seed)
    yield from train_channels(train_cache, config, run_dir, plan.channels, resume=True)
    model = (f"{LABEL_NAMES[label]} ({label})" if fold is None
             else "WS-DINO (MoA, held-out folds)")
    evals = []
    for epoch in plan.epochs_eval:
        files = {ch: _snapshot(channel_dir(run_dir, ch), epoch, plan.base.epochs)
                 for ch in plan.channels}
        res = yield from _embed_eval(plan, ModelSet.from_files(files),
                                     run_dir / f"profiles_epoch{epoch:04d}.parquet",
                                     restrict=None if fold is None else fold[1])
        evals.append({"model": model, "label": label if fold is None else "moa (held out)",
                      "seed": seed, "fold": None if fold is None else fold[0], "epoch": epoch,
                      "last": epoch in plan.last_epochs, **res})
    return evals


def _summarise(plan: _StudyPlan, evals: list[dict]) -> StudyResult:
    """One summary row per (model, label), in first-seen order; writes the JSON files."""
    seen = list(dict.fromkeys((e["model"], e["label"]) for e in evals))
    rows, per_epoch = [], []
    for model, label in seen:
        row, curve = (_holdout_summary if label == "moa (held out)" else _summary)(
            evals, model, label)
        rows.append(row)
        per_epoch += [{"model": model, "weak_label": label, **p} for p in curve]
    atomic_write_text(plan.out / "evaluations.json", json.dumps(evals, indent=2, default=str))
    atomic_write_text(plan.out / "summary.json", json.dumps(
        {"rows": rows, "per_epoch": per_epoch, "notes": plan.notes}, indent=2, default=str))
    return StudyResult(rows=rows, evaluations=evals, out=plan.out, notes=plan.notes,
                       per_epoch=per_epoch)


def _holdout_summary(evals, model, label) -> tuple[dict, list[dict]]:
    """Pool the held-out treatments of all folds, per evaluated epoch, then average (the
    last snapshots for mean ± sd, every one for the best epoch and the mean over epochs)."""
    sel = [e for e in evals if e["model"] == model and e["label"] == label]
    by_epoch: dict[int, list[dict]] = {}
    for e in sel:
        by_epoch.setdefault(e["epoch"], []).append(e)
    curve = []
    for epoch, group in sorted(by_epoch.items()):
        point = {"epoch": epoch, "n": len(group), "last": all(e.get("last") for e in group)}
        for m in ("nsc", "nscb"):
            n = sum(e[f"n_{m}"] for e in group)
            point[m] = sum(e[f"{m}_hits"] for e in group) / n if n else None
        curve.append({**point, "map_nsc": None})
    last = [p for p in curve if p.pop("last")]
    row = {"model": model, "weak_label": label, "n_evals": len(last)}
    for m in ("nsc", "nscb"):
        row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([p[m] for p in last])
    row["map_nsc_mean"] = None
    row["map_nsc_std"] = None
    return {**row, **_epoch_columns(curve)}, curve


def _snapshot(channel_folder: Path, epoch: int, final: int) -> Path:
    snap = snapshot_path(channel_folder, epoch)
    if snap.exists():
        return snap
    if epoch == final:
        return channel_folder / CHECKPOINT_FILE
    raise DataError(f"No teacher snapshot for epoch {epoch} in {channel_folder}.")


def _embed_eval(plan: _StudyPlan, models, path: Path, restrict=None):
    """Embed (reusing a finished profile file made by the same weights and settings) and
    evaluate; returns the headline numbers (and hits on ``restrict``'s compounds)."""
    from napari_wsdino.core.embed import embed_cache
    from napari_wsdino.core.evaluation import evaluate_profiles
    from napari_wsdino.core.presets import headline
    from napari_wsdino.core.profiles import ProfileTable

    emb = plan.embed
    path.parent.mkdir(parents=True, exist_ok=True)
    provenance = path.with_suffix(".json")
    old = json.loads(provenance.read_text()) if path.exists() and provenance.exists() else {}
    same = (old.get("models", {}).get("fingerprint") == models.fingerprint()
            and all(old.get(k, d) == emb[k] for k, d in
                    (("windows", "centre"), ("median", "mean-middle"), ("l2", True),
                     ("pooling", "cls"), ("precision", "auto"), ("pos_embed", "timm"))))
    if same:
        profiles = ProfileTable.read(path)
    else:
        path.unlink(missing_ok=True)
        profiles = yield from embed_cache(plan.cache, models, path, device=plan.device, **emb)
    ev = plan.stages.evaluate
    result = evaluate_profiles(profiles, tvn=ev.tvn, drop_constant=True,
                               nscb_multibatch=ev.nscb_multibatch)
    out = headline(result)
    if restrict is not None:
        out.update(_restricted(result.neighbours, restrict))
    return out


def _restricted(nb, compounds) -> dict:
    """NSC / NSCB hits and counts over the treatments of ``compounds`` only."""
    out = {}
    held = nb.compound.isin(compounds)
    for m in ("nsc", "nscb"):
        col = f"{m}_correct"
        if col in nb:
            vals = nb.loc[held, col].dropna().astype(bool)
            out[f"{m}_hits"], out[f"n_{m}"] = int(vals.sum()), int(len(vals))
            out[m] = float(vals.mean()) if len(vals) else None
        else:
            out[f"{m}_hits"], out[f"n_{m}"] = 0, 0
    return out


def epoch_figure(result: StudyResult):
    """NSC and NSCB against epoch, one line per trained model, the best epoch by NSC
    starred; the models without epochs (baselines) as dashed levels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    axes = {m: fig.add_subplot(1, 2, i + 1) for i, m in enumerate(("nsc", "nscb"))}
    curves: dict[tuple, list[dict]] = {}
    for p in result.per_epoch:
        curves.setdefault((p["model"], p["weak_label"]), []).append(p)
    for (model, _), curve in curves.items():
        best = max((p for p in curve if p["nsc"] is not None), key=lambda p: p["nsc"],
                   default=None)
        for m, ax in axes.items():
            line, = ax.plot([p["epoch"] for p in curve],
                            [np.nan if p[m] is None else p[m] for p in curve],
                            marker=".", label=model)
            if best is not None and best[m] is not None:
                ax.plot([best["epoch"]], [best[m]], marker="*", ms=11, color=line.get_color())
    for r in result.rows:
        if (r["model"], r["weak_label"]) not in curves:
            for m, ax in axes.items():
                if r.get(f"{m}_mean") is not None:
                    ax.axhline(r[f"{m}_mean"], ls="--", lw=1, color="grey")
                    ax.annotate(r["model"], (0, r[f"{m}_mean"]), xycoords=("axes fraction",
                                "data"), fontsize=6, color="grey", va="bottom")
    for m, ax in axes.items():
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{m.upper()} (mean over seeds)")
        ax.set_ylim(0, 1)
    axes["nsc"].legend(fontsize=7)
    fig.suptitle(f"Every snapshot; star = best epoch by NSC ({SELECTED})", fontsize=9)
    fig.tight_layout()
    return fig


def study_report(result: StudyResult, data_label: str) -> dict[str, Path]:
    """Write ``report.html`` / ``.json`` / ``.csv`` for a study: the table, a bar chart,
    NSC / NSCB against epoch and the training curves."""
    from napari_wsdino.core.figures import bar_figure, png_bytes, read_log, training_curves_figure
    from napari_wsdino.core.report import Report, write_report

    bars = [{"model": f"{r['model']}", "nsc": r.get("nsc_mean"), "nscb": r.get("nscb_mean"),
             "map_nsc": r.get("map_nsc_mean")} for r in result.rows]
    figures = {"NSC / NSCB / mAP per model (mean over seeds and last epochs)":
               png_bytes(bar_figure(bars, title="study"))}
    sections = {"Every evaluation": result.evaluations}
    if result.per_epoch:
        figures["NSC / NSCB against epoch (every snapshot)"] = png_bytes(epoch_figure(result))
        sections = {"NSC / NSCB against epoch (mean over seeds)": result.per_epoch, **sections}
    logs = {}
    for run in sorted(p for p in result.out.iterdir()
                      if p.is_dir() and not p.name.startswith("baseline")):
        for ch_dir in sorted(d for d in run.iterdir() if d.is_dir()):
            logs[f"{run.name}/{ch_dir.name}"] = read_log(ch_dir / LOG_FILE)
    if logs:
        figures["Training curves"] = png_bytes(training_curves_figure(logs))
    report = Report(title="napari-wsdino study: the WS-DINO protocol", data_label=data_label,
                    rows=result.rows, figures=figures, sections=sections, notes=result.notes,
                    settings={"out": str(result.out)})
    return write_report(report, result.out)
