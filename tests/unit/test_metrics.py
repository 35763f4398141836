"""Hand-computed checks for workers.measuring.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.measuring.metrics import (
    ac,
    accuracy,
    am,
    bec,
    btc,
    compat_matrix,
    curve_area,
    ecc,
    ecc_gap_by_class_group,
    flip_metrics,
    nearest_neighbors,
    nfi,
    nfr,
    nfr_any,
    no_regret,
    pfr,
    retrieval_map_at_k,
    retrieval_top1,
    update_gain,
)


def _unit(deg: float, r: float = 1.0) -> list[float]:
    rad = math.radians(deg)
    return [r * math.cos(rad), r * math.sin(rad)]


# --------------------------------------------------------------------------- classification

# 10 samples.  old (k) right on {0,1,2,3,4,5}; new (g) right on {0,1,2,6,7}.
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
OLD = np.array([0, 1, 2, 0, 1, 2, 1, 2, 0, 1])
NEW = np.array([0, 1, 2, 1, 2, 0, 0, 1, 0, 1])


def test_accuracy_hand_case() -> None:
    # new right on 0,1,2,6,7 -> 5/10; old right on 0..5 -> 6/10
    assert accuracy(NEW, Y) == pytest.approx(0.5)
    assert accuracy(OLD, Y) == pytest.approx(0.6)


def test_flip_metrics_hand_case() -> None:
    # k right & g wrong on 3,4,5 -> NFR = 3/10
    assert nfr(NEW, OLD, Y) == pytest.approx(3 / 10)
    # k wrong & g right on 6,7 -> PFR = 2/10
    assert pfr(NEW, OLD, Y) == pytest.approx(2 / 10)
    # NFI = NFR / (1 - acc(g)) = 0.3 / 0.5
    assert nfi(NEW, OLD, Y) == pytest.approx(0.6)
    # both right on 0,1,2 (3) / k right (6) -> BTC = 1/2
    assert btc(NEW, OLD, Y) == pytest.approx(0.5)
    # both wrong on 8,9 (2) / g wrong on 3,4,5,8,9 (5) -> BEC = 2/5
    assert bec(NEW, OLD, Y) == pytest.approx(0.4)


def test_flip_metrics_dict_matches_individual() -> None:
    out = flip_metrics(NEW, OLD, Y)
    assert set(out) == {"nfr", "pfr", "nfi", "btc", "bec"}
    assert out["nfr"] == pytest.approx(0.3)
    assert out["pfr"] == pytest.approx(0.2)
    assert out["nfi"] == pytest.approx(0.6)
    assert out["btc"] == pytest.approx(0.5)
    assert out["bec"] == pytest.approx(0.4)


def test_flip_metrics_are_directional() -> None:
    # swapping roles: "old"=NEW right on 0,1,2,6,7; "new"=OLD wrong on 6,7 -> NFR 2/10
    assert nfr(OLD, NEW, Y) == pytest.approx(0.2)
    assert pfr(OLD, NEW, Y) == pytest.approx(0.3)


def test_nfi_zero_when_new_is_perfect() -> None:
    # g makes no errors -> no flips possible, NFI defined 0.0 (no division by zero)
    assert nfi(Y.copy(), OLD, Y) == 0.0
    assert nfr(Y.copy(), OLD, Y) == 0.0


def test_nfi_one_when_every_error_is_a_flip() -> None:
    y = np.array([0, 0, 1, 1])
    old = np.array([0, 0, 1, 1])  # all right
    new = np.array([0, 1, 1, 0])  # wrong on 1,3 -> NFR 2/4, err 2/4 -> NFI 1
    assert nfi(new, old, y) == pytest.approx(1.0)


def test_btc_one_when_old_got_nothing_right() -> None:
    y = np.array([0, 1, 2])
    old = np.array([1, 2, 0])  # all wrong
    new = np.array([0, 0, 0])  # right on 0 only
    assert btc(new, old, y) == 1.0
    # both wrong on 1,2 (2) / g wrong (2) -> BEC = 1
    assert bec(new, old, y) == pytest.approx(1.0)


def test_bec_one_when_new_makes_no_errors() -> None:
    y = np.array([0, 1, 2])
    old = np.array([0, 0, 0])
    assert bec(y.copy(), old, y) == 1.0
    # both right on 0 (1) / k right (1) -> BTC = 1
    assert btc(y.copy(), old, y) == 1.0


def test_identical_models_have_no_flips() -> None:
    out = flip_metrics(OLD, OLD.copy(), Y)
    assert out == {"nfr": 0.0, "pfr": 0.0, "nfi": 0.0, "btc": 1.0, "bec": 1.0}


def test_nfr_any_union_of_ancestors() -> None:
    y = np.zeros(6, dtype=int)
    old1 = np.array([0, 0, 1, 1, 1, 1])  # right on 0,1
    old2 = np.array([1, 1, 0, 0, 1, 1])  # right on 2,3
    new = np.array([1, 0, 1, 0, 1, 0])  # wrong on 0,2,4
    # individually: old1 flips only 0 -> 1/6; old2 flips only 2 -> 1/6
    assert nfr(new, old1, y) == pytest.approx(1 / 6)
    assert nfr(new, old2, y) == pytest.approx(1 / 6)
    # union right on 0,1,2,3; new wrong on 0,2,4 -> flips 0,2 -> 2/6 (> max individual 1/6)
    assert nfr_any(new, [old1, old2], y) == pytest.approx(2 / 6)


def test_nfr_any_edge_cases() -> None:
    assert nfr_any(NEW, [], Y) == 0.0
    # single ancestor reduces to NFR
    assert nfr_any(NEW, [OLD], Y) == pytest.approx(0.3)


# --------------------------------------------------------------------------- retrieval

# Collection on the unit circle (angles in degrees) with labels.
#   G0: 0 deg  label 0     G1: 40 deg label 1 (stored with norm 5)
#   G2: 90 deg label 0     G3: 180 deg label 1     G4: 270 deg label 2
GALLERY = np.array(
    [_unit(0), _unit(40, r=5.0), _unit(90), _unit(180), _unit(270)], dtype=np.float64
)
GALLERY_LABELS = np.array([0, 1, 0, 1, 2])
# Queries: Q0 10 deg label 0, Q1 60 deg label 1, Q2 190 deg label 0, Q3 280 deg label 3 (absent)
QUERIES = np.array([_unit(10, r=2.0), _unit(60), _unit(190), _unit(280, r=0.5)])
QUERY_LABELS = np.array([0, 1, 0, 3])


def test_nearest_neighbors_uses_cosine() -> None:
    # Q0 (10 deg): angular gaps G0 10, G1 30, G2 80, G4 100, G3 170.  Raw inner product would
    # rank G1 first because of its norm 5; cosine must put G0 first.
    scores, idx = nearest_neighbors(QUERIES[:1], GALLERY, k=5)
    assert idx.tolist() == [[0, 1, 2, 4, 3]]
    expected = [math.cos(math.radians(d)) for d in (10, 30, 80, 100, 170)]
    np.testing.assert_allclose(scores[0], expected, atol=1e-6)


def test_nearest_neighbors_clips_k_and_does_not_mutate_inputs() -> None:
    q = QUERIES.copy()
    g = GALLERY.copy()
    scores, idx = nearest_neighbors(q, g, k=100)
    assert scores.shape == (4, 5)
    assert idx.shape == (4, 5)
    np.testing.assert_array_equal(q, QUERIES)
    np.testing.assert_array_equal(g, GALLERY)


def test_retrieval_top1_hand_case() -> None:
    # Q0 -> G0 (label 0) right; Q1 (60) -> G1 gap 20 (label 1) right;
    # Q2 (190) -> G3 gap 10 (label 1) wrong; Q3 (280) -> G4 (label 2) wrong  -> 2/4
    assert retrieval_top1(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS) == pytest.approx(0.5)


def test_retrieval_map_hand_case() -> None:
    # K = 100 clipped to 5.  n_rel = 2 for labels 0 and 1, 0 for label 3.
    # Q0 ranking G0,G1,G2,G4,G3 -> rel 1,0,1,0,0 -> (1 + 2/3) / 2 = 5/6
    # Q1 ranking G1,G2,G0,G3,G4 -> rel 1,0,0,1,0 -> (1 + 2/4) / 2 = 3/4
    # Q2 ranking G3,G4,G2,G1,G0 -> rel 0,0,1,0,1 -> (1/3 + 2/5) / 2 = 11/30
    # Q3 has no relevant items -> AP 0
    expected = (5 / 6 + 3 / 4 + 11 / 30 + 0.0) / 4
    got = retrieval_map_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, k=100)
    assert got == pytest.approx(expected)
    assert got == pytest.approx(0.4875)


def test_retrieval_map_small_k() -> None:
    # K = 1: AP@1 = rel_1 / min(1, n_rel) -> equals top-1 here: (1 + 1 + 0 + 0) / 4
    assert retrieval_map_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, k=1) == pytest.approx(
        0.5
    )
    # K = 2: Q0 rel 1,0 -> 1/2; Q1 rel 1,0 -> 1/2; Q2 rel 0,0 -> 0; Q3 -> 0  => 1/4
    assert retrieval_map_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, k=2) == pytest.approx(
        0.25
    )


def test_retrieval_map_n_rel_larger_than_k() -> None:
    # Query at 0 deg, label 0.  Collection ranking by gap: A 5 (0), B 20 (1), C 30 (0), D 40 (0).
    gallery = np.array([_unit(5), _unit(20), _unit(30), _unit(40)])
    g_labels = np.array([0, 1, 0, 0])
    query = np.array([_unit(0)])
    q_labels = np.array([0])
    # n_rel = 3 > K = 2: rel 1,0 -> P@1 = 1 -> 1 / min(2, 3) = 1/2 (not 1/3)
    assert retrieval_map_at_k(query, q_labels, gallery, g_labels, k=2) == pytest.approx(0.5)
    # K = 100 clipped to 4: rel 1,0,1,1 -> (1 + 2/3 + 3/4) / 3 = 29/36
    assert retrieval_map_at_k(query, q_labels, gallery, g_labels, k=100) == pytest.approx(29 / 36)


def test_compat_matrix_pairs() -> None:
    # gen 0 puts label 0 on the x axis; gen 1 swaps axes (incompatible update).
    labels = np.array([0, 1])
    gallery_embs = {0: np.array([[1.0, 0.0], [0.0, 1.0]]), 1: np.array([[0.0, 1.0], [1.0, 0.0]])}
    query_embs = {0: np.array([[1.0, 0.2], [0.2, 1.0]]), 1: np.array([[0.2, 1.0], [1.0, 0.2]])}
    c = compat_matrix(query_embs, gallery_embs, labels, labels)
    assert set(c) == {(0, 0), (1, 0), (1, 1)}  # only b <= a
    # same-generation: each query's nearest item carries its label -> top1 1, AP 1
    assert c[(0, 0)] == {"top1": 1.0, "map100": 1.0}
    assert c[(1, 1)] == {"top1": 1.0, "map100": 1.0}
    # gen-1 queries vs gen-0 gallery: nearest item always has the other label -> top1 0;
    # the single relevant item is at rank 2 -> AP = (1/2) / 1 -> mAP 1/2
    assert c[(1, 0)]["top1"] == 0.0
    assert c[(1, 0)]["map100"] == pytest.approx(0.5)
    assert not ecc(c[(1, 0)]["top1"], c[(0, 0)]["top1"])


def test_ecc_is_strict() -> None:
    assert ecc(0.8, 0.7) is True
    assert ecc(0.7, 0.7) is False  # equal is not compatible
    assert ecc(0.6, 0.7) is False


TOP1 = {
    (0, 0): 0.6,
    (1, 0): 0.7,
    (1, 1): 0.8,
    (2, 0): 0.5,
    (2, 1): 0.8,
    (2, 2): 0.9,
}


def test_ac_and_am() -> None:
    # off-diagonal: (1,0) 0.7 > 0.6 yes; (2,0) 0.5 > 0.6 no; (2,1) 0.8 > 0.8 no -> AC = 1/3
    assert ac(TOP1) == pytest.approx(1 / 3)
    # AM = (0.6 + 0.7 + 0.8 + 0.5 + 0.8 + 0.9) / 6 = 4.3 / 6
    assert am(TOP1) == pytest.approx(4.3 / 6)


def test_ac_am_edge_cases() -> None:
    assert math.isnan(ac({(0, 0): 0.5}))  # no a > b pairs
    assert am({(0, 0): 0.5}) == pytest.approx(0.5)
    assert math.isnan(am({}))
    with pytest.raises(ValueError, match="missing diagonal"):
        ac({(1, 0): 0.7, (1, 1): 0.8})


def test_ecc_gap_by_class_group_by_hand() -> None:
    # six queries; the old generation trained on classes 0 and 1, never on 2
    labels = np.array([0, 0, 1, 2, 2, 2])
    new = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    old = np.array([1, 0, 0, 1, 1, 1], dtype=bool)
    out = ecc_gap_by_class_group(new, old, labels, seen_classes=[0, 1])
    # seen (first three): new 2/3, old 1/3 -> +1/3; unseen (last three): new 1/3, old 1 -> -2/3
    assert out["seen"] == pytest.approx(1 / 3)
    assert out["unseen"] == pytest.approx(-2 / 3)
    assert (out["seen_queries"], out["unseen_queries"]) == (3, 3)
    # the groups' gaps weighted by their queries give C[a][b] - C[b][b] overall: 3/6 - 4/6
    overall = (3 * out["seen"] + 3 * out["unseen"]) / 6
    assert overall == pytest.approx(new.mean() - old.mean())
    # a generation that saw every class leaves no unseen group
    whole = ecc_gap_by_class_group(new, old, labels, seen_classes=[0, 1, 2])
    assert whole["unseen"] is None and whole["unseen_queries"] == 0
    assert whole["seen"] == pytest.approx(-1 / 6)
    with pytest.raises(ValueError, match="lengths differ"):
        ecc_gap_by_class_group(new[:5], old, labels, [0])


def test_update_gain() -> None:
    # (0.7 - 0.6) / (0.8 - 0.6) = 0.5
    assert update_gain(0.7, 0.6, 0.8) == pytest.approx(0.5)
    # (0.5 - 0.6) / (0.8 - 0.6) = -0.5
    assert update_gain(0.5, 0.6, 0.8) == pytest.approx(-0.5)
    # full gain: cross-generation as good as the new model
    assert update_gain(0.8, 0.6, 0.8) == pytest.approx(1.0)
    assert math.isnan(update_gain(0.7, 0.6, 0.6))


# --------------------------------------------------------------------------- backfill curves

BETAS = [round(0.1 * i, 1) for i in range(11)]


def test_curve_area_constant_and_linear() -> None:
    assert curve_area([(b, 0.5) for b in BETAS]) == pytest.approx(0.5)
    # M = beta -> integral 1/2 over a range of 1
    assert curve_area([(b, b) for b in BETAS]) == pytest.approx(0.5)


def test_curve_area_divides_by_range_and_sorts() -> None:
    # beta 0..0.5, M 0.2 -> 0.4: trapezoid 0.5 * (0.2 + 0.4) / 2 = 0.15, / 0.5 -> 0.3
    assert curve_area([(0.5, 0.4), (0.0, 0.2)]) == pytest.approx(0.3)


def test_curve_with_dip() -> None:
    curve = [(b, 0.4 if b == 0.2 else 0.6) for b in BETAS]
    # flat 0.6 minus a triangle of base 0.2 and height 0.2: 0.6 - 0.02 = 0.58
    assert curve_area(curve) == pytest.approx(0.58)
    assert no_regret(curve) is False
    assert no_regret(curve, tol=0.1) is False
    assert no_regret(curve, tol=0.2 + 1e-9) is True


def test_no_regret_monotone_and_flat() -> None:
    assert no_regret([(b, 0.5 + 0.1 * b) for b in BETAS]) is True
    assert no_regret([(b, 0.5) for b in BETAS]) is True
    # ends below the start
    assert no_regret([(0.0, 0.5), (0.5, 0.7), (1.0, 0.49)]) is False


# --------------------------------------------------------------------------- validation


def test_prediction_length_mismatch() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        accuracy(np.array([0, 1]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="length mismatch: old"):
        nfr(np.array([0, 1, 2]), np.array([0, 1]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"olds\[1\]"):
        nfr_any(np.array([0, 1]), [np.array([0, 1]), np.array([0])], np.array([0, 1]))


def test_empty_predictions() -> None:
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="empty"):
        flip_metrics(np.array([]), np.array([]), np.array([]))


def test_embedding_dim_mismatch() -> None:
    q = np.ones((3, 64))
    g = np.ones((4, 32))
    msg = "embedding dim mismatch: queries have 64, gallery has 32"
    with pytest.raises(ValueError, match=msg):
        retrieval_top1(q, np.zeros(3), g, np.zeros(4))
    with pytest.raises(ValueError, match=msg):
        nearest_neighbors(q, g, k=1)


def test_label_length_mismatch() -> None:
    with pytest.raises(ValueError, match="query labels"):
        retrieval_top1(QUERIES, QUERY_LABELS[:3], GALLERY, GALLERY_LABELS)
    with pytest.raises(ValueError, match="gallery labels"):
        retrieval_map_at_k(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS[:4])


def test_nan_and_empty_embeddings() -> None:
    bad = QUERIES.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="query embeddings contain NaN"):
        retrieval_top1(bad, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    with pytest.raises(ValueError, match="gallery embeddings are empty"):
        nearest_neighbors(QUERIES, np.zeros((0, 2)), k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        nearest_neighbors(QUERIES, GALLERY, k=0)


def test_empty_curve() -> None:
    with pytest.raises(ValueError, match="empty"):
        curve_area([])


def test_ecc_on_a_partition_of_the_classes_by_hand() -> None:
    from workers.measuring.metrics import ecc_on_classes

    # 6 queries: classes 0, 0, 1, 1, 2, 2. Class 0: a's queries hit 2 of 2, b's own 1 of 2
    # (1.0 > 0.5: ECC holds); class 1: 1 of 2 each (0.5 > 0.5 fails: strict); class 2: 0
    # vs 1. On {0, 1}: 3/4 > 2/4 holds; on {1, 2}: 1/4 > 2/4 fails; on {7}: no queries.
    y = np.array([0, 0, 1, 1, 2, 2])
    cross = np.array([1, 1, 1, 0, 0, 0], bool)
    own = np.array([1, 0, 0, 1, 1, 0], bool)
    assert ecc_on_classes(cross, own, y, [0]) is True
    assert ecc_on_classes(cross, own, y, [1]) is False
    assert ecc_on_classes(cross, own, y, {0, 1}) is True
    assert ecc_on_classes(cross, own, y, [1, 2]) is False
    assert ecc_on_classes(cross, own, y, [7]) is None
