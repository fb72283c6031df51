"""MoA phenotypes, dose–response, per-compound twists and batch / plate nuisance.

A phenotype is a vector over :data:`AXES`; 0 everywhere is an untreated (DMSO) MCF-7
cell. Each MoA has a base vector from its known cell biology (Caie et al. 2010;
Ljosa et al. 2013); each compound scales and perturbs it (its "twist"), and its
strength at a concentration follows a Hill curve whose EC50 sits inside the
compound's tested range, so the lowest doses are the hard ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

#: Phenotype axes. Sizes are natural-log multipliers; the rest are 0..1 propensities
#: or signed changes (see the comments in :data:`MOA_PHENOTYPES`).
AXES: tuple[str, ...] = (
    "nuc_size",     # log nuclear size
    "nuc_bright",   # log DAPI intensity
    "lobes",        # multi-lobed / polyploid nuclei
    "mitotic",      # mitotic arrest: round cell, condensed DNA
    "rosette",      # arrested DNA as a ring around a monoastral spindle
    "micronuclei",  # micronuclei per cell
    "binuc",        # binucleated cells (failed cytokinesis)
    "cell_size",    # log cell size
    "round",        # rounder, smoother outline
    "spread",       # elongated, irregular, spread outline
    "tub_diffuse",  # loss of microtubule filaments (diffuse tubulin)
    "tub_bundle",   # thick microtubule bundles
    "asters",       # extra microtubule asters
    "tub_aggr",     # perinuclear tubulin aggregate (aggresome)
    "tub_int",      # log tubulin intensity
    "act_puncta",   # actin aggregates and puncta
    "act_fibres",   # signed change of stress fibres
    "act_cortex",   # signed change of cortical actin
    "act_int",      # log actin intensity
    "density",      # log cell density
    "colony",       # compact epithelial colonies
)
_IX = {a: i for i, a in enumerate(AXES)}
_CONTINUOUS = np.array([a in ("nuc_size", "nuc_bright", "cell_size", "round", "spread", "tub_diffuse",
                              "tub_int", "act_fibres", "act_cortex", "act_int", "density")
                        for a in AXES], dtype=float)

#: Full-strength phenotype of each MoA (axes not named are 0).
MOA_PHENOTYPES: dict[str, dict[str, float]] = {
    "Microtubule destabilizers": dict(
        mitotic=0.85, round=0.9, tub_diffuse=1.0, nuc_bright=0.35, cell_size=-0.25,
        act_fibres=-0.5, density=-0.2, micronuclei=0.2),
    "Microtubule stabilizers": dict(
        tub_bundle=1.0, asters=0.8, micronuclei=0.9, mitotic=0.35, tub_int=0.35,
        nuc_size=0.1, round=0.2),
    "Actin disruptors": dict(
        act_puncta=1.0, act_fibres=-0.9, act_cortex=-0.6, binuc=0.6, spread=0.3,
        round=0.2, cell_size=-0.1),
    "Aurora kinase inhibitors": dict(
        nuc_size=0.75, lobes=1.0, cell_size=0.5, binuc=0.25, density=-0.35,
        micronuclei=0.3),
    "Eg5 inhibitors": dict(
        mitotic=0.9, rosette=1.0, round=0.9, asters=0.2, cell_size=-0.2, nuc_bright=0.3),
    "DNA damage": dict(
        nuc_size=0.4, cell_size=0.45, density=-0.5, spread=0.45, micronuclei=0.35,
        act_fibres=0.4, nuc_bright=-0.1),
    "DNA replication": dict(
        nuc_size=0.3, cell_size=0.3, density=-0.35, nuc_bright=-0.2, spread=0.25,
        act_fibres=0.2),
    "Protein degradation": dict(
        tub_aggr=1.0, act_int=0.15, round=0.3, nuc_bright=0.1, density=-0.15),
    "Protein synthesis": dict(
        cell_size=-0.35, nuc_size=-0.15, tub_int=-0.4, act_int=-0.35, nuc_bright=-0.25,
        density=-0.55, round=0.3),
    "Cholesterol-lowering": dict(spread=0.5, act_fibres=0.3, cell_size=0.12, round=-0.2),
    "Kinase inhibitors": dict(spread=-0.3, round=0.35, act_cortex=0.4, act_fibres=-0.3,
                              cell_size=-0.1),
    "Epithelial": dict(colony=1.0, act_cortex=0.7, cell_size=-0.2, round=0.4,
                       act_fibres=-0.4, density=0.25),
}


#: Replica versions: ``v1`` (2026-11-25, the week's drug response dominates the batch
#: effect) and ``v2`` (2026-12-07, calibrated against BBBC021 on profiles no training
#: touches: a mostly technical week effect, visible on DMSO; docs/replica.md).
REPLICA_VERSIONS = ("v1", "v2")
DEFAULT_REPLICA = "v2"


@dataclass(frozen=True)
class SynthConfig:
    """Difficulty knobs of the replica (defaults: the calibrated ``v2`` replica).

    :func:`replica_config` gives each version's calibrated knobs; ``SynthConfig()`` is
    ``replica_config("v2")``.

    Attributes
    ----------
    version
        Replica version (:data:`REPLICA_VERSIONS`); ``v1`` reproduces the files of the
        first replica byte for byte with :data:`V1_CONFIG`.
    phenotype_strength
        Multiplies every MoA effect (0: all treatments look like DMSO).
    compound_twist
        Size of each compound's own deviation from its MoA (0: compounds of a MoA
        identical up to dose; large: MoAs blur into each other).
    dose_shift
        Shifts every EC50, in log10 units; positive makes low doses weaker (harder).
    responder_fraction
        Fraction of cells responding at saturating dose; the rest look untreated.
    batch_strength
        Multiplies the per-week nuisance (stain gain, background, focus, cell size and
        cytoskeleton shifts, drug response). 0: no batch effects.
    batch_response
        Multiplies the per-week change of drug response alone (treated cells only;
        invisible in DMSO, so DMSO-based normalisation cannot undo it).
    illumination_strength
        Multiplies per-plate vignetting and gradients. 0: flat illumination.
    noise
        Multiplies read noise and divides the photon count (shot noise).
    density
        Multiplies the mean number of cells per field.
    density_jitter
        Field-to-field log-normal spread of cell density.
    stain_sd, background_sd
        Log-sd of the week's stain gain and background, per channel.
    focus, focus_sd
        Mean and sd of the week's defocus blur, in full-resolution camera pixels.
    exposure_sd
        Log-sd of the week's exposure (photons per grey level: the week's noise level).
    gamma_sd
        Log-sd of the week's stain response curve per channel (signal to the power gamma:
        staining that saturates or is uneven in a week; no per-plate scaling undoes it).
    drift
        Multiplies the week's biological drifts (cell and nuclear size, density, fibre
        contrast, chromatin texture).
    natural_variation
        Per-cell sd of every phenotype axis around the treatment's value (cell-to-cell
        biology; 0 in ``v1``).
    """

    version: str = DEFAULT_REPLICA
    phenotype_strength: float = 1.2
    compound_twist: float = 0.35
    dose_shift: float = -0.3
    responder_fraction: float = 0.9
    batch_strength: float = 1.0
    batch_response: float = 0.3
    illumination_strength: float = 1.0
    noise: float = 1.0
    density: float = 1.0
    density_jitter: float = 0.25
    stain_sd: float = 0.4
    background_sd: float = 0.45
    focus: float = 1.2
    focus_sd: float = 1.2
    exposure_sd: float = 0.3
    gamma_sd: float = 0.0
    drift: float = 1.0
    natural_variation: float = 0.05

    def __post_init__(self):
        if self.version not in REPLICA_VERSIONS:
            raise ValueError(f"Unknown replica version {self.version!r}; choose one of "
                             f"{', '.join(REPLICA_VERSIONS)}.")


#: The first replica's knobs (every number computed before 2026-12-07 used them).
V1_CONFIG = SynthConfig(
    version="v1", phenotype_strength=1.0, compound_twist=0.35, dose_shift=0.0,
    responder_fraction=0.85, batch_strength=1.0, batch_response=1.0, illumination_strength=1.0,
    noise=1.0, density=1.0, density_jitter=0.25, stain_sd=0.3, background_sd=0.35, focus=0.9,
    focus_sd=0.6, exposure_sd=0.0, gamma_sd=0.0, drift=1.0, natural_variation=0.0)
#: The v2 replica's calibrated knobs (benchmarks/calibrate_replica.py, docs/replica.md).
V2_CONFIG = SynthConfig(version="v2")
_VERSION_CONFIGS = {"v1": V1_CONFIG, "v2": V2_CONFIG}


def replica_config(version: str = DEFAULT_REPLICA, **knobs) -> SynthConfig:
    """A version's calibrated knobs, with ``knobs`` changed.

    >>> replica_config("v1").batch_response
    1.0
    """
    if version not in _VERSION_CONFIGS:
        raise ValueError(f"Unknown replica version {version!r}; choose one of "
                         f"{', '.join(REPLICA_VERSIONS)}.")
    return replace(_VERSION_CONFIGS[version], **knobs)


def stable_seed(seed: int, *keys) -> np.random.SeedSequence:
    """A seed sequence from a user seed and string keys (stable across runs and OSs)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.SeedSequence(words)


