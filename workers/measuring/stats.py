"""Paired statistics for the promotion gate: is the new generation worse, beyond noise?

Generation g and an ancestor k are measured on the *same* cases (the same retrieval
queries, the same evaluation items), so the comparison is paired: per case, the new
outcome and the old one. Only the discordant cases carry information about the
difference; for binary outcomes they are counted as

- ``gain``: new right, old wrong (a positive flip),
- ``loss``: new wrong, old right (a negative flip),

out of ``n`` cases (:class:`PairedCounts`).

The statistics
--------------
- :func:`paired_bootstrap_ci`: percentile bootstrap interval for mean(x) - mean(y) of two
  paired outcome vectors. Resampling the n pairs with replacement only changes how often
  each distinct difference d_i = x_i - y_i is drawn, so a resample is a multinomial draw of
  the counts of the distinct values of d: this *is* the paired bootstrap (the same
  distribution as resampling indices), it is exact in the number of categories, and for
  binary outcomes (d in {-1, 0, +1}) it needs only :class:`PairedCounts`
  (:func:`paired_bootstrap_ci_counts` gives the same numbers for the same seed). The
  interval is the (alpha/2, 1 - alpha/2) quantiles of the resampled means, alpha =
  1 - confidence, taken as inverse-CDF quantiles (values that occur in the resamples).
- :func:`mcnemar_exact`: exact McNemar test on the discordant counts: under "no
  difference" the negative flips among the b + c discordant cases are Binomial(b + c, 1/2).
- :func:`clopper_pearson`: the exact (Clopper-Pearson) two-sided interval of a binomial
  proportion, e.g. NFR = negative flips / items.

The gate's rule (``flows/gate.py``), from :func:`pair_evidence`
----------------------------------------------------------------
Both checks use the two-sided interval at the gate's ``confidence`` and reject only when
the whole interval lies on the bad side of the threshold, so each check wrongly rejects a
generation that truly meets its threshold with probability at most (1 - confidence) / 2:

- ECC against k: reject when the upper bound of the paired bootstrap interval of
  C[g][k] - C[k][k] (generation-g queries vs generation-k queries, both against the
  k-gallery, the same queries) is below ``-ecc_margin``;
- NFR against k: reject when the lower Clopper-Pearson bound of NFR(g, k) is above
  ``max_nfr`` (the exact one-sided binomial test of NFR <= max_nfr at level
  (1 - confidence) / 2).

The one-sided McNemar p-value "more negative than positive flips" (``flip_p``) is
reported next to NFR as evidence of an accuracy loss on the ancestor's own right answers;
it does not decide.

scipy (a dependency of scikit-learn) gives the binomial and beta distributions.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from workers.measuring.metric_names import Metric

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000
_CHUNK = 2_000_000  # multinomial draws held in memory at once (resamples x categories)


class Interval(NamedTuple):
    """A point estimate with its confidence interval [lo, hi]."""

    estimate: float
    lo: float
    hi: float


class ClassGroupGaps(NamedTuple):
    """C[g][k] - C[k][k] on the classes k trained on and on the others (None: no queries)."""

    seen: float | None
    unseen: float | None
    unseen_queries: int


class PairedCounts(NamedTuple):
    """Paired binary outcomes of a new and an old model on the same n cases."""

    n: int
    gain: int  # new right, old wrong
    loss: int  # new wrong, old right

    @property
    def delta(self) -> float:
        """mean(new right) - mean(old right) = (gain - loss) / n."""
        return (self.gain - self.loss) / self.n

    @property
    def loss_rate(self) -> float:
        """Share of cases the old model got right and the new one wrong (NFR for flips)."""
        return self.loss / self.n


def _check_counts(c: PairedCounts) -> PairedCounts:
    n, gain, loss = int(c.n), int(c.gain), int(c.loss)
    if n < 1:
        raise ValueError(f"need at least one paired case, got n={n}")
    if gain < 0 or loss < 0 or gain + loss > n:
        raise ValueError(f"discordant counts gain={gain}, loss={loss} do not fit n={n}")
    return PairedCounts(n, gain, loss)


def _check_level(confidence: float, resamples: int | None = None) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples is not None and resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return 1.0 - confidence


def _binary(v: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold binary outcomes (0/1 or bool)")
    return arr.astype(bool)


def paired_counts(new_right: np.ndarray, old_right: np.ndarray) -> PairedCounts:
    """Discordant counts of two paired binary outcome vectors (True = right)."""
    new = _binary(new_right, "new_right")
    old = _binary(old_right, "old_right")
    if new.shape != old.shape:
        raise ValueError(f"length mismatch: new has {new.size} outcomes, old has {old.size}")
    return PairedCounts(int(new.size), int((new & ~old).sum()), int((~new & old).sum()))


def _bootstrap(
    values: np.ndarray, counts: np.ndarray, confidence: float, resamples: int, seed: int
) -> Interval:
    """Percentile bootstrap of the mean of a sample given as distinct values with counts."""
    alpha = _check_level(confidence, resamples)
    keep = counts > 0
    values, counts = values[keep].astype(np.float64), counts[keep].astype(np.int64)
    n = int(counts.sum())
    estimate = float(values @ counts / n)
    rng = np.random.default_rng(seed)
    p = counts / n
    means = np.empty(resamples, dtype=np.float64)
    step = max(1, _CHUNK // len(values))
    for start in range(0, resamples, step):
        size = min(step, resamples - start)
        means[start : start + size] = rng.multinomial(n, p, size=size) @ values / n
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return Interval(estimate, float(lo), float(hi))


def paired_bootstrap_ci(
    x: np.ndarray,
    y: np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Paired bootstrap interval of mean(x) - mean(y); x[i], y[i] measured on case i.

    Returns the point estimate and the percentile interval at ``confidence`` from
    ``resamples`` resamples of the n pairs (seeded: the same inputs give the same numbers).
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or xa.size == 0 or xa.shape != ya.shape:
        raise ValueError(
            f"need two non-empty 1-D vectors of one length, got {xa.shape}, {ya.shape}"
        )
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise ValueError("outcomes must be finite")
    values, counts = np.unique(xa - ya, return_counts=True)
    return _bootstrap(values, counts, confidence, resamples, seed)


def paired_bootstrap_ci_counts(
    counts: PairedCounts,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """:func:`paired_bootstrap_ci` of binary outcomes, from their discordant counts alone.

    The differences are -1 (``loss`` times), 0 and +1 (``gain`` times): the same
    categories, in the same order, as :func:`paired_bootstrap_ci` sees, so the same seed
    gives the same interval.
    """
    c = _check_counts(counts)
    values = np.array([-1.0, 0.0, 1.0])
    return _bootstrap(
        values, np.array([c.loss, c.n - c.gain - c.loss, c.gain]), confidence, resamples, seed
    )


Alternative = Literal["two-sided", "greater", "less"]


def mcnemar_exact(b: int, c: int, alternative: Alternative = "two-sided") -> float:
    """Exact McNemar p-value for b discordant pairs of one kind and c of the other.

    Under H0 (both kinds equally likely) b ~ Binomial(b + c, 1/2).
    ``greater``: H1 "b is the more likely kind", p = P(X >= b);
    ``less``: p = P(X <= b); ``two-sided``: min(1, 2 min(P(X <= b), P(X >= b))).
    No discordant pair (b = c = 0) gives p = 1.
    """
    from scipy.stats import binom

    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    upper = float(binom.sf(b - 1, m, 0.5))  # P(X >= b)
    lower = float(binom.cdf(b, m, 0.5))  # P(X <= b)
    if alternative == "greater":
        return upper
    if alternative == "less":
        return lower
    if alternative == "two-sided":
        return min(1.0, 2.0 * min(upper, lower))
    raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")


def clopper_pearson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval of a binomial proportion with k successes in n trials.

    lo solves P(X >= k | p = lo) = alpha/2 (0 when k = 0), hi solves
    P(X <= k | p = hi) = alpha/2 (1 when k = n), alpha = 1 - confidence.
    """
    from scipy.stats import beta

    alpha = _check_level(confidence)
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def pair_evidence(
    queries: PairedCounts | None,
    items: PairedCounts | None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """The gate's evidence for one pair (g, k), as metric values keyed by metric name.

    ``queries``: top-1 retrieval hits of generation-g queries vs generation-k queries,
    both against the k-gallery (gain = only g's query hit). ``items``: classification
    on the evaluation items (loss = negative flips, gain = positive flips).

    Keys: ``ecc_queries``, ``ecc_gain``, ``ecc_loss``, ``ecc_delta`` (C[g][k] - C[k][k]),
    ``ecc_delta_lo``, ``ecc_delta_hi``; ``flip_items``, ``flip_neg``, ``flip_pos``,
    ``nfr_lo``, ``nfr_hi`` (Clopper-Pearson) and ``flip_p`` (one-sided exact McNemar,
    H1: more negative than positive flips). Absent inputs give no keys.
    """
    out: dict[str, float] = {}
    if queries is not None:
        q = _check_counts(queries)
        ci = paired_bootstrap_ci_counts(q, confidence=confidence, resamples=resamples, seed=seed)
        out |= {
            Metric.ECC_QUERIES: q.n,
            Metric.ECC_GAIN: q.gain,
            Metric.ECC_LOSS: q.loss,
            Metric.ECC_DELTA: ci.estimate,
            Metric.ECC_DELTA_LO: ci.lo,
            Metric.ECC_DELTA_HI: ci.hi,
        }
    if items is not None:
        f = _check_counts(items)
        lo, hi = clopper_pearson(f.loss, f.n, confidence)
        out |= {
            Metric.FLIP_ITEMS: f.n,
            Metric.FLIP_NEG: f.loss,
            Metric.FLIP_POS: f.gain,
            Metric.NFR_LO: lo,
            Metric.NFR_HI: hi,
            Metric.FLIP_P: mcnemar_exact(f.loss, f.gain, "greater"),
        }
    return out
