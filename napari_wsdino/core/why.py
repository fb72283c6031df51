"""Short reasons where a number surprises a reader (issue 28), as plain sentences.

Two cases are explained: NSCB above NSC (:func:`nscb_note`), and a fine-tune whose numbers
did not move from those of its initial weights (:func:`unmoved_note`, with the reasons
read from the run's settings and log by :func:`fine_tune_facts`). The Evaluate panel shows
them under its numbers; the decisions live here, without Qt, so tests read them directly.

Example
-------
>>> from napari_wsdino.core.train.settings import TrainConfig
>>> note = unmoved_note((0.359, 0.370), (0.359, 0.370),
...                     config=TrainConfig(epochs=2, warmup_epochs=3), steps=6)
>>> note.startswith("Why the same as the initial weights")
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from napari_wsdino.core import layout
from napari_wsdino.core.runpaths import weights_name
from napari_wsdino.core.train.settings import TrainConfig

#: NSC and NSCB closer than this to the initial weights' count as "did not move".
TOLERANCE = 0.005
#: Below this share of the way from its initial weights to the student, the teacher (the
#: weights that are evaluated) has hardly been trained.
TEACHER_MOVED = 0.5


def nscb_note(nsc: float | None, nscb: float | None, n_nsc: int, n_nscb: int) -> str | None:
    """Why NSCB can exceed NSC: they are scored on different treatments."""
    if nsc is None or nscb is None or nscb <= nsc:
        return None
    return (f"Why NSCB > NSC: NSCB scores only the {n_nscb} treatments with a candidate in "
            f"another batch (NSC: {n_nsc}), so the two are measured on different treatments; "
            "on ~100 treatments one run moves either by 0.05-0.1.")


def unmoved(trained: Sequence[float | None], initial: Sequence[float | None],
            tolerance: float = TOLERANCE) -> bool:
    """Whether ``(NSC, NSCB)`` of a fine-tune equal its initial weights' within ``tolerance``.

    >>> unmoved((0.359, 0.370), (0.361, 0.368)), unmoved((0.40, 0.37), (0.359, 0.370))
    (True, False)
    """
    pairs = [(a, b) for a, b in zip(trained, initial) if a is not None and b is not None]
    return bool(pairs) and all(abs(a - b) <= tolerance + 1e-9 for a, b in pairs)


def teacher_share(config: TrainConfig, steps: int) -> float:
    """How far the teacher (an EMA of the student) can have moved from its initial weights
    after ``steps`` steps: ``1 - momentum ** steps`` at the starting momentum (an upper
    bound, the momentum only rises towards 1).

    >>> round(teacher_share(TrainConfig(momentum_teacher=0.99), 6), 3)
    0.059
    """
    return 1.0 - config.momentum_teacher ** max(int(steps), 0)


def fine_tune_reasons(config: TrainConfig | None, steps: int | None) -> list[str]:
    """What in a run's settings keeps its weights near the initial ones."""
    if config is None:
        return ["too few epochs, or a learning rate too low for the initial weights"]
    reasons = []
    if steps is not None and teacher_share(config, steps) < TEACHER_MOVED:
        reasons.append(f"only {steps} steps: the evaluated teacher is an average of the student "
                       f"(momentum {config.momentum_teacher}) and moved at most "
                       f"{teacher_share(config, steps):.0%} of the way from its initial weights")
    if config.warmup_epochs >= config.epochs:
        reasons.append(f"the learning-rate warm-up ({config.warmup_epochs} epochs) is as long as "
                       f"the run ({config.epochs}): the rate never reached its peak {config.lr:g}")
    elif config.lr <= TrainConfig.lr:
        reasons.append(f"learning rate {config.lr:g} (the paper's, for 400 epochs on ImageNet "
                       "weights) is low for a short fine-tune of the bundled weights")
    if config.freeze_last_layer >= config.epochs:
        reasons.append(f"the head's last layer stayed frozen for the whole run "
                       f"(freeze_last_layer {config.freeze_last_layer})")
    return reasons or ["the initial weights may already fit these fields; the weak label "
                       "then adds little"]


def unmoved_note(trained: Sequence[float | None], initial: Sequence[float | None] | None, *,
                 config: TrainConfig | None = None, steps: int | None = None,
                 same_weights: bool = False, tolerance: float = TOLERANCE) -> str | None:
    """Why a fine-tune scored as its initial weights did, and what to try; None when it
    moved (or when there is nothing to compare with).

    ``trained`` and ``initial`` are ``(NSC, NSCB)``; ``same_weights``: the fine-tuned
    weights are the initial ones, bit for bit.
    """
    if not same_weights and (initial is None or not unmoved(trained, initial, tolerance)):
        return None
    what = ("the same weights as" if same_weights
            else f"within {tolerance:g} of the NSC / NSCB of")
    return (f"Why the same as the initial weights: the fine-tuned model has {what} its "
            f"initial weights; {'; '.join(fine_tune_reasons(config, steps))}. Try more epochs "
            "(Continue with more Epochs in 3a Train) or a higher learning rate (Advanced), "
            "e.g. the preset's own settings.")


def fine_tune_facts(run: str | Path, channels: Iterable[str] | None = None
                    ) -> tuple[TrainConfig | None, int | None, str]:
    """A run folder's training settings, its steps done and its initial weights (``init``),
    from the first channel (default: every channel folder) with a ``config.toml``;
    ``(None, None, "")`` when none has one."""
    if channels is None:
        channels = sorted(p.parent.name for p in Path(run).glob(f"*/{layout.CONFIG_FILE}"))
    for channel in channels:
        path = layout.config_path(run, channel)
        try:
            config = TrainConfig.load(path)
        except (OSError, ValueError):
            continue
        steps = None
        try:
            lines = layout.log_path(run, channel).read_text().splitlines()
            steps = int(json.loads(lines[-1])["step"]) if lines else 0
        except (OSError, ValueError, KeyError, IndexError):
            pass
        return config, steps, config.init
    return None, None, ""


def _metrics(evaluation) -> tuple[float | None, float | None]:
    return evaluation.result.nsc, evaluation.result.nscb


def evaluation_notes(evaluation, evaluations: Sequence = (), run: str | Path | None = None
                     ) -> list[str]:
    """The "why" lines of an evaluation (:class:`~napari_wsdino.core.evaluate_workflow.Evaluation`).

    NSCB above NSC; and, for a trained model set from the run folder ``run`` (ignored
    unless it is the set's: same name), whose initial weights were evaluated too (an
    ``init-only`` set of those weights among ``evaluations``, the latest), a fine-tune that
    did not move from them.
    """
    r = evaluation.result
    notes = [nscb_note(r.nsc, r.nscb, r.n_nsc, r.n_nscb)]
    if (run is not None and evaluation.label.startswith("trained")
            and evaluation.run == weights_name(run)):
        config, steps, init = fine_tune_facts(run)
        origin = f"init-only {weights_name(init)}" if init else None
        initial = next((e for e in reversed(evaluations)
                        if e.label.startswith("init-only") and e.run == origin), None)
        if initial is not None:
            same = evaluation.label.rsplit(" ", 1)[-1] == initial.label.rsplit(" ", 1)[-1]
            notes.append(unmoved_note(_metrics(evaluation), _metrics(initial), config=config,
                                      steps=steps, same_weights=same))
    return [n for n in notes if n]
