"""The evaluate workflow: a cache and a model set to NSC / NSCB / mAP and a 2-D map.

One progress generator (:func:`evaluate_job`) embeds every field of a cache with a
model set (``core.embed.embed_cache``; finished chunks are kept, so a rerun resumes),
runs TVN, aggregation and matching (``core.evaluation.iter_evaluate``) and projects
the treatment (or well) profiles to 2-D (``core.projection.project_2d``). The
Evaluate panel runs it in a worker; a script or the CLI can drive it with
``core.progress.run_to_end``. No Qt here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Generator

import numpy as np
import pandas as pd

from napari_wsdino.core.aggregate import aggregate_wells
from napari_wsdino.core.cache import Cache
from napari_wsdino.core.evaluation import EvaluationResult, iter_evaluate
from napari_wsdino.core.errors import DataError
from napari_wsdino.core.fsio import COMPLETE_FILE, file_set_state, output_lock, write_file_set
from napari_wsdino.core.layout import profiles_path
from napari_wsdino.core.presets import preset_embedding
from napari_wsdino.core.profiles import BATCH, MOA, PLATE, TREATMENT, WELL, ProfileTable
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.projection import project_2d
from napari_wsdino.core.sampler import WEAK_LABEL_INFO

#: What a map point stands for.
LEVELS = ("treatments", "wells")
#: The numbers of an evaluation's result set (``wsdino evaluate --out``), a results JSON.
METRICS_FILE = "metrics.json"


@dataclass
class Evaluation:
    """What one evaluation produced: profiles, numbers, and the map's points."""

    label: str
    profiles: ProfileTable
    result: EvaluationResult
    points: ProfileTable  # the profiles drawn in the map (treatments or wells)
    xy: np.ndarray
    level: str
    profiles_path: Path | None
    names: list[str] = field(default_factory=list)
    confusion: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: The preset whose embedding ran (empty: none, the panel's crop alone), and every
    #: change the run made to what was asked (a crop clamped to the field ...).
    preset: str = ""
    notes: list[str] = field(default_factory=list)
    #: How a person tells evaluations apart (:func:`display_name`): the model set's run
    #: folder or weights (``ModelSet.origin``), its weak label, and when it was evaluated
    #: (ISO local time). :attr:`label` stays the set's identity (kind, architectures, hash).
    run: str = ""
    weak_label: str = ""
    evaluated_at: str = ""

    def display_fields(self) -> dict[str, str]:
        """``run``, ``weak_label``, ``evaluated_at``: what results files and Compare show."""
        return {"run": self.run, "weak_label": self.weak_label,
                "evaluated_at": self.evaluated_at}

    @property
    def display_name(self) -> str:
        return display_name(self.run or self.label, self.weak_label, self.evaluated_at)


def profiles_path_for(cache: Cache, models) -> Path:
    """Where a cache's profiles for a model set go (``core.layout.profiles_path``)."""
    return profiles_path(cache.path, models.kind, models.fingerprint())


def model_set_label(models) -> str:
    """How a model set is named in results and in Compare (hashes its weights: slow)."""
    return f"{models.kind} ({', '.join(models.archs.values())}) {models.fingerprint()[:6]}"


def display_name(run: str, weak_label: str = "", evaluated_at: str = "",
                 now: datetime | None = None) -> str:
    """An evaluation as a person tells it apart: run folder (or weights), weak label, and
    when it was evaluated (``HH:MM`` today, else the date).

    Example
    -------
    >>> display_name("compound_e30", "compound", "2026-03-02T14:05:00",
    ...              now=datetime(2026, 3, 2, 18, 0))
    'compound_e30 · weak label compound · 14:05'
    >>> display_name("random (seed 0)", "", "2026-03-01T14:05:00", now=datetime(2026, 3, 2))
    'random (seed 0) · 2026-03-01'
    """
    parts = [run]
    if weak_label:
        titles = [WEAK_LABEL_INFO[w].title if w in WEAK_LABEL_INFO else w
                  for w in weak_label.split("/")]
        parts.append(f"weak label {'/'.join(titles)}")
    try:
        when = datetime.fromisoformat(evaluated_at) if evaluated_at else None
    except ValueError:
        when = None
    if when is not None:
        today = (now or datetime.now()).date()
        parts.append(when.strftime("%H:%M") if when.date() == today else when.date().isoformat())
    return " · ".join(parts)


def labelled_confusion(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix with its axes named: true MoA (rows), predicted MoA (columns)."""
    return matrix.rename_axis(index="true MoA",
                              columns="predicted MoA (of the nearest neighbour)")


def point_names(points: ProfileTable, level: str) -> list[str]:
    """Hover names of the map's points ("treatment (MoA)", wells prefixed by plate/well)."""
    meta = points.meta
    if level == "treatments":
        return [f"{t} ({m})" for t, m in zip(meta[TREATMENT], meta[MOA])]
    return [f"{p}/{w}: {t} ({m})" for p, w, t, m in
            zip(meta[PLATE], meta[WELL], meta[TREATMENT], meta[MOA])]


def embedding_notes(cache: Cache, models, settings: dict, preset: str = "") -> list[str]:
    """What a user should know before reading the numbers: a crop clamped to the field
    or the patch size, a cache normalised otherwise than the preset says."""
    from napari_wsdino.core.embed.crops import DEFAULT_CROP, crop_sides
    from napari_wsdino.core.presets import PRESETS, preprocess_settings

    notes = []
    windows, crop = settings.get("windows", "centre"), settings.get("crop", DEFAULT_CROP)
    if windows != "official":
        sides = set(crop_sides(models, tuple(cache.shape), crop, windows).values())
        if sides != {crop}:
            notes.append(f"Crop px {crop} does not fit the {cache.shape[0]} x {cache.shape[1]} "
                         f"fields and the models' patches: embedded at "
                         f"{', '.join(str(s) for s in sorted(sides))} px.")
    if preset:
        want = preprocess_settings(PRESETS[preset]).normalize
        have = (cache.settings.get("settings") or {}).get("normalize")
        if have is not None and have != want:
            notes.append(f"The cache was normalised '{have}'; the {preset} recipe normalises "
                         f"'{want}' (2 Preprocess): profiles differ from the demo's.")
    return notes


def evaluate_job(cache: Cache, models, out: Path | None = None, *, tvn: str,
                 crop: int | None = None, device: str, level: str, method: str,
                 label: str | None = None, preset: str = ""
                 ) -> Generator[Progress, None, Evaluation]:
    """Embed, evaluate and project, as one progress generator.

    Everything slow happens here: hashing the weights (label and profiles file),
    embedding, TVN and matching, the 2-D map and the names of its points.

    Parameters
    ----------
    cache
        The preprocessed cache (``core.cache.open_cache``).
    models
        A ``core.modelset.ModelSet`` with a model for each of the cache's channels.
    out
        Profiles file (Parquet); default beside the cache (:func:`profiles_path_for`).
    tvn, crop, device
        TVN method (``core.tvn.METHODS``), crop side in px (default: the preset's), torch
        device or ``"auto"``.
    level, method
        Map points (:data:`LEVELS`) and projection (``"umap"`` or ``"pca"``).
    label
        Name of the model set in the results; default :func:`model_set_label`.
    preset
        Embed as this preset does (``core.presets.PRESETS``; windows, pooling, crop), so the
        profiles equal ``wsdino embed --preset`` 's and the demo's; empty: the package's
        defaults with ``crop``.

    Returns
    -------
    Evaluation

    Examples
    --------
    >>> from napari_wsdino.core.progress import run_to_end
    >>> ev = run_to_end(evaluate_job(cache, models, tvn="paper", crop=224,
    ...                              device="cpu", level="treatments", method="pca"))  # doctest: +SKIP
    >>> ev.result.nsc, ev.xy.shape                                                    # doctest: +SKIP
    (0.92, (103, 2))
    """
    from napari_wsdino.core.embed import embed_cache  # torch: not for write_evaluation

    yield Progress("evaluate", 0, 1, "checking the model set")
    label = label or model_set_label(models)
    out = out or profiles_path_for(cache, models)
    settings = preset_embedding(preset, crop)
    notes = embedding_notes(cache, models, settings, preset)
    profiles = yield from embed_cache(cache, models, out, device=device, **settings)
    batches = profiles.meta[BATCH].astype(str).nunique() if BATCH in profiles.meta else 0
    if batches < 2:  # NSCB needs another batch to match in
        notes.append("One batch only: NSC alone (NSCB needs fields of two batches or more).")
    result = yield from iter_evaluate(profiles, tvn, nscb=batches >= 2)
    points = result.treatments if level == "treatments" else aggregate_wells(profiles)
    yield Progress("evaluate", 0, 1, f"{method.upper()} of {len(points)} {level}")
    xy = project_2d(points.features, method=method)
    confusion = {"NSC": labelled_confusion(result.confusion_nsc)}
    if result.confusion_nscb is not None:
        confusion["NSCB"] = labelled_confusion(result.confusion_nscb)
    return Evaluation(label, profiles, result, points, np.asarray(xy), level, out,
                      point_names(points, level), confusion, preset, notes,
                      run=getattr(models, "origin", ""),
                      weak_label=getattr(models, "weak_label", ""),
                      evaluated_at=datetime.now().isoformat(timespec="seconds"))


def evaluation_files(result: EvaluationResult) -> dict:
    """The files of an evaluation's result set, by name: ``{name: write(path)}``."""
    from napari_wsdino.core.figures import confusion_figure, per_moa_figure, save_figure

    files = {"treatment_profiles.csv": result.treatments.write,
             "neighbours.csv": lambda p: result.neighbours.to_csv(p, index=False)}
    for rule, table in (("nsc", result.confusion_nsc), ("nscb", result.confusion_nscb)):
        if table is None:
            continue
        files[f"confusion_{rule}.csv"] = table.to_csv
        files[f"confusion_{rule}.png"] = (
            lambda p, t=table, r=rule: save_figure(confusion_figure(t, r.upper()), p))
    files["per_moa.png"] = lambda p: save_figure(
        per_moa_figure(result.per_moa, "Accuracy per MoA"), p)
    files[METRICS_FILE] = lambda p: p.write_text(json.dumps(result.to_dict(), indent=2))
    return files


def write_evaluation(result: EvaluationResult, out: str | Path) -> list[Path]:
    """Write an evaluation's tables, figures and ``metrics.json`` into folder ``out`` as
    one set (:func:`~napari_wsdino.core.fsio.write_file_set`): an interrupted or failed
    write leaves an earlier set there whole, and ``complete.json``, written last, marks
    a finished one (:func:`evaluation_state`). One writer at a time
    (:func:`~napari_wsdino.core.fsio.output_lock`).

    Example
    -------
    >>> write_evaluation(result, "EV")                         # doctest: +SKIP
    [PosixPath('EV/treatment_profiles.csv'), ..., PosixPath('EV/metrics.json')]
    """
    with output_lock(out, "this evaluation"):
        return write_file_set(out, evaluation_files(result),
                              {"nsc": result.nsc, "nscb": result.nscb})


def evaluation_state(out: str | Path) -> str:
    """``"complete"``, ``"incomplete"`` (cut short, or written before sets were marked:
    do not trust it) or ``"absent"``: what an evaluation folder holds."""
    return file_set_state(out)[0]


def read_results(path: str | Path) -> dict:
    """The numbers of a results JSON (``EvaluationResult.to_dict()`` keys): Evaluate's
    export, ``wsdino evaluate --json``, or an evaluation folder (``--out``) or its
    ``metrics.json``, whose ``run`` is then the folder's name.

    A result set is read only when complete (``complete.json``, :func:`evaluation_state`):
    one cut short, or written before sets were marked, raises :class:`DataError` naming
    the folder and the fix, so that no panel shows it as a finished result.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    in_set = path.is_dir() or (folder / COMPLETE_FILE).exists() or (
        path.name == METRICS_FILE and (folder / "treatment_profiles.csv").exists())
    if in_set:
        state, names = file_set_state(folder)
        name = METRICS_FILE if path.is_dir() else path.name
        if state != "complete" or name not in names:
            raise DataError(
                f"{folder} holds an incomplete evaluation (no complete {COMPLETE_FILE}: cut "
                "short, or written before result sets were marked): rerun 'wsdino evaluate "
                f"PROFILES --out {folder}' (or evaluate in the Evaluate panel) to complete it.")
        path = folder / name
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not a results JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a results JSON (it holds a {type(data).__name__}).")
    if in_set:
        data.setdefault("run", folder.name)
    return data
