"""NSC / NSCB / k-NN / mAP: hand-worked cases, BBBC021 counts, and a slow reference."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core import metrics
from napari_wsdino.core.evaluation import evaluate_profiles, evaluate_treatments
from napari_wsdino.core.metadata import DataError, load_metadata, nscb_treatments
from napari_wsdino.core.profiles import ProfileTable, simulate_profiles


def unit(deg: float) -> list[float]:
    """2-D unit vector at an angle; cosine similarity of two is cos(angle difference)."""
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def treatment_table(rows) -> ProfileTable:
    """Treatment-level profiles from (treatment, compound, moa, batches, angle) rows."""
    meta = pd.DataFrame(
        {
            "Metadata_Treatment": [r[0] for r in rows],
            "Metadata_Compound": [r[1] for r in rows],
            "Metadata_MoA": [r[2] for r in rows],
            "Metadata_Batch": [r[3] for r in rows],
        }
    )
    return ProfileTable(meta, np.array([unit(r[4]) for r in rows]), ["x", "y"])


# Hand-worked set. Angles in degrees; M1 is in batches W1 and W2, M2 only in W2.
HAND = [
    ("A@1", "A", "M1", "W1", 0),
    ("A@3", "A", "M1", "W1", 5),  # nearest to A@1 overall, but the same compound
    ("B@1", "B", "M1", "W1", 20),  # NSC neighbour of A@1, but the same batch
    ("C@1", "C", "M2", "W2", 30),
    ("D@1", "D", "M2", "W2", 100),
    ("E@1", "E", "M1", "W2", 60),
]


def test_nsc_skips_the_same_compound():
    out = evaluate_treatments(treatment_table(HAND), ks=(1, 2, 3))
    nb = out["neighbours"].set_index("treatment")
    # A@1 (0): A@3 is same compound; B@1 (20) beats C@1 (30), E@1 (60), D@1 (100).
    assert nb.loc["A@1", "nsc_neighbour"] == "B@1"
    assert nb.loc["A@3", "nsc_neighbour"] == "B@1"
    # B@1 (20): C@1 is 10 deg away, A@3 15, A@1 20 -> C@1, wrong MoA.
    assert nb.loc["B@1", "nsc_neighbour"] == "C@1"
    assert nb.loc["C@1", "nsc_neighbour"] == "B@1"  # 10 deg
    assert nb.loc["D@1", "nsc_neighbour"] == "E@1"  # 40 deg vs C@1 70
    assert nb.loc["E@1", "nsc_neighbour"] == "C@1"  # 30 deg vs B@1 / D@1 40
    m = out["nsc_match"]
    assert m.n == 6 and m.accuracy == pytest.approx(2 / 6)
    assert nb.loc["A@1", "nsc_similarity"] == pytest.approx(math.cos(math.radians(20)))
    # AP of A@1: ranking B@1 (M1 +), C@1 (M2), E@1 (M1 +), D@1 -> (1/1 + 2/3) / 2.
    assert nb.loc["A@1", "nsc_ap"] == pytest.approx(5 / 6)
    assert out["confusion_nsc"].loc["M1", "M2"] == 2  # B@1 and E@1


def test_nscb_skips_the_same_batch_and_single_batch_moas():
    out = evaluate_treatments(treatment_table(HAND))
    nb = out["neighbours"].set_index("treatment")
    # M2 is only in W2: C@1 and D@1 are neither queries nor candidates.
    assert nb["nscb_eligible"].tolist() == [True, True, True, False, False, True]
    # A@1's NSC neighbour B@1 is in W1 like A@1; the only NSCB candidate is E@1 (W2).
    assert nb.loc["A@1", "nscb_neighbour"] == "E@1"
    assert nb.loc["A@1", "nscb_similarity"] == pytest.approx(0.5)
    assert nb.loc["B@1", "nscb_neighbour"] == "E@1"
    # E@1 (W2) may match A@1, A@3, B@1 (W1): B@1 is nearest (40 deg).
    assert nb.loc["E@1", "nscb_neighbour"] == "B@1"
    m = out["nscb_match"]
    assert m.n == 4 and m.accuracy == 1.0
    assert list(out["confusion_nscb"].index) == ["M1"]


def test_multi_batch_treatment_is_not_subject_to_the_batch_rule():
    rows = [
        ("taxol@0.3", "taxol", "MS", "W1,W2", 0),  # on every plate, like BBBC021's taxol
        ("X@1", "X", "MS", "W1", 10),
        ("Z@1", "Z", "MD", "W1", 25),
        ("Y@1", "Y", "MD", "W2", 80),
    ]
    nb = evaluate_treatments(treatment_table(rows))["neighbours"].set_index("treatment")
    # As a query, taxol keeps X@1 (10 deg) although both were seen in W1.
    assert nb.loc["taxol@0.3", "nscb_neighbour"] == "X@1"
    # As a candidate, taxol is open to X@1 (W1); Z@1 (W1, 15 deg) is not.
    assert nb.loc["X@1", "nscb_neighbour"] == "taxol@0.3"
    # Single-batch pairs obey the rule: Z@1 (W1) cannot take X@1 (W1, 15 deg) and takes
    # taxol (25 deg) over Y@1 (55 deg).
    assert nb.loc["Z@1", "nsc_neighbour"] == "X@1"
    assert nb.loc["Z@1", "nscb_neighbour"] == "taxol@0.3"
    # Y@1 (W2) may take Z@1 (W1, 55 deg), nearer than X@1 (70) and taxol (80).
    assert nb.loc["Y@1", "nscb_neighbour"] == "Z@1"


def test_ties_go_to_the_first_treatment_in_order():
    # Q is at 0 deg; two candidates at exactly +-30 deg tie (cos 30 for both).
    rows = [
        ("P@1", "P", "M1", "W1", 30),
        ("Q@1", "Q", "M1", "W2", 0),
        ("R@1", "R", "M2", "W3", -30),
    ]
    nb = evaluate_treatments(treatment_table(rows))["neighbours"].set_index("treatment")
    assert nb.loc["Q@1", "nsc_neighbour"] == "P@1"
    # Same geometry, the MoAs swapped: still the first in order wins.
    swapped = [(t, c, {"M1": "M2", "M2": "M1"}[m] if t != "Q@1" else m, b, a)
               for t, c, m, b, a in rows]
    nb = evaluate_treatments(treatment_table(swapped))["neighbours"].set_index("treatment")
    assert nb.loc["Q@1", "nsc_neighbour"] == "P@1"
    assert not nb.loc["Q@1", "nsc_correct"]


def test_identical_profiles_tie_exactly():
    rng = np.random.default_rng(3)
    q = rng.normal(size=50)
    c = rng.normal(size=50)
    x = np.stack([c, q, c * 3.0])  # rows 0 and 2 have the same direction
    sim = metrics.cosine_similarity(x)
    assert sim[1, 0] == sim[1, 2]
    cand = np.ones((3, 3), dtype=bool)
    m = metrics.match(sim, cand, ["a", "b", "c"])
    assert m.neighbour[1] == 0


def test_knn_vote_and_tie_break():
    out = evaluate_treatments(treatment_table(HAND), ks=(2, 3))
    knn = out["nsc_match"].knn
    # Candidates by angle from each query (same compound left out; ties by row order):
    #   A@1: B 20, C 30, E 60, D 100        A@3: B 15, C 25, E 55, D 95
    #   B@1: C 10, A@3 15, A@1 20, E 40     C@1: B 10, A@3 25, A@1 30, E 30
    #   D@1: E 40, C 70, B 80               E@1: C 30, B 40, D 40, A@3 55
    # k=2 (a 1-1 vote goes to the nearer): A@1 M1 ok, A@3 M1 ok, B@1 M2 x, C@1 M1 x,
    #   D@1 M1 x, E@1 M2 x.
    assert knn[2] == pytest.approx(2 / 6)
    # k=3: A@1 M1 ok, A@3 M1 ok, B@1 (M2 M1 M1) M1 ok, C@1 M1 x, D@1 (M1 M2 M1) M1 x,
    #   E@1 (M2 M1 M2) M2 x.
    assert knn[3] == pytest.approx(3 / 6)


def test_map_skips_queries_without_positives():
    rows = [("A@1", "A", "M1", "W1", 0), ("B@1", "B", "M2", "W2", 10), ("C@1", "C", "M2", "W1", 15)]
    m = evaluate_treatments(treatment_table(rows), nscb=False)["nsc_match"]
    assert np.isnan(m.average_precision[0])  # no other M1 treatment
    assert m.n_map == 2 and m.map == 1.0


def test_bbbc021_counts(bundled_dir):
    table = load_metadata(bundled_dir, check_files=False).table
    result = evaluate_profiles(simulate_profiles(table, 8), tvn="none")
    assert result.n_treatments == 103 and result.n_nsc == 103 and result.n_nscb == 92
    nb = result.neighbours.set_index("treatment")
    assert sorted(nb.index[nb.nscb_eligible]) == nscb_treatments(table)
    assert set(nb.moa[~nb.nscb_eligible]) == {"Cholesterol-lowering", "Kinase inhibitors"}
    assert len(nb.loc["taxol@0.3", "batch"].split(",")) == 10
    assert "DMSO" not in set(nb.moa) and "DMSO" not in set(nb.nsc_neighbour_moa)
    assert result.confusion_nsc.to_numpy().sum() == 103


# -- slow, obviously correct reference ------------------------------------------------

def reference(profiles: ProfileTable, ks=(1, 3)):
    """Per-treatment loops: mean per (treatment, plate), median over plates, then for each
    query a sort of its allowed candidates by (-cosine, treatment order)."""
    meta = profiles.meta
    groups: dict[str, dict[str, list]] = {}
    info: dict[str, tuple] = {}
    for i in range(len(meta)):
        row = meta.iloc[i]
        if row.Metadata_MoA == "DMSO":
            continue
        groups.setdefault(row.Metadata_Treatment, {}).setdefault(row.Metadata_Plate, []).append(
            profiles.features[i].astype(float))
        b = info.get(row.Metadata_Treatment, (None, None, None, set()))[3]
        info[row.Metadata_Treatment] = (row.Metadata_Compound, row.Metadata_Concentration,
                                        row.Metadata_MoA, b | {row.Metadata_Batch})
    names = sorted(groups, key=lambda t: (info[t][0], info[t][1], t))
    vec = {}
    for t in names:
        plate_means = [np.mean(v, axis=0) for _, v in sorted(groups[t].items())]
        vec[t] = np.median(plate_means, axis=0)

    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    moa_batches: dict[str, set] = {}
    for t in names:
        moa_batches.setdefault(info[t][2], set()).update(info[t][3])
    eligible = {t for t in names if len(moa_batches[info[t][2]]) >= 2}

    def allowed(q, c, rule):
        if c == q or info[c][0] == info[q][0]:
            return False
        if rule == "nsc":
            return True
        if q not in eligible or c not in eligible:
            return False
        bq, bc = info[q][3], info[c][3]
        return not (len(bq) == 1 and len(bc) == 1 and bq == bc)

    out = {}
    for rule in ("nsc", "nscb"):
        res = {"neighbour": {}, "ap": {}, "knn": {k: [] for k in ks}}
        for i, q in enumerate(names):
            if rule == "nscb" and q not in eligible:
                continue
            cands = [(-cos(vec[q], vec[c]), j, c) for j, c in enumerate(names) if allowed(q, c, rule)]
            if not cands:
                continue
            cands.sort()
            res["neighbour"][q] = cands[0][2]
            rel = [info[c][2] == info[q][2] for _, _, c in cands]
            if any(rel):
                hits, precisions = 0, []
                for rank, r in enumerate(rel, start=1):
                    if r:
                        hits += 1
                        precisions.append(hits / rank)
                res["ap"][q] = sum(precisions) / len(precisions)
            for k in ks:
                top = [info[c][2] for _, _, c in cands[:k]]
                best = max(set(top), key=lambda m: (top.count(m), -top.index(m)))
                res["knn"][k].append(best == info[q][2])
        out[rule] = res
    return out


def random_design(seed: int, n_fields: int = 2400) -> pd.DataFrame:
    """A random screen: 6 batches x 3 plates, 30 compounds at 1-3 doses, 5 MoAs (one of them
    in a single batch), one treatment on every plate, DMSO on every plate."""
    rng = np.random.default_rng(seed)
    plates = [(f"W{b}", f"W{b}_P{p}") for b in range(6) for p in range(3)]
    treatments = []
    for c in range(30):
        moa = f"M{c % 5}"
        for dose in (0.1, 1.0, 3.0)[: 1 + c % 3]:
            batch = "W0" if moa == "M4" else f"W{rng.integers(6)}"
            treatments.append((f"cmp{c:02d}", dose, moa, batch))
    treatments.append(("ctrl+", 0.3, "M0", None))  # every plate
    rows = []
    for i in range(n_fields):
        if i % 5 == 0:
            batch, plate = plates[rng.integers(len(plates))]
            rows.append(("DMSO", 0.0, "DMSO", batch, plate))
            continue
        comp, dose, moa, batch = treatments[rng.integers(len(treatments))]
        choices = [p for p in plates if batch is None or p[0] == batch]
        b, plate = choices[rng.integers(len(choices))]
        rows.append((comp, dose, moa, b, plate))
    t = pd.DataFrame(rows, columns=["compound", "concentration", "moa", "batch", "plate"])
    t["well"] = [f"A{i:03d}" for i in range(len(t))]
    t["site"] = 1
    t["treatment"] = [f"{c}@{x:g}" for c, x in zip(t.compound, t.concentration)]
    return t


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_slow_reference(seed):
    table = random_design(seed)
    profiles = simulate_profiles(table, 16, moa_signal=0.4, seed=seed, dtype=np.float64)
    result = evaluate_profiles(profiles, tvn="none", ks=(1, 3))
    ref = reference(profiles, ks=(1, 3))
    nb = result.neighbours.set_index("treatment")
    assert len(nb) == len(ref["nsc"]["neighbour"]) > 50
    for rule, match in (("nsc", result.nsc_match), ("nscb", result.nscb_match)):
        r = ref[rule]
        got = nb[f"{rule}_neighbour"]
        assert {t: got[t] for t in r["neighbour"]} == r["neighbour"]
        assert match.n == len(r["neighbour"])
        assert (got.drop(list(r["neighbour"])) == "").all()
        ap = nb[f"{rule}_ap"].dropna()
        assert set(ap.index) == set(r["ap"])
        assert np.allclose([ap[t] for t in r["ap"]], list(r["ap"].values()))
        for k in (1, 3):
            assert match.knn[k] == pytest.approx(np.mean(r["knn"][k]))
    assert 0 < result.nscb < 1 and result.n_nscb < result.n_nsc  # M4 excluded from NSCB


# -- bad inputs -----------------------------------------------------------------------

def test_errors_name_the_problem():
    with pytest.raises(DataError, match="two compounds"):
        evaluate_treatments(treatment_table([("A@1", "A", "M", "W1", 0), ("A@2", "A", "M", "W2", 9)]))
    one_batch = [(t, c, m, "W1", a) for t, c, m, _, a in HAND]
    with pytest.raises(DataError, match="one batch.*--no-nscb"):
        evaluate_treatments(treatment_table(one_batch))
    assert evaluate_treatments(treatment_table(one_batch), nscb=False)["nscb_match"] is None
    with pytest.raises(DataError, match="k >= 1"):
        evaluate_treatments(treatment_table(HAND), ks=(0, 3))
    single = [(t, c, m, "W1" if m == "M1" else "W2", a) for t, c, m, _, a in HAND]
    with pytest.raises(DataError, match="No MoA occurs in two or more batches"):
        evaluate_treatments(treatment_table(single))


def test_dmso_is_never_a_candidate():
    rows = HAND + [("DMSO@0", "DMSO", "DMSO", "W1", 1)]  # nearest to A@1 and A@3
    out = evaluate_treatments(treatment_table(rows))
    nb = out["neighbours"]
    assert "DMSO@0" not in set(nb.treatment) and "DMSO@0" not in set(nb.nsc_neighbour)
    assert nb.set_index("treatment").loc["A@1", "nsc_neighbour"] == "B@1"


def _official_nscb(treat: pd.DataFrame, feats: np.ndarray) -> dict:
    """WS-DINO's published NSCB loop, re-derived from its description: for each query
    drop the same compound, then every treatment whose (median) batch code equals the
    query's, and take the cosine argmax of what is left."""
    out = {}
    for i in range(len(treat)):
        keep = [j for j in range(len(treat))
                if treat.compound[j] != treat.compound[i] and treat.code[j] != treat.code[i]]
        if not keep:
            continue
        sims = [feats[j] @ feats[i] / np.linalg.norm(feats[j]) / np.linalg.norm(feats[i])
                for j in keep]
        out[treat.treatment[i]] = treat.treatment[keep[int(np.argmax(sims))]]
    return out