def moa_vector(moa: str) -> np.ndarray:
    vec = np.zeros(len(AXES))
    for axis, value in MOA_PHENOTYPES.get(moa, {}).items():
        vec[_IX[axis]] = value
    return vec


def compound_vector(moa: str, compound: str, seed: int, config: SynthConfig) -> np.ndarray:
    """The compound's full-strength phenotype: its MoA's, scaled and twisted."""
    base = moa_vector(moa)
    if not base.any():
        return base
    rng = np.random.default_rng(stable_seed(seed, "compound", compound))
    tw = config.compound_twist
    scale = np.exp(rng.normal(0.0, 0.6 * tw, len(AXES)))
    # Off-target effects: a few axes the MoA does not name.
    off = np.zeros(len(AXES))
    picks = rng.choice(len(AXES), size=3, replace=False)
    off[picks] = rng.normal(0.0, 0.5 * tw, 3)
    return config.phenotype_strength * (base * scale + off)


def hill(concentration: float, concentrations: np.ndarray, compound: str, seed: int,
         config: SynthConfig) -> float:
    """Fraction of the full effect at a concentration (Hill curve, slope 1.3).

    The EC50 lies 30% of the way up the compound's tested log range (a third of the
    only dose for single-dose compounds), jittered per compound.
    """
    conc = np.asarray(sorted(set(float(c) for c in concentrations if c > 0)))
    if concentration <= 0 or not len(conc):
        return 0.0
    rng = np.random.default_rng(stable_seed(seed, "ec50", compound))
    lo, hi = np.log10(conc[0]), np.log10(conc[-1])
    log_ec50 = (lo + 0.3 * (hi - lo) if hi > lo else lo - 0.5)
    log_ec50 += rng.normal(0.0, 0.15) + config.dose_shift
    x = (np.log10(concentration) - log_ec50) * 1.3
    return float(1.0 / (1.0 + 10.0 ** (-x)))


