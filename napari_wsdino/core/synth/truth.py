"""The replica's ground truth: what the generator gave the cells of each field.

A field's truth profile is its cells' biology before any imaging: the mean over its
cells of each phenotype axis (:data:`.phenotypes.AXES`; the treatment's MoA vector with
the compound's twist, at the dose's strength, in the cells that respond, with the week's
change of drug response and, in ``v2``, each cell's natural variation), the week's
biological drifts of cell and nuclear size and stress fibres, the fractions of mitotic,
lobed and binucleate cells, and the cell density. Nothing of the
staining, focus, background, illumination, exposure or camera noise goes in.

It is the best a profile can do on the replica: ``wsdino evaluate DATA/truth.parquet``
scores the ceiling of NSC and NSCB. The cells are drawn again with the field's own
generator, exactly as :func:`.render.render_field` draws them first, so the truth is the
truth of the written images, at their size (a smaller image shows fewer cells).

Example
-------
>>> X = truth_matrix(field_specs("mini", 1), (64, 80), seed=0)       # doctest: +SKIP
>>> X.shape[1] == len(TRUTH_FEATURES)                                # doctest: +SKIP
True
"""

from __future__ import annotations

import numpy as np

from napari_wsdino.core.synth.phenotypes import (AXES, SynthConfig, batch_nuisance,
                                                 stable_seed)
from napari_wsdino.core.synth.render import BASE_CELLS, cells

#: The file ``wsdino synth`` writes beside the images.
TRUTH_FILE = "truth.parquet"
#: Fractions of cells in a state (each seen in DMSO too), then the log density.
_STATES = ("mitotic", "lobed", "binuc")
#: Week drifts that are the cells' own biology (the rest of the week effect is imaging).
_DRIFTS = {"cell_size": "cell_size", "nuc_size": "nuc_size", "act_fibres": "act_fibre"}
TRUTH_FEATURES: tuple[str, ...] = (
    *(f"truth_{a}" for a in AXES),
    *(f"truth_{s}_fraction" for s in _STATES),
    "truth_log_density",
)


def field_truth(spec: dict, size: tuple[int, int], seed: int,
                config: SynthConfig = SynthConfig()) -> np.ndarray:
    """The truth profile (:data:`TRUTH_FEATURES`) of one BBBC021 replica field spec."""
    batch = batch_nuisance(spec["batch"], seed, config)
    rng = np.random.default_rng(stable_seed(seed, "field", spec["plate"], spec["well"], spec["site"]))
    c = cells(rng, (int(size[0]), int(size[1])), spec["vec"], spec["dose"], batch, config)
    axes = c.E.mean(axis=0)
    for axis, drift in _DRIFTS.items():
        axes[AXES.index(axis)] += batch[drift]
    states = [float(np.mean(c[s])) for s in _STATES]
    density = np.log(c.n / (BASE_CELLS * config.density * c.area))
    return np.concatenate([axes, states, [density]]).astype(np.float64)


def truth_matrix(specs: list[dict], size: tuple[int, int], seed: int,
                 config: SynthConfig = SynthConfig()) -> np.ndarray:
    """``(fields, features)`` truth profiles of ``specs``, in their order."""
    return np.stack([field_truth(s, size, seed, config) for s in specs])