def test_nscb_official_multibatch_rule_matches_the_published_loop():
    """Issue 14: with ``nscb_multibatch="official"`` a treatment on plates of several
    batches gets the median of its plates' batch codes and obeys the batch rule,
    as in crosszamirski/WS-DINO ``Eval_BBBC021.py``; the default exempts it."""
    rng = np.random.default_rng(5)
    plates = {"P1": "Week1", "P2": "Week2", "P3": "Week10", "P4": "Week2"}  # codes 0, 1, 2, 1
    spec = [("taxol", "MS", ["P1", "P2", "P3"])]  # median code 1 (Week2)
    spec += [(f"s{k}", "MS", [p]) for k, p in enumerate(["P1", "P2", "P3", "P4"])]
    spec += [(f"d{k}", "MD", [p]) for k, p in enumerate(["P1", "P2", "P3", "P4", "P2"])]
    rows, feats = [], []
    for comp, moa, on in spec:
        centre = rng.normal(size=6)
        for plate in on:
            for site in range(2):
                rows.append({"Metadata_Plate": plate, "Metadata_Batch": plates[plate],
                             "Metadata_Well": f"{comp}{plate}", "Metadata_Site": site,
                             "Metadata_Compound": comp, "Metadata_Concentration": 1.0,
                             "Metadata_Treatment": f"{comp}@1", "Metadata_MoA": moa})
                feats.append(centre + 0.1 * rng.normal(size=6))
    profiles = ProfileTable(pd.DataFrame(rows), np.array(feats), [f"f{i}" for i in range(6)])
    official = evaluate_profiles(profiles, tvn="none", nscb_multibatch="official")
    exempt = evaluate_profiles(profiles, tvn="none")

    treat = official.treatments.meta
    # Batch codes by hand, as the published script numbers them: batches in natural
    # order (Week1 = 0, Week2 = 1, Week10 = 2), a treatment's code the median over its plates.
    week = {"Week1": 0, "Week2": 1, "Week10": 2}
    by_hand = {f"{comp}@1": float(np.median([week[plates[p]] for p in on]))
               for comp, _, on in spec}
    assert by_hand["taxol@1"] == 1.0 and by_hand["s2@1"] == 2.0 and by_hand["d3@1"] == 1.0
    codes = [by_hand[t] for t in treat["Metadata_Treatment"]]
    assert metrics.median_batch_codes(
        [r["Metadata_Treatment"] for r in rows], [r["Metadata_Batch"] for r in rows],
        treat["Metadata_Treatment"]).tolist() == codes
    ref = _official_nscb(pd.DataFrame({"treatment": treat["Metadata_Treatment"],
                                       "compound": treat["Metadata_Compound"], "code": codes}),
                         official.treatments.features)
    nb = official.neighbours.set_index("treatment")["nscb_neighbour"]
    assert {t: nb[t] for t in ref} == ref
    # Taxol (code 1) never meets a Week2 treatment under the official rule; exempt, it may.
    week2 = {"s1@1", "s3@1", "d1@1", "d3@1", "d4@1"}
    assert nb["taxol@1"] not in week2
    assert all(nb[t] != "taxol@1" for t in week2)
    sim = official.treatments.features
    names = list(treat["Metadata_Treatment"])
    t = names.index("taxol@1")
    best = max((n for n in names if n != "taxol@1"),
               key=lambda n: sim[names.index(n)] @ sim[t] / np.linalg.norm(sim[names.index(n)]))
    assert exempt.neighbours.set_index("treatment")["nscb_neighbour"]["taxol@1"] == best
    assert best in week2  # so the two rules differ on this screen
    with pytest.raises(DataError, match="multi-batch"):
        evaluate_profiles(profiles, tvn="none", nscb_multibatch="median")
