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
