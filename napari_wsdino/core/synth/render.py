"""Render one field of view of MCF-7 cells as three 16-bit channels (DAPI, Tubulin, Actin),
or as the five Cell Painting stains (DNA, ER, RNA, AGP, Mito; :func:`render_cellpainting`).

Geometry is in *units* of the real BBBC021 camera (1024 x 1280 px per field); a
smaller image shows the same field at lower resolution, down to ``MIN_SCALE`` px per
unit, below which it shows a crop so that nuclei stay a few pixels wide.

Cells are drawn in three steps, all numpy: (1) territories: one small loop over cells
writes each cell's label where its shape score wins (touching cells, as in a confluent
well); (2) every foreground pixel gathers its cell's parameters by label and the
nucleus, microtubule network and actin are evaluated as closed-form fields; (3) spots
(micronuclei, asters, aggresomes, actin puncta) are splatted and blurred; then optics
and camera: per-plate illumination, per-week stain gain, background and focus, blur,
Poisson and read noise. Each step is a function of its own; both renderers share them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_wsdino.core.synth.phenotypes import _IX, V1_CONFIG, SynthConfig

FULL_SHAPE = (1024, 1280)
MIN_SCALE = 0.2
#: DMSO cells per full field (MCF-7 at the BBBC021 seeding density).
BASE_CELLS = 140
CELL_RADIUS = 44.0      # units
NUC_RADIUS = 17.0       # units
#: Peak counts of a DMSO nucleus / microtubule / actin signal, and background, in ADU.
AMPLITUDE = np.array([2600.0, 1400.0, 1100.0])
BACKGROUND = np.array([160.0, 220.0, 200.0])
CAMERA_OFFSET = 100.0
READ_NOISE = 8.0
PHOTONS_PER_ADU = 0.5


def pixel_scale(shape: tuple[int, int]) -> float:
    """Pixels per unit of the full-resolution camera for an image of ``shape``."""
    return max(min(shape[0] / FULL_SHAPE[0], shape[1] / FULL_SHAPE[1]), MIN_SCALE)


def _smooth_noise(rng, shape, sigma):
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def _splat(shape, ys, xs, amps, sigma):
    """Sum of Gaussian spots of equal width (peak ``amps``) via delta image + blur."""
    img = np.zeros(shape, np.float32)
    if len(ys):
        yi = np.clip(np.round(ys).astype(int), 0, shape[0] - 1)
        xi = np.clip(np.round(xs).astype(int), 0, shape[1] - 1)
        inside = (ys >= -0.5) & (ys < shape[0] - 0.5) & (xs >= -0.5) & (xs < shape[1] - 0.5)
        np.add.at(img, (yi[inside], xi[inside]), amps[inside])
        sigma = max(sigma, 0.5)
        img = ndi.gaussian_filter(img, sigma, mode="constant") * (2 * np.pi * sigma**2)
    return img


def cached_illumination(cache: dict | None, key: str, shape: tuple[int, int],
                        plate: dict) -> np.ndarray | None:
    """The :func:`illumination` of plate ``key`` from ``cache`` (filled on first use);
    ``None`` without a cache (the renderer then computes it)."""
    if cache is None:
        return None
    if key not in cache:
        cache[key] = illumination(shape, plate)
    return cache[key]


def illumination(shape: tuple[int, int], plate: dict) -> np.ndarray:
    """Per-plate illumination field ``(C, H, W)``: vignetting times a linear gradient."""
    h, w = shape
    yn = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xn = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    cy, cx = plate["centre"]
    r2 = ((xn - cx) ** 2 + (yn - cy) ** 2) / 2.0
    fields = []
    for c in range(len(plate["vignette"])):
        vig = 1.0 - plate["vignette"][c] * r2
        gy, gx = plate["gradient"][c]
        fields.append(np.clip(vig * (1.0 + gy * yn + gx * xn), 0.15, None))
    return np.stack(fields).astype(np.float32)


def _place_cells(rng, n, hu, wu, colony, radius):
    """Cell centres in units (over the field plus a margin), some in colonies."""
    margin = radius.mean()
    pos = np.column_stack([rng.uniform(-margin, hu + margin, n), rng.uniform(-margin, wu + margin, n)])
    in_col = rng.random(n) < colony
    if in_col.any():
        k = rng.integers(1, 4)
        centres = np.column_stack([rng.uniform(0.2 * hu, 0.8 * hu, k), rng.uniform(0.2 * wu, 0.8 * wu, k)])
        which = rng.integers(0, k, in_col.sum())
        spread = radius.mean() * np.sqrt(in_col.sum() / k) * 0.9
        pos[in_col] = centres[which] + rng.normal(0.0, spread, (in_col.sum(), 2))
    # A few rounds of pairwise repulsion so nuclei do not overlap.
    for _ in range(6):
        d = pos[:, None, :] - pos[None, :, :]
        dist = np.sqrt((d**2).sum(-1)) + np.eye(n) * 1e6
        need = 0.95 * (radius[:, None] + radius[None, :]) * 0.62
        push = np.clip(need - dist, 0, None) / dist
        pos += 0.5 * (d * push[..., None]).sum(1)
    return pos


def render_field(rng: np.random.Generator, shape: tuple[int, int], vec: np.ndarray, dose: float,
                 batch: dict, plate: dict, illum: np.ndarray | None = None,
                 config: SynthConfig = SynthConfig()) -> np.ndarray:
    """Render one field; returns ``(3, H, W)`` uint16 (DAPI, Tubulin, Actin).

    Parameters
    ----------
    rng
        The field's own generator (seeded from seed, plate, well, site).
    shape
        ``(H, W)`` in pixels.
    vec, dose
        Full-strength phenotype over :data:`AXES` and the dose fraction (0..1).
    batch, plate
        Nuisance from :func:`batch_nuisance` / :func:`plate_nuisance`.
    illum
        Precomputed :func:`illumination` field (computed when ``None``).
    """
    c, p = _cells_and_pixels(rng, shape, vec, dose, batch, config)
    dna = _dna(rng, c, p, batch)
    tub = _tubulin(rng, c, p, batch)
    actin = _actin(rng, c, p, batch)
    channels = np.stack([p.grid(dna), p.grid(tub), p.grid(actin)])
    _spots(rng, c, channels, dna=0, tub=1, actin=2)
    return _camera(rng, channels, batch, plate, illum, config, AMPLITUDE, BACKGROUND)


class _Cells(dict):
    """Per-cell parameters of a field (attribute access to a dict of arrays)."""

    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def cells(rng, shape, vec, dose, batch, config) -> _Cells:
    """How many cells, their states, sizes, positions and outlines (units -> pixels)."""
    h, w = shape
    s = pixel_scale(shape)
    hu, wu = h / s, w / s
    field = vec * dose
    area = hu * wu / float(np.prod(FULL_SHAPE))
    log_density = field[_IX["density"]] + batch["density"] + rng.normal(0.0, config.density_jitter)
    n = max(1, int(rng.poisson(BASE_CELLS * config.density * area * np.exp(log_density))))
    responder = rng.random(n) < config.responder_fraction * dose
    effect = np.where(responder, rng.uniform(0.7, 1.0, n), 0.2 * dose)
    E = effect[:, None] * vec[None, :]
    if config.natural_variation > 0:  # v2: cell-to-cell biology around the treatment's value
        E = E + rng.normal(0.0, config.natural_variation, E.shape)
    c = _Cells(n=n, s=s, shape=shape, col=lambda a: E[:, _IX[a]], E=E, area=area,
               responder=responder)
    col = c.col
    c.mitotic = rng.random(n) < np.clip(0.03 + col("mitotic"), 0, 0.97)
    c.rosette = c.mitotic & (rng.random(n) < np.clip(col("rosette"), 0, 1))
    c.lobed = ~c.mitotic & (rng.random(n) < np.clip(col("lobes"), 0, 1))
    c.binuc = ~c.mitotic & ~c.lobed & (rng.random(n) < np.clip(0.01 + col("binuc"), 0, 1))
    round_ = np.clip(col("round") - 0.5 * col("spread"), -1, 1)
    round_ = np.where(c.mitotic, 1.0, round_)
    radius = CELL_RADIUS * np.exp(col("cell_size") + batch["cell_size"] + rng.normal(0, 0.15, n))
    radius = np.where(c.mitotic, 0.62 * radius, radius)
    pos = _place_cells(rng, n, hu, wu, np.clip(0.35 + field[_IX["colony"]], 0, 0.95), radius)
    c.cy, c.cx = pos[:, 0] * s, pos[:, 1] * s
    c.rad = radius * s
    c.aspect = np.exp(np.clip(np.abs(rng.normal(0.0, 0.3, n)) * (1 - round_), 0, 1.2))
    c.theta = rng.uniform(0, np.pi, n)
    harm_amp = np.clip(0.07 * (1 - round_) + 0.03, 0.01, 0.25)[:, None] * rng.uniform(0.3, 1.0, (n, 4))
    harm_ph = rng.uniform(0, 2 * np.pi, (n, 4))
    c.harm_c = (harm_amp * np.exp(1j * harm_ph)).astype(np.complex64)
    return c


def _territories(c: _Cells) -> tuple[np.ndarray, np.ndarray]:
    """Label image (0 = background) and each pixel's shape score (the one loop over cells)."""
    h, w = c.shape
    label = np.zeros(c.shape, np.int32)
    best = np.zeros(c.shape, np.float32)
    major, minor = c.rad * np.sqrt(c.aspect), c.rad / np.sqrt(c.aspect)
    for i in range(c.n):
        ext = major[i] * 1.4 + 1
        y0, y1 = max(int(c.cy[i] - ext), 0), min(int(c.cy[i] + ext) + 2, h)
        x0, x1 = max(int(c.cx[i] - ext), 0), min(int(c.cx[i] + ext) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - c.cy[i]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - c.cx[i]
        ct, st = np.cos(c.theta[i]), np.sin(c.theta[i])
        u, v = xx * ct + yy * st, -xx * st + yy * ct
        # Outline harmonics cos(k*phi + p) = Re(c_k z^k) with z = e^{i phi}: no trig per pixel.
        z = (u + 1j * v) / (np.hypot(u, v) + 1e-6)
        z2 = z * z
        zk, wave = z2, np.zeros(u.shape, np.complex64)
        for k in range(4):
            wave += c.harm_c[i, k] * zk
            zk = zk * z
        edge = 1.0 + wave.real
        score = 1.0 - np.sqrt((u / major[i]) ** 2 + (v / minor[i]) ** 2) / edge
        sub_b, sub_l = best[y0:y1, x0:x1], label[y0:y1, x0:x1]
        win = score > sub_b
        sub_b[win] = score[win]
        sub_l[win] = i + 1
    return label, best


def _cells_and_pixels(rng, shape, vec, dose, batch, config) -> tuple[_Cells, _Cells]:
    """Cells, territories, and the foreground pixels with their cell and textures."""
    c = cells(rng, shape, vec, dose, batch, config)
    label, best = _territories(c)
    h, w = shape
    fg = np.flatnonzero(label)
    p = _Cells(label=label, fg=fg, idx=label.ravel()[fg] - 1, inner=best.ravel()[fg])
    p.py, p.px = (fg // w).astype(np.float32), (fg % w).astype(np.float32)
    p.tex = _smooth_noise(rng, shape, max(0.6, 3.0 * c.s)).ravel()[fg]
    p.tex2 = _smooth_noise(rng, shape, max(1.0, 8.0 * c.s)).ravel()[fg]

    def grid(values):
        """Put per-pixel values back on the image grid."""
        img = np.zeros(h * w, np.float32)
        img[fg] = values
        return img.reshape(shape)

    p.grid = grid
    return c, p


def _dna(rng, c: _Cells, p: _Cells, batch: dict) -> np.ndarray:
    """Nuclei: up to three elliptical lobes per cell (one normally; 2 binucleate; 3 lobed)."""
    n, s, col, idx, mitotic = c.n, c.s, c.col, p.idx, c.mitotic
    nuc_a = NUC_RADIUS * s * np.exp(col("nuc_size") + batch["nuc_size"] + rng.normal(0, 0.12, n))
    c.nuc_a = nuc_a = np.where(mitotic, 0.62 * nuc_a, nuc_a)
    nuc_b = nuc_a * np.where(mitotic, rng.uniform(0.75, 1.0, n), rng.uniform(0.7, 0.92, n))
    c.nuc_off = nuc_off = rng.normal(0, 0.12, (n, 2)) * c.rad[:, None] * (~mitotic)[:, None]
    lobe_dir = rng.uniform(0, 2 * np.pi, (n, 3))
    lobe_r, lobe_scale, lobe_on = np.zeros((n, 3)), np.ones((n, 3)), np.zeros((n, 3), bool)
    lobe_on[:, 0] = True
    lobed, binuc = c.lobed, c.binuc
    lobe_on[lobed] = True
    lobe_r[lobed] = 0.55 * nuc_a[lobed, None]
    lobe_scale[lobed] = rng.uniform(0.6, 0.8, (lobed.sum(), 3))
    lobe_on[binuc, 1] = True
    lobe_dir[binuc, 1] = lobe_dir[binuc, 0] + np.pi
    lobe_r[binuc, :2] = 0.85 * nuc_a[binuc, None]
    lobe_scale[binuc, :2] = 0.85
    ncy = c.cy[:, None] + nuc_off[:, :1] + lobe_r * np.sin(lobe_dir)
    ncx = c.cx[:, None] + nuc_off[:, 1:] + lobe_r * np.cos(lobe_dir)
    rn = np.full(len(p.fg), np.inf, np.float32)
    ct, st = np.cos(c.theta)[idx], np.sin(c.theta)[idx]
    for k in range(3):
        on = lobe_on[idx, k]
        dy, dx = p.py - ncy[idx, k], p.px - ncx[idx, k]
        u, v = dx * ct + dy * st, -dx * st + dy * ct
        a, b = nuc_a[idx] * lobe_scale[idx, k], nuc_b[idx] * lobe_scale[idx, k]
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2) * (1 + 0.06 * p.tex2)
        rn = np.where(on, np.minimum(rn, r), rn)
    p.rn = rn
    p.nuc = nuc = 1.0 / (1.0 + np.exp(np.clip((rn - 1.0) / 0.07, -50, 50)))
    dna_int = np.exp(col("nuc_bright"))[idx] * np.where(mitotic, 1.9, 1.0)[idx]
    chrom = np.exp(0.22 * batch["texture"] * p.tex * np.where(mitotic, 1.8, 1.0)[idx])
    ros = c.rosette[idx]
    ring = np.exp(-(((rn - 0.75) / 0.22) ** 2)) * (
        1 + 0.5 * np.cos(9 * np.arctan2(p.py - c.cy[idx], p.px - c.cx[idx])))
    return dna_int * chrom * np.where(ros, ring * 1.2, nuc * (0.75 + 0.25 * np.clip(1 - rn**2, 0, 1)))


def _tubulin(rng, c: _Cells, p: _Cells, batch: dict) -> np.ndarray:
    """Microtubules: radial, slightly curved filaments from the centrosome."""
    n, col, idx, mitotic, rosette, rad = c.n, c.col, p.idx, c.mitotic, c.rosette, c.rad
    _golgi_side(rng, c)
    dy, dx = p.py - c.ccy[idx], p.px - c.ccx[idx]
    rc = np.sqrt(dx**2 + dy**2)
    phic = np.arctan2(dy, dx)
    bundle = np.clip(col("tub_bundle"), 0, 1.5)
    freq = rng.integers(16, 30, (n, 3)) - np.round(11 * np.clip(bundle, 0, 1))[:, None].astype(int)
    fph = rng.uniform(0, 2 * np.pi, (n, 3))
    curl = rng.normal(0, 0.25, n)
    warp = phic + curl[idx] * rc / (rad[idx] + 1e-3) + 0.08 * p.tex2
    g = sum(np.cos(freq[idx, k] * warp + fph[idx, k]) for k in range(3)) / 3.0
    # Sharper with distance so filaments keep their width away from the centrosome.
    sharp = (1.5 + 3.5 * rc / (rad[idx] + 1e-3)) * (1.0 - 0.5 * np.clip(bundle, 0, 1)[idx])
    fib = np.clip(g + 0.15, 0, None) ** sharp
    fib = np.minimum(fib / (fib.mean() + 1e-6), 4.0) if len(fib) else fib
    c_fib = np.clip(0.5 * np.exp(batch["tub_fibre"]) * (1 - np.clip(col("tub_diffuse"), 0, 1))
                    * (1 + 0.8 * bundle), 0, 0.95)
    c_fib = np.where(mitotic & ~rosette, 0.15 * c_fib, c_fib)[idx]
    cyto = np.clip(p.inner * 4.0, 0, 1)
    peri = 0.55 + 0.45 * np.exp(-rc / (0.6 * rad[idx] + 1e-3))
    tub_int = np.exp(col("tub_int"))[idx] * np.where(mitotic, 1.4, 1.0)[idx]
    circ = bundle[idx] * np.exp(-(((p.inner - 0.15) / 0.08) ** 2))
    # Tubulin is excluded from the interphase nucleus; in mitosis the envelope is gone.
    tub = tub_int * cyto * peri * ((1 - c_fib) + c_fib * fib + 1.5 * circ) * (1 - 0.45 * p.nuc * ~mitotic[idx])
    monoaster = rosette[idx] * np.exp(-((rc / (0.3 * rad[idx] + 1e-3)) ** 2)) * (1 + fib)
    return tub + 1.2 * monoaster


def _actin(rng, c: _Cells, p: _Cells, batch: dict) -> np.ndarray:
    """Actin: cortical ring, stress fibres across the cell, diffuse cytoplasm."""
    n, s, col, idx, mitotic, label = c.n, c.s, c.col, p.idx, c.mitotic, p.label
    psi = c.theta + rng.normal(0, 0.25, n)
    period = max(2.6, 9.0 * s)
    wcoord = -(p.px - c.cx[idx]) * np.sin(psi)[idx] + (p.py - c.cy[idx]) * np.cos(psi)[idx]
    stripes = np.clip(np.cos(2 * np.pi * wcoord / period + rng.uniform(0, 6.3, n)[idx]), 0, None) ** 8
    stripes = stripes * np.clip(p.tex2 + 0.3, 0, None) * np.clip(p.inner * 3 - 0.2, 0, 1)
    fib_w = np.clip(0.35 * np.exp(col("act_fibres") + batch["act_fibre"]), 0, 1.5)
    fib_w = np.where(mitotic, 0.0, fib_w)[idx]
    cortex_w = np.clip(0.45 * np.exp(col("act_cortex")), 0.05, 3)
    cortex_w = np.where(mitotic, 1.6 * cortex_w, cortex_w)[idx]
    act_int = np.exp(col("act_int"))[idx]
    edges = np.zeros(c.shape, np.float32)
    edges[:-1] += label[:-1] != label[1:]
    edges[1:] += label[1:] != label[:-1]
    edges[:, :-1] += label[:, :-1] != label[:, 1:]
    edges[:, 1:] += label[:, 1:] != label[:, :-1]
    edges = ndi.gaussian_filter(np.clip(edges, 0, 1), max(0.5, 2.5 * s)) * 2.5
    cortex = np.maximum(edges.ravel()[p.fg], np.exp(-((p.inner / 0.07) ** 2)))
    return act_int * (0.25 * np.clip(p.inner * 8, 0, 1) + cortex_w * cortex * (label.ravel()[p.fg] > 0)
                      + fib_w * stripes) * (1 - 0.3 * p.nuc)


def _spot_positions(rng, c: _Cells, counts, dist_lo, dist_hi, centre=None):
    cell = np.repeat(np.arange(c.n), counts)
    ang = rng.uniform(0, 2 * np.pi, len(cell))
    dist = rng.uniform(dist_lo, dist_hi, len(cell)) * c.rad[cell]
    oy = (c.cy if centre is None else centre[0])[cell]
    ox = (c.cx if centre is None else centre[1])[cell]
    return oy + dist * np.sin(ang), ox + dist * np.cos(ang), cell


def _spots(rng, c: _Cells, channels: np.ndarray, dna: int, tub: int, actin: int,
           aggresome: int | None = None) -> None:
    """Micronuclei, extra asters, aggresomes and actin puncta, added to ``channels``
    (``aggresome``: the channel of the aggresome, default ``tub``)."""
    s, col, shape, n = c.s, c.col, c.shape, c.n
    mn = rng.poisson(np.clip(1.6 * col("micronuclei"), 0, 5))
    y, x, k = _spot_positions(rng, c, mn, 0.45, 0.8)
    channels[dna] += _splat(shape, y, x, 0.9 * rng.uniform(0.6, 1.0, len(k)), 2.5 * s)
    na = rng.poisson(np.clip(2.5 * col("asters"), 0, 6))
    y, x, k = _spot_positions(rng, c, na, 0.2, 0.7)
    channels[tub] += _splat(shape, y, x, 1.6 * rng.uniform(0.6, 1.0, len(k)), 3.5 * s)
    ag = (rng.random(n) < np.clip(col("tub_aggr"), 0, 1)).astype(int)
    y, x, k = _spot_positions(rng, c, ag, 0.0, 0.1, centre=(c.ccy, c.ccx))
    channels[tub if aggresome is None else aggresome] += _splat(
        shape, y, x, 3.0 * rng.uniform(0.7, 1.0, len(k)), 0.4 * NUC_RADIUS * s)
    pc = rng.poisson(np.clip(10 * col("act_puncta"), 0, 25))
    y, x, k = _spot_positions(rng, c, pc, 0.1, 0.9)
    channels[actin] += _splat(shape, y, x, 2.2 * rng.uniform(0.4, 1.0, len(k)), 2.0 * s)
    big = rng.poisson(np.clip(1.2 * col("act_puncta"), 0, 4))
    y, x, k = _spot_positions(rng, c, big, 0.2, 0.7)
    channels[actin] += _splat(shape, y, x, 2.5 * rng.uniform(0.6, 1.0, len(k)), 5.0 * s)


def _camera(rng, channels: np.ndarray, batch: dict, plate: dict, illum, config: SynthConfig,
            amplitude: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Optics and camera: blur, illumination, stain gain and background, shot and read noise."""
    shape = channels.shape[1:]
    s = pixel_scale(shape)
    if "gamma" in batch:  # v2: the week's stain response curve (signal of a DMSO nucleus ~1)
        for c in range(len(channels)):
            channels[c] = np.clip(channels[c], 0, None) ** batch["gamma"][c]
    blur = np.sqrt((1.0 * s) ** 2 + (batch["blur"] * s) ** 2 + 0.25)
    for c in range(len(channels)):
        channels[c] = ndi.gaussian_filter(channels[c], blur, mode="nearest")
    if illum is None:
        illum = illumination(shape, plate)
    gain = (batch["gain"] * plate["gain"])[:, None, None]
    expected = gain * illum * (amplitude[:, None, None] * channels
                               + (background * batch["background"])[:, None, None])
    k = PHOTONS_PER_ADU * batch.get("exposure", 1.0) / max(config.noise, 1e-3)
    counts = rng.poisson(np.clip(expected, 0, None) * k) / k
    counts += CAMERA_OFFSET + rng.normal(0.0, READ_NOISE * config.noise, counts.shape)
    return np.clip(np.round(counts), 0, 65535).astype(np.uint16)


#: Cell Painting stains (DNA, ER, RNA, AGP, Mito): peak counts and background, in ADU.
CP_AMPLITUDE = np.array([2600.0, 1300.0, 1000.0, 1100.0, 1200.0])
CP_BACKGROUND = np.array([160.0, 210.0, 230.0, 200.0, 190.0])


def render_cellpainting(rng: np.random.Generator, shape: tuple[int, int], vec: np.ndarray,
                        dose: float, batch: dict, plate: dict, illum: np.ndarray | None = None,
                        config: SynthConfig = V1_CONFIG) -> np.ndarray:
    """Render one Cell Painting field; ``(5, H, W)`` uint16 (DNA, ER, RNA, AGP, Mito).

    The same cells, nuclei and MoA phenotypes as :func:`render_field`: DNA is the
    DAPI model, AGP the actin model plus a perinuclear Golgi; ER is a reticular
    network densest at the nuclear envelope, RNA nucleoli plus dim cytoplasm, Mito a
    perinuclear-enriched tubular texture. Asters and aggresomes show in ER.
    ``batch`` and ``plate`` hold five stains (``channels=5`` nuisance).
    """
    c, p = _cells_and_pixels(rng, shape, vec, dose, batch, config)
    dna = _dna(rng, c, p, batch)
    _golgi_side(rng, c)
    agp = _actin(rng, c, p, batch)
    channels = np.stack([p.grid(dna), p.grid(_er(c, p)), p.grid(_rna_cytoplasm(c, p)),
                         p.grid(agp), p.grid(_mito(c, p))])
    _spots(rng, c, channels, dna=0, tub=1, actin=3, aggresome=1)
    _nucleoli_and_golgi(rng, c, channels, rna=2, agp=3)
    return _camera(rng, channels, batch, plate, illum, config, CP_AMPLITUDE, CP_BACKGROUND)


def _golgi_side(rng, c: _Cells) -> None:
    """The centrosome / Golgi beside the nucleus (what the tubulin model's centre is)."""
    cen_dir = rng.uniform(0, 2 * np.pi, c.n)
    cen_r = np.where(c.mitotic | c.rosette, 0.0, 1.05 * c.nuc_a)
    c.ccy = c.cy + c.nuc_off[:, 0] + cen_r * np.sin(cen_dir)
    c.ccx = c.cx + c.nuc_off[:, 1] + cen_r * np.cos(cen_dir)


def _cytoplasm(c: _Cells, p: _Cells) -> np.ndarray:
    """1 in the interphase cytoplasm, fading at the border; lower over the nucleus."""
    return np.clip(p.inner * 4.0, 0, 1) * (1 - 0.7 * p.nuc * ~c.mitotic[p.idx])


def _er(c: _Cells, p: _Cells) -> np.ndarray:
    """ER: a reticular network, densest around the nucleus, with the nuclear envelope rim."""
    col, idx = c.col, p.idx
    net = np.clip(1.0 - np.abs(p.tex), 0, 1) ** 2
    peri = 0.35 + 0.65 * np.exp(-np.clip(p.rn - 1.0, 0, None) / 1.2)
    rim = np.exp(-(((p.rn - 1.0) / 0.12) ** 2)) * ~c.mitotic[idx]
    er_int = np.exp(0.5 * col("tub_int") + 0.3 * col("cell_size") - 0.4 * col("tub_diffuse"))[idx]
    return er_int * (_cytoplasm(c, p) * peri * (0.5 + 0.8 * net) + 0.6 * rim)


def _rna_level(c: _Cells) -> np.ndarray:
    """Per-cell RNA stain level: follows DNA brightness and overall protein content."""
    return np.exp(c.col("nuc_bright") + c.col("act_int") + 0.5 * c.col("tub_int"))


def _rna_cytoplasm(c: _Cells, p: _Cells) -> np.ndarray:
    """RNA outside the nucleoli: dim cytoplasm and nucleoplasm (ribosomes, mRNA)."""
    return _rna_level(c)[p.idx] * (0.35 * _cytoplasm(c, p) + 0.2 * p.nuc)


def _mito(c: _Cells, p: _Cells) -> np.ndarray:
    """Mitochondria: a tubular texture, enriched around the nucleus (more when rounded)."""
    col, idx = c.col, p.idx
    tubes = np.clip(p.tex2 + 0.4 * p.tex + 0.3, 0, None) ** 2
    reach = np.where(c.mitotic, 0.3, 0.7 - 0.3 * np.clip(col("round"), 0, 1))[idx]
    dist = np.hypot(p.py - c.cy[idx], p.px - c.cx[idx]) / (c.rad[idx] + 1e-3)
    peri = np.exp(-dist / reach)
    mito_int = np.exp(0.4 * col("tub_int") + 0.4 * col("act_int") + 0.3 * col("cell_size"))[idx]
    return mito_int * _cytoplasm(c, p) * (0.3 + peri) * tubes


def _nucleoli_and_golgi(rng, c: _Cells, channels: np.ndarray, rna: int, agp: int) -> None:
    """RNA nucleoli (gone in mitosis; more in big nuclei) and a compact Golgi in AGP."""
    s, shape = c.s, c.shape
    count = np.where(c.mitotic, 0, rng.integers(1, 4, c.n) + (c.col("nuc_size") > 0.3))
    cell = np.repeat(np.arange(c.n), count)
    ang = rng.uniform(0, 2 * np.pi, len(cell))
    dist = rng.uniform(0.0, 0.5, len(cell)) * c.nuc_a[cell]
    y = c.cy[cell] + c.nuc_off[cell, 0] + dist * np.sin(ang)
    x = c.cx[cell] + c.nuc_off[cell, 1] + dist * np.cos(ang)
    bright = _rna_level(c)[cell]
    channels[rna] += _splat(shape, y, x, 1.6 * bright * rng.uniform(0.6, 1.0, len(cell)),
                            0.18 * NUC_RADIUS * s)
    golgi = ~c.mitotic
    channels[agp] += _splat(shape, c.ccy[golgi], c.ccx[golgi],
                            0.9 * rng.uniform(0.6, 1.0, int(golgi.sum())), 0.25 * NUC_RADIUS * s)
