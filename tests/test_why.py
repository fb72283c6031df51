"""core.why: the "why" lines under surprising numbers (issue 28), without Qt or torch."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from napari_wsdino.core import layout
from napari_wsdino.core.train.settings import TrainConfig
from napari_wsdino.core.why import (TOLERANCE, evaluation_notes, fine_tune_facts,
                                    fine_tune_reasons, nscb_note, unmoved, unmoved_note)


def _evaluation(label, run, nsc, nscb, n_nsc=100, n_nscb=90):
    return SimpleNamespace(label=label, run=run, result=SimpleNamespace(
        nsc=nsc, nscb=nscb, n_nsc=n_nsc, n_nscb=n_nscb))


def _run(tmp_path, config: TrainConfig, steps: int):
    run = tmp_path / "compound_e2"
    layout.channel_dir(run, "DAPI").mkdir(parents=True)
    config.save(layout.config_path(run, "DAPI"))
    layout.log_path(run, "DAPI").write_text(
        "".join(json.dumps({"epoch": e, "step": steps * e // 2, "loss": 1.0, "lr": 1e-4}) + "\n"
                for e in (1, 2)))
    return run


def test_unmoved_is_within_the_tolerance_on_both_numbers():
    assert unmoved((0.359, 0.370), (0.359, 0.370))
    assert unmoved((0.359 + TOLERANCE, 0.370), (0.359, 0.370 - TOLERANCE))
    assert not unmoved((0.359 + 0.006, 0.370), (0.359, 0.370))
    assert not unmoved((0.359, 0.380), (0.359, 0.370))
    assert unmoved((0.359, None), (0.359, 0.2))  # NSCB not measured: NSC decides
    assert not unmoved((None, None), (0.359, 0.370))  # nothing to compare


def test_note_only_when_unmoved_or_same_weights():
    assert unmoved_note((0.45, 0.40), (0.359, 0.370)) is None
    assert unmoved_note((0.359, 0.370), None) is None
    assert "same weights as" in unmoved_note((0.45, 0.40), None, same_weights=True)
    note = unmoved_note((0.359, 0.370), (0.36, 0.37))
    assert note.startswith("Why the same as the initial weights") and "Try more epochs" in note


def test_reasons_read_from_the_runs_settings():
    short = TrainConfig(epochs=2, warmup_epochs=3, freeze_last_layer=2, momentum_teacher=0.99)
    reasons = " | ".join(fine_tune_reasons(short, steps=6))
    assert "only 6 steps" in reasons and "moved at most 6%" in reasons
    assert "warm-up (3 epochs) is as long as the run (2)" in reasons
    assert "last layer stayed frozen" in reasons
    # the paper's learning rate, a long enough run: the rate is the reason left
    paper = TrainConfig(epochs=20, warmup_epochs=3, momentum_teacher=0.99)
    assert [r.split(" ")[:2] for r in fine_tune_reasons(paper, steps=400)] == [["learning", "rate"]]
    # nothing found: said so rather than a wrong reason
    fast = TrainConfig(epochs=20, warmup_epochs=3, lr=1e-4, momentum_teacher=0.99)
    assert "may already fit" in fine_tune_reasons(fast, steps=400)[0]
    assert "too few epochs" in fine_tune_reasons(None, None)[0]


def test_nscb_note_only_above_nsc():
    assert nscb_note(0.5, 0.4, 100, 80) is None and nscb_note(None, 0.4, 100, 80) is None
    assert "90 treatments with a candidate in another batch (NSC: 100)" in nscb_note(
        0.4, 0.5, 100, 90)


def test_evaluation_notes_compare_a_run_with_its_initial_weights(tmp_path):
    config = TrainConfig(epochs=2, warmup_epochs=3, lr=1e-4, init="replica-dino-pico8-cells")
    run = _run(tmp_path, config, steps=6)
    assert fine_tune_facts(run) == (config, 6, "replica-dino-pico8-cells")
    trained = _evaluation("trained (wsdino_vit_pico_patch8) a1b2c3", "compound_e2", 0.37, 0.359)
    init = _evaluation("init-only (wsdino_vit_pico_patch8) 9f8e7d",
                       "init-only replica-dino-pico8-cells", 0.368, 0.36)
    other = _evaluation("init-only (wsdino_vit_pico_patch8) 000000", "init-only other", 0.1, 0.1)

    notes = evaluation_notes(trained, [init, other], run)
    assert len(notes) == 1 and "only 6 steps" in notes[0] and "warm-up" in notes[0]
    # no init-only evaluation of these weights, another run folder, or moved numbers: none
    assert evaluation_notes(trained, [other], run) == []
    assert evaluation_notes(trained, [init], tmp_path / "elsewhere") == []
    assert evaluation_notes(trained, [init], None) == []
    moved = _evaluation(trained.label, trained.run, 0.42, 0.359)
    assert evaluation_notes(moved, [init], run) == []
    # NSCB > NSC is explained as before, beside it
    both = _evaluation(trained.label, trained.run, 0.359, 0.37, n_nscb=80)
    init_b = _evaluation(init.label, init.run, 0.359, 0.37)
    assert [n.split(":")[0] for n in evaluation_notes(both, [init_b], run)] == [
        "Why NSCB > NSC", "Why the same as the initial weights"]


def test_why_loads_no_torch_or_qt():
    code = ("import sys, napari_wsdino.core.why\n"
            "print(sorted(m for m in ('torch', 'qtpy', 'napari') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
