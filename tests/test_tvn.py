"""Typical variation normalisation: identity DMSO covariance, variants, regularisation, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core.aggregate import aggregate_treatments
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.tvn import TypicalVariationNormalizer, apply_tvn


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    """Gaussian rows with a random, strongly non-identity covariance and mean."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(0.1, 5.0, d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 10


def screen(n_plates=4, dmso_per_plate=60, treated_per_plate=40, d=12, seed=0) -> ProfileTable:
    """Field profiles on several plates with plate offsets, DMSO and two compounds."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    x = correlated(n_plates * (dmso_per_plate + treated_per_plate), d, seed)
    offsets = rng.normal(size=(n_plates, d)) * 3
    i = 0
    for p in range(n_plates):
        for j in range(dmso_per_plate + treated_per_plate):
            dmso = j < dmso_per_plate
            comp = "DMSO" if dmso else ("c1" if j % 2 else "c2")
            rows.append({"Metadata_Plate": f"P{p}", "Metadata_Batch": f"B{p % 2}",
                         "Metadata_Well": f"W{j:03d}", "Metadata_Site": 1,
                         "Metadata_Compound": comp, "Metadata_Concentration": 0.0 if dmso else 1.0,
                         "Metadata_Treatment": f"{comp}@{0 if dmso else 1}",
                         "Metadata_MoA": "DMSO" if dmso else f"M{comp}"})
            feats.append(x[i] + offsets[p])
            i += 1
    return ProfileTable(pd.DataFrame(rows), np.array(feats), [f"f{k}" for k in range(d)])


def test_paper_tvn_gives_dmso_identity_covariance():
    x = correlated(500, 10, 1)
    ctl = np.zeros(500, dtype=bool)
    ctl[:300] = True
    tvn = TypicalVariationNormalizer("paper").fit(x, ctl)
    z = tvn.transform(x)
    assert tvn.shrinkage_ == 0.0
    assert np.allclose(z[ctl].mean(axis=0), 0, atol=1e-9)
    assert np.allclose(np.cov(z[ctl].T), np.eye(10), atol=1e-8)
    assert np.all(np.diff(tvn.explained_variance_) <= 0)  # PCA order


def test_paper_tvn_matches_sklearn_pca_whitening():
    from sklearn.decomposition import PCA

    x = correlated(400, 8, 2)
    ctl = np.arange(400) < 250
    ours = TypicalVariationNormalizer("paper").fit_transform(x, ctl)
    ref = PCA(whiten=True).fit(x[ctl]).transform(x)
    # Principal axes are defined up to sign.
    signs = np.sign((ours * ref).sum(axis=0))
    assert np.allclose(ours * signs, ref, atol=1e-8)


def test_per_plate_removes_plate_offsets_and_whitens_dmso():
    p = screen()
    z, tvn = apply_tvn(p, "per-plate")
    ctl = p.is_control()
    assert np.allclose(np.cov(z.features[ctl].T), np.eye(p.n_features), atol=1e-8)
    plates = p.meta.Metadata_Plate.to_numpy()
    for plate in np.unique(plates):
        assert np.allclose(z.features[ctl & (plates == plate)].mean(axis=0), 0, atol=1e-9)
    # Shifting a whole plate changes nothing after per-plate TVN, but does after 'paper'.
    shifted = p.features.copy()
    shifted[plates == "P0"] += 50.0
    moved = p.with_features(shifted)
    assert np.allclose(apply_tvn(moved, "per-plate")[0].features, z.features, atol=1e-8)
    assert not np.allclose(apply_tvn(moved, "paper")[0].features, apply_tvn(p, "paper")[0].features)


def test_none_leaves_features_unchanged():
    p = screen()
    z, _ = apply_tvn(p, "none")
    assert np.array_equal(z.features, p.features) and z.feature_names == p.feature_names


def test_more_features_than_dmso_fields_is_shrunk():
    x = correlated(200, 60, 3)
    ctl = np.arange(200) < 40  # 40 DMSO fields, 60 features: singular covariance
    tvn = TypicalVariationNormalizer("paper").fit(x, ctl)
    z = tvn.transform(x)
    assert 0 < tvn.shrinkage_ <= 1 and np.isfinite(z).all()
    # DMSO covariance after TVN: eigenvalues s / ((1 - a) s + a mean(s)), as documented.
    s, a = tvn.explained_variance_, tvn.shrinkage_
    expected = np.sort(s / ((1 - a) * s + a * s.mean()))
    assert np.allclose(np.linalg.eigvalsh(np.cov(z[ctl].T)), expected, atol=1e-8)
    assert expected[:20].max() < 1e-6  # the 21 directions DMSO never varies in stay ~0
    with pytest.raises(DataError, match="singular"):
        TypicalVariationNormalizer("paper", shrinkage=0.0).fit(x, ctl)
    fixed = TypicalVariationNormalizer("paper", shrinkage=0.5).fit(x, ctl)
    assert fixed.shrinkage_ == 0.5


def test_evaluation_tvn_on_plate_means_equals_tvn_on_fields():
    p = screen()
    for method in ("paper", "per-plate"):
        result = evaluate_profiles(p, method, nscb=False)
        ref = aggregate_treatments(apply_tvn(p, method)[0])
        assert np.allclose(result.treatments.features, ref.features, atol=1e-9)
        assert result.treatments.meta.equals(ref.meta)


def test_bad_inputs_give_clear_errors():
    p = screen()
    x = p.features.copy()
    ctl = p.is_control()
    nan = x.copy()
    nan[5, 3] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        TypicalVariationNormalizer("paper").fit(nan, ctl)
    const = x.copy()
    const[ctl, 2] = 1.5
    with pytest.raises(DataError, match="constant over the 240 DMSO fields.*columns \\[2\\]"):
        TypicalVariationNormalizer("paper").fit(const, ctl)
    with pytest.raises(DataError, match="at least two DMSO"):
        TypicalVariationNormalizer("paper").fit(x, np.zeros(len(x), dtype=bool))
    with pytest.raises(DataError, match="Unknown TVN method"):
        TypicalVariationNormalizer("zca")
    no_dmso = p.subset(~((p.meta.Metadata_Plate == "P1") & ctl).to_numpy())
    with pytest.raises(DataError, match="Plate 'P1' has no DMSO fields"):
        apply_tvn(no_dmso, "per-plate")
    assert np.isfinite(apply_tvn(no_dmso, "paper")[0].features).all()


def test_per_channel_tvn_is_the_official_per_channel_pca_whitening():
    """Issue 14: the published evaluation whitens each channel's raw CLS features with
    ``PCA(n_components=dim, whiten=True)`` fitted on the DMSO fields, then the channels
    are concatenated. Ours, from the feature names, equals that (up to axis signs)."""
    from sklearn.decomposition import PCA

    from napari_wsdino.core.tvn import channel_groups, output_names

    a, b = correlated(400, 6, 3), correlated(400, 5, 4) * 0.01
    x = np.concatenate([a, b], axis=1)
    names = [f"DAPI_{i:03d}" for i in range(6)] + [f"Actin_{i:03d}" for i in range(5)]
    ctl = np.arange(400) < 260
    tvn = TypicalVariationNormalizer("per-channel", groups=channel_groups(names)).fit(x, ctl)
    ours = tvn.transform(x)
    ref = np.concatenate([PCA(n_components=6, whiten=True).fit(a[ctl]).transform(a),
                          PCA(n_components=5, whiten=True).fit(b[ctl]).transform(b)], axis=1)
    signs = np.sign((ours * ref).sum(axis=0))
    assert np.allclose(ours * signs, ref, atol=1e-8)
    # Not the joint whitening: cross-channel DMSO covariance is left in.
    joint = TypicalVariationNormalizer("paper").fit_transform(x, ctl)
    assert not np.allclose(np.abs(ours), np.abs(joint), atol=1e-3)
    assert output_names("per-channel", names)[:2] == ["DAPI_pc0000", "DAPI_pc0001"]
    assert output_names("per-channel", names)[6] == "Actin_pc0000"
    with pytest.raises(DataError, match="groups"):
        TypicalVariationNormalizer("per-channel")


def test_registry_lists_every_method_once_with_its_default():
    import inspect

    from napari_wsdino.cli.evaluate import add_parser  # noqa: F401  (choices come from METHODS)
    from napari_wsdino.core import evaluation, tvn

    assert tvn.METHODS == tuple(tvn.TVN_METHODS) == ("paper", "per-plate", "per-channel", "none")
    assert tvn.DEFAULT_TVN in tvn.TVN_METHODS
    assert all(m.display and m.help for m in tvn.TVN_METHODS.values())
    for fn in (evaluation.iter_evaluate, evaluation.evaluate_profiles, tvn.apply_tvn):
        first = list(inspect.signature(fn).parameters.values())[1]
        assert first.default == tvn.DEFAULT_TVN, fn.__name__
    assert TypicalVariationNormalizer().method == tvn.DEFAULT_TVN
    with pytest.raises(DataError, match="Unknown TVN method 'pca'.*paper, per-plate"):
        tvn.get_tvn("pca")


@pytest.mark.parametrize("method", ["paper", "per-plate", "per-channel", "none"])
def test_every_registered_method_runs_through_apply_tvn(method):
    profiles = screen(d=8)
    profiles = profiles.with_features(profiles.features, [f"{c}_{k}" for c in ("A", "B")
                                                          for k in range(4)])
    out, fitted = apply_tvn(profiles, method)
    assert out.features.shape == profiles.features.shape and np.isfinite(out.features).all()
    ctl = out.features[profiles.is_control()]
    if fitted.spec.whiten and not fitted.spec.plate_scaling:  # DMSO whitened to identity
        blocks = [slice(0, 4), slice(4, 8)] if fitted.spec.per_channel else [slice(0, 8)]
        for b in blocks:  # per channel: within each channel
            np.testing.assert_allclose(np.cov(ctl[:, b].T), np.eye(b.stop - b.start), atol=1e-8)
    if not fitted.spec.whiten:
        np.testing.assert_array_equal(out.features, profiles.features)
        assert out.feature_names == profiles.feature_names


def test_transform_in_row_chunks_equals_one_product(monkeypatch):
    from napari_wsdino.core import tvn

    profiles = screen()
    fitted = TypicalVariationNormalizer().fit(profiles.features, profiles.is_control())
    whole = fitted.transform(profiles.features)
    monkeypatch.setattr(tvn, "_ROWS", 7)  # 400 rows in 58 chunks
    np.testing.assert_allclose(fitted.transform(profiles.features), whole, rtol=0, atol=1e-12)
