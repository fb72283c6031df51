"""Shared fixtures: small, seeded, generated data; everything under tmp paths."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_METADATA = os.path.join(os.path.dirname(__file__), "..", "napari_wsdino", "data")


@pytest.fixture(scope="session")
def bundled_dir():
    from napari_wsdino.core.metadata import bundled_metadata_dir

    return bundled_metadata_dir()
