"""Schedules against the closed forms of DINO's cosine scheduler."""

from __future__ import annotations

import math

import numpy as np

from napari_wsdino.core.schedules import cosine_schedule, warmup_constant


def test_lr_warms_up_linearly_then_decays_by_cosine():
    s = cosine_schedule(4e-6, 1e-6, epochs=20, steps_per_epoch=5, warmup_epochs=10)
    assert len(s) == 100
    np.testing.assert_allclose(s[:50], np.linspace(0, 4e-6, 50))
    i = np.arange(50)
    np.testing.assert_allclose(s[50:], 1e-6 + 1.5e-6 * (1 + np.cos(math.pi * i / 50)))
    assert s[50] == 4e-6 and np.all(np.diff(s[50:]) < 0)


def test_momentum_rises_from_099_to_1_and_warmup_is_clamped():
    m = cosine_schedule(0.99, 1.0, epochs=3, steps_per_epoch=4)
    assert m[0] == 0.99 and np.all(np.diff(m) > 0) and m[-1] < 1.0
    short = cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=3, warmup_epochs=10)
    np.testing.assert_allclose(short, np.linspace(0, 1, 6))


def test_teacher_temperature_warmup_per_epoch():
    t = warmup_constant(0.02, 0.04, epochs=4, steps_per_epoch=2, warmup_epochs=3)
    np.testing.assert_allclose(t, [0.02, 0.02, 0.03, 0.03, 0.04, 0.04, 0.04, 0.04])
    assert np.all(warmup_constant(0.04, 0.04, 5, 3) == 0.04)
