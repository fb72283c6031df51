"""Shared fixtures: small, seeded, generated data; everything under tmp paths."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Load torch's optional triton (through timm → torchvision → torch._dynamo) before any test
# starts a Qt/OpenGL canvas: triton's LLVM loaded after Mesa's libLLVM crashes the process.
# The plugin itself guards against this in napari_wsdino/_napari/__init__.py.
import timm  # noqa: E402,F401

SHARED_METADATA = os.path.join(os.path.dirname(__file__), "..", "napari_wsdino", "data")


@pytest.fixture(scope="session")
def bundled_dir():
    from napari_wsdino.core.metadata import bundled_metadata_dir

    return bundled_metadata_dir()


@pytest.fixture(scope="session")
def mini_replica(tmp_path_factory):
    """Path of a ``mini`` synthetic replica (292 fields, 64 x 80 px, seed 0), made once."""
    from napari_wsdino.core.synth import make_replica

    return make_replica(tmp_path_factory.mktemp("replica") / "mini", subset="mini",
                        size=(64, 80), seed=0, workers=1)
