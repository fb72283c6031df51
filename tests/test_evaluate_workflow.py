"""core.evaluate_workflow: the Evaluate panel's work without Qt (cache + models -> numbers, map)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from napari_helpers import write_tiny_cache

from napari_wsdino.core import layout
from napari_wsdino.core.evaluate_workflow import evaluate_job, profiles_path_for
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.profiles import PLATE, WELL, ProfileTable
from napari_wsdino.core.progress import run_to_end

COMPOUNDS = ("taxol", "docetaxel", "ALLN", "MG-132", "DMSO")


def test_evaluate_job_is_the_core_evaluation_plus_a_map_of_wells(tmp_path):
    cache = write_tiny_cache(tmp_path / "cache", per_compound=8, size=32, compounds=COMPOUNDS)
    models = ModelSet.random("test_vit", ("DAPI", "Tubulin", "Actin"), seed=0)
    stages = []
    ev = run_to_end(evaluate_job(cache, models, tvn="paper", crop=16, device="cpu",
                                 level="wells", method="pca"),
                    lambda e: stages.append(e.stage))
    # the profiles go where core.layout says, beside the cache
    expected = layout.profiles_path(cache.path, "random", models.fingerprint())
    assert ev.profiles_path == expected == profiles_path_for(cache, models)
    assert expected.parent == cache.path.parent / "profiles" and expected.exists()
    assert "evaluate" in stages and len(ev.profiles) == 40
    # the numbers are those of core.evaluation on the written profiles
    ref = evaluate_profiles(ProfileTable.read(expected), "paper")
    assert (ev.result.nsc, ev.result.n_nsc, ev.result.n_fields) == (ref.nsc, ref.n_nsc, 40)
    # one map point per (plate, well), named by plate and well
    wells = cache.table.groupby(["plate", "well"]).ngroups
    assert len(ev.points) == wells and ev.xy.shape == (wells, 2) and np.isfinite(ev.xy).all()
    meta = ev.points.meta
    assert ev.names[0].startswith(f"{meta[PLATE].iloc[0]}/{meta[WELL].iloc[0]}: ")
    assert ev.confusion["NSC"].index.name == "true MoA"
    assert ev.label.startswith("random (test_vit, test_vit, test_vit) ")


def test_evaluate_workflow_imports_no_qt_or_napari():
    code = ("import sys, napari_wsdino.core.evaluate_workflow\n"
            "print([m for m in ('qtpy', 'PyQt5', 'PyQt6', 'napari', 'magicgui', 'superqt')"
            " if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_evaluation_is_named_by_run_weak_label_and_time(tmp_path):
    from datetime import datetime

    from napari_helpers import write_tiny_run

    from napari_wsdino.core.evaluate_workflow import display_name

    run = write_tiny_run(tmp_path / "runs" / "compound_e30", weak_label="moa")
    models = ModelSet.from_run(run)
    assert (models.origin, models.weak_label) == ("compound_e30", "moa")
    # the same run through --model files (a checkpoint file, a channel folder) is named alike
    files = ModelSet.from_files({"DAPI": run / "DAPI" / "checkpoint.pth", "Tubulin": run / "Tubulin",
                                 "Actin": run})
    assert (files.origin, files.weak_label) == ("compound_e30", "moa")
    assert ModelSet.random("test_vit", ("DAPI",), seed=3).origin == "random (seed 3)"
    cache = write_tiny_cache(tmp_path / "cache", per_compound=4, size=32, compounds=COMPOUNDS)
    before = datetime.now().replace(microsecond=0)
    ev = run_to_end(evaluate_job(cache, models, tvn="paper", crop=16, device="cpu",
                                 level="treatments", method="pca"))
    assert ev.display_fields()["run"] == "compound_e30" and ev.weak_label == "moa"
    assert before <= datetime.fromisoformat(ev.evaluated_at) <= datetime.now()
    when = datetime.fromisoformat(ev.evaluated_at)
    assert ev.display_name == f"compound_e30 · weak label MoA · {when:%H:%M}"
    assert ev.label.startswith("trained (test_vit, test_vit, test_vit) ")  # identity unchanged
    # another day: the date instead of the time
    assert display_name("r", "none", "2026-01-02T09:30:00", now=datetime(2026, 1, 3)) == \
        "r · weak label none (plain DINO) · 2026-01-02"