def treatment_vector(moa: str, compound: str, concentration: float,
                     concentrations: np.ndarray, seed: int, config: SynthConfig
                     ) -> tuple[np.ndarray, float]:
    """(full-strength phenotype, dose fraction) of one treatment."""
    vec = compound_vector(moa, compound, seed, config)
    if not vec.any():
        return vec, 0.0
    return vec, hill(concentration, concentrations, compound, seed, config)


def batch_nuisance(batch: str, seed: int, config: SynthConfig, channels: int = 3) -> dict:
    """Per-week (per-source) shifts: stain gains, background, focus, small biology drifts.

    ``channels`` stains get their own gain and background (3: BBBC021, 5: Cell Painting).
    """
    rng = np.random.default_rng(stable_seed(seed, "batch", batch))
    b = config.batch_strength
    d = b * config.drift
    out = {
        "gain": np.exp(rng.normal(0.0, config.stain_sd * b, channels)),
        "background": np.exp(rng.normal(0.0, config.background_sd * b, channels)),
        "blur": max(0.0, config.focus + rng.normal(0.0, config.focus_sd * b)),  # full-res px
        "cell_size": rng.normal(0.0, 0.1 * d),
        "nuc_size": rng.normal(0.0, 0.07 * d),
        "tub_fibre": rng.normal(0.0, 0.25 * d),
        "act_fibre": rng.normal(0.0, 0.3 * d),
        "density": rng.normal(0.0, 0.15 * d),
        "texture": np.exp(rng.normal(0.0, 0.2 * d)),
    }
    if config.exposure_sd > 0:  # v2: drawn apart, so v1's draws stay as they were
        more = np.random.default_rng(stable_seed(seed, "exposure", batch))
        out["exposure"] = float(np.exp(more.normal(0.0, config.exposure_sd * b)))
    if config.gamma_sd > 0:
        more = np.random.default_rng(stable_seed(seed, "gamma", batch))
        out["gamma"] = np.exp(more.normal(0.0, config.gamma_sd * b, channels))
    return out


def batch_response(vec: np.ndarray, batch: str, moa: str, seed: int, config: SynthConfig) -> np.ndarray:
    """A treatment's phenotype as this week's cells express it.

    Cells of one week (passage, confluence at treatment) answer drugs with a gain and
    a shift shared by all treatments of the week, plus a shift shared by the week's
    compounds of one MoA. DMSO never shows it, so whitening on DMSO cannot remove it:
    it is why same-week matches are easier (NSC) than cross-week ones (NSCB).
    """
    if not vec.any():
        return vec
    r = config.batch_strength * config.batch_response
    week = np.random.default_rng(stable_seed(seed, "response", batch))
    pair = np.random.default_rng(stable_seed(seed, "response", batch, moa))
    gain = np.exp(week.normal(0.0, 0.2 * r))
    shift = week.normal(0.0, 0.12 * r, len(AXES)) + pair.normal(0.0, 0.25 * r, len(AXES))
    # Cell state shifts sizes, shapes, intensities and fibres; it does not create
    # structures (aggresomes, asters, lobes) that the drug does not cause.
    return vec * gain + shift * _CONTINUOUS * np.abs(vec).max()


def plate_nuisance(plate: str, seed: int, config: SynthConfig, channels: int = 3) -> dict:
    """Per-plate illumination field parameters and a small gain jitter (per stain)."""
    rng = np.random.default_rng(stable_seed(seed, "plate", plate))
    s = config.illumination_strength
    return {
        "vignette": s * rng.uniform(0.25, 0.5, channels),    # relative fall-off at the corners
        "centre": rng.normal(0.0, 0.12, 2),                  # optical centre offset (fraction)
        "gradient": s * rng.normal(0.0, 0.15, (channels, 2)),  # linear slope per channel
        "gain": np.exp(rng.normal(0.0, 0.06 * config.batch_strength, channels)),
    }
