"""The gate's paired statistics on cases computed by hand (or by explicit enumeration)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from workers.measuring import metrics as M
from workers.measuring import stats as S


def test_paired_counts_by_hand() -> None:
    new = np.array([1, 1, 0, 0, 1])
    old = np.array([1, 0, 1, 0, 0])
    # discordant: case 1 and 4 new-only (gain), case 2 old-only (loss)
    assert S.paired_counts(new, old) == S.PairedCounts(5, 2, 1)
    c = S.PairedCounts(5, 2, 1)
    assert c.delta == pytest.approx(0.2) and c.loss_rate == pytest.approx(0.2)
    with pytest.raises(ValueError, match="binary"):
        S.paired_counts(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="length"):
        S.paired_counts(np.array([0, 1]), np.array([0, 1, 1]))


def test_bootstrap_of_identical_vectors_is_zero() -> None:
    x = np.array([1, 0, 1, 1, 0, 0, 1])
    assert S.paired_bootstrap_ci(x, x.copy()) == (0.0, 0.0, 0.0)
    assert S.paired_bootstrap_ci_counts(S.PairedCounts(7, 0, 0)) == (0.0, 0.0, 0.0)
    # a constant difference: every resample has the same mean
    assert S.paired_bootstrap_ci(x + 0.5, x) == (0.5, 0.5, 0.5)


def test_bootstrap_matches_the_binomial_resampling_distribution() -> None:
    # d = (1, 0, 0, 0): a resample's mean is K/4, K ~ Binomial(4, 1/4):
    # P(K=0) = 81/256 = 0.316, P(K<=1) = 189/256 = 0.738, P(K<=2) = 243/256 = 0.949.
    # 80% interval: the 10% quantile is 0 (0.316 >= 0.1), the 90% quantile is K=2 -> 0.5.
    x, y = np.array([1, 0, 0, 0]), np.array([0, 0, 0, 0])
    for seed in (0, 1, 2):
        ci = S.paired_bootstrap_ci(x, y, confidence=0.8, resamples=20_000, seed=seed)
        assert ci == (0.25, 0.0, 0.5)
        assert S.paired_bootstrap_ci_counts(
            S.PairedCounts(4, 1, 0), confidence=0.8, resamples=20_000, seed=seed
        ) == (0.25, 0.0, 0.5)


def test_bootstrap_matches_an_explicit_enumeration_of_resamples() -> None:
    x = np.array([0.3, 0.1, 0.0, 0.7])
    y = np.array([0.1, 0.1, 0.2, 0.2])
    d = x - y  # 0.2, 0, -0.2, 0.5
    # all 4^4 equally likely resamples of the 4 pairs
    means = sorted(
        round(float(np.mean(d[list(ix)])), 10) for ix in itertools.product(range(4), repeat=4)
    )
    atoms = sorted(set(means))
    cdf = {a: sum(m <= a for m in means) / len(means) for a in atoms}

    def quantile(q: float) -> float:  # the smallest atom whose CDF reaches q
        return next(a for a in atoms if cdf[a] >= q)

    conf = 0.7
    lo, hi = quantile(0.15), quantile(0.85)
    for q, a in ((0.15, lo), (0.85, hi)):  # sampling can only pick these atoms
        below = max((cdf[b] for b in atoms if b < a), default=0.0)
        assert cdf[a] - q > 0.01 and q - below > 0.01
    ci = S.paired_bootstrap_ci(x, y, confidence=conf, resamples=40_000, seed=3)
    assert ci.estimate == pytest.approx(0.125)
    assert (ci.lo, ci.hi) == pytest.approx((lo, hi))


def test_bootstrap_interval_near_its_normal_approximation() -> None:
    # 400 pairs: 40 differences +1, 40 differences -1, 320 zeros. Mean 0, population
    # variance 80/400 = 0.2, standard error sqrt(0.2/400) = 0.02236; 95%: +-1.96 * 0.02236.
    counts = S.PairedCounts(400, 40, 40)
    ci = S.paired_bootstrap_ci_counts(counts, confidence=0.95, resamples=20_000)
    half = 1.96 * math.sqrt(0.2 / 400)  # 0.0438
    assert ci.estimate == 0.0
    assert ci.lo == pytest.approx(-half, abs=0.006)
    assert ci.hi == pytest.approx(half, abs=0.006)
    # the same data as vectors: the same categories, so the same draws for the same seed
    new = np.r_[np.ones(40), np.zeros(40), np.ones(100), np.zeros(220)]
    old = np.r_[np.zeros(40), np.ones(40), np.ones(100), np.zeros(220)]
    assert S.paired_counts(new, old) == counts
    assert S.paired_bootstrap_ci(new, old, resamples=20_000) == ci


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        S.paired_bootstrap_ci(np.array([1.0]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="confidence"):
        S.paired_bootstrap_ci(np.array([1.0]), np.array([0.0]), confidence=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        S.paired_bootstrap_ci_counts(S.PairedCounts(3, 2, 2))


def test_mcnemar_exact_by_hand() -> None:
    # b=1, c=6: 7 discordant pairs, X ~ Binomial(7, 1/2); P(X <= 1) = (1 + 7)/128
    assert S.mcnemar_exact(1, 6, "less") == pytest.approx(8 / 128)
    assert S.mcnemar_exact(1, 6) == pytest.approx(16 / 128)
    assert S.mcnemar_exact(1, 6, "greater") == pytest.approx(127 / 128)  # P(X >= 1)
    assert S.mcnemar_exact(6, 1, "greater") == pytest.approx(8 / 128)
    # b=0, c=5: two-sided 2 * (1/32)
    assert S.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # b=c=3: P(X <= 3) = (1 + 6 + 15 + 20)/64 > 1/2, so the two-sided p is capped at 1
    assert S.mcnemar_exact(3, 3, "less") == pytest.approx(42 / 64)
    assert S.mcnemar_exact(3, 3) == 1.0
    assert S.mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        S.mcnemar_exact(1, 2, "bigger")  # type: ignore[arg-type]


def test_clopper_pearson_by_hand() -> None:
    # k = 0: P(X <= 0 | p) = (1 - p)^n = alpha/2 -> hi = 1 - (alpha/2)^(1/n)
    lo, hi = S.clopper_pearson(0, 10, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))  # 0.3085
    # k = n: P(X >= n | p) = p^n = alpha/2 -> lo = (alpha/2)^(1/n)
    lo, hi = S.clopper_pearson(10, 10, 0.95)
    assert lo == pytest.approx(0.025 ** (1 / 10)) and hi == 1.0
    # k = 1, n = 10, 90%: lo solves 1 - (1 - p)^10 = 0.05; hi solves
    # (1 - p)^10 + 10 p (1 - p)^9 = 0.05 (about 0.3942)
    lo, hi = S.clopper_pearson(1, 10, 0.90)
    assert lo == pytest.approx(1 - 0.95 ** (1 / 10))  # 0.00512
    assert (1 - hi) ** 10 + 10 * hi * (1 - hi) ** 9 == pytest.approx(0.05, abs=1e-9)
    assert hi == pytest.approx(0.3942, abs=1e-4)
    with pytest.raises(ValueError):
        S.clopper_pearson(11, 10)


def test_pair_evidence_keys_and_values() -> None:
    ev = S.pair_evidence(S.PairedCounts(10, 3, 1), S.PairedCounts(20, 1, 6))
    assert ev["ecc_delta"] == pytest.approx(0.2)  # (3 - 1) / 10
    assert ev["ecc_delta_lo"] <= 0.2 <= ev["ecc_delta_hi"]
    assert (ev["ecc_queries"], ev["ecc_gain"], ev["ecc_loss"]) == (10, 3, 1)
    assert (ev["flip_items"], ev["flip_neg"], ev["flip_pos"]) == (20, 6, 1)
    assert ev["flip_p"] == pytest.approx(8 / 128)  # 6 negative vs 1 positive: P(X >= 6)
    assert (ev["nfr_lo"], ev["nfr_hi"]) == pytest.approx(S.clopper_pearson(6, 20))
    assert ev["nfr_lo"] < 6 / 20 < ev["nfr_hi"]
    assert S.pair_evidence(None, None) == {}


def test_retrieval_hits_by_hand() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    gallery_labels = np.array([0, 1])
    queries = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.05]])
    query_labels = np.array([0, 0, 1])
    # nearest items: 0 (label 0, right), 1 (label 1, wrong), 0 (label 0, wrong)
    hits = M.retrieval_hits(queries, query_labels, gallery, gallery_labels)
    assert hits.tolist() == [True, False, False]
    assert M.retrieval_top1(queries, query_labels, gallery, gallery_labels) == pytest.approx(1 / 3)
