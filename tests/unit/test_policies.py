"""Backfill policies on a hand-made gallery: each order computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from workers.collection.policies import (
    POLICIES,
    backfill_order,
    budget_items,
    generations_first,
    item_hash,
    strata_of,
    tails_first,
)

# item:        10   11   12   13   14   15   16   17
GEN = np.array([1, 2, 3, 1, 2, 1, 3, 2])
MARGIN = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.3, 0.2, 0.05])
IDS = np.arange(10, 18)
TARGET = 3  # items 12 and 16 are already embedded by the champion
STALE = {10, 11, 13, 14, 15, 17}
STRATA = np.array([0, 0, -1, 1, 1, 0, -1, 0])


def order(policy: str, seed: int = 0, perm: np.ndarray | None = None) -> list[int]:
    p = np.arange(len(IDS)) if perm is None else perm
    return backfill_order(
        IDS[p], GEN[p], MARGIN[p], TARGET, policy, seed, strata=STRATA[p]
    ).tolist()


def test_oldest_first_takes_the_oldest_generation_first_then_the_seeded_hash() -> None:
    def by_hash(ids: list[int], seed: int) -> list[int]:
        return sorted(ids, key=lambda i: int(item_hash(np.array([i]), seed)[0]))

    for seed in (0, 1):
        expected = by_hash([10, 13, 15], seed) + by_hash([11, 14, 17], seed)
        assert order("oldest-first", seed=seed) == expected


def test_uncertainty_takes_the_smallest_margin_first_ties_by_item_id() -> None:
    assert order("uncertainty") == [17, 11, 13, 15, 10, 14]


def test_representative_advances_strata_at_equal_rates_most_certain_first() -> None:
    # stratum 0: 10 (.5), 15 (.3), 11 (.1), 17 (.05) -> rank fractions 1/8, 3/8, 5/8, 7/8
    # stratum 1: 14 (.7), 13 (.3)                   -> rank fractions 1/4, 3/4
    assert order("representative") == [10, 14, 15, 11, 13, 17]


def test_representative_needs_strata() -> None:
    with pytest.raises(ValueError, match="strata"):
        backfill_order(IDS, GEN, MARGIN, TARGET, "representative")


def test_random_is_a_seeded_permutation_of_the_stale_items() -> None:
    first = order("random", seed=0)
    assert sorted(first) == sorted(STALE)
    assert order("random", seed=0) == first
    assert len({tuple(order("random", seed=s)) for s in range(6)}) > 1
    # it is the hash order: independent of how the gallery happens to be read
    expected = sorted(STALE, key=lambda i: int(item_hash(np.array([i]), 0)[0]))
    assert first == expected


@pytest.mark.parametrize("policy", POLICIES)
def test_every_order_is_independent_of_the_row_order(policy: str) -> None:
    perm = np.random.default_rng(3).permutation(len(IDS))
    assert order(policy, perm=perm) == order(policy)
    assert set(order(policy)) == STALE  # fresh items never come back


def test_nothing_stale_gives_an_empty_order() -> None:
    for policy in POLICIES:
        got = backfill_order(IDS, np.full(8, TARGET), MARGIN, TARGET, policy, strata=STRATA)
        assert got.tolist() == []


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backfill policy 'newest'"):
        backfill_order(IDS, GEN, MARGIN, TARGET, "newest")


def test_strata_of_separates_two_clear_modes() -> None:
    rng = np.random.default_rng(0)
    a = np.eye(4)[0] + 0.05 * rng.normal(size=(12, 4))
    b = np.eye(4)[1] + 0.05 * rng.normal(size=(12, 4))
    emb = np.concatenate([a, b]).astype(np.float32)
    gen = np.array([1] * 23 + [TARGET])
    strata = strata_of(emb, gen, TARGET, k=2, seed=0)
    assert strata[-1] == -1  # the fresh row is not stratified
    assert len(set(strata[:12])) == 1 and len(set(strata[12:23])) == 1
    assert strata[0] != strata[12]


@pytest.mark.parametrize(
    ("budget", "n", "expected"),
    [(0.0, 10, 0), (0.25, 10, 2), (0.3, 10, 3), (1.0, 10, 10), (4, 10, 4), (40, 10, 10)],
)
def test_budget_is_a_fraction_up_to_one_then_a_count(budget, n, expected) -> None:
    assert budget_items(budget, n) == expected


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        budget_items(-0.1, 10)


def test_tails_first_moves_small_generations_to_the_front_stably() -> None:
    gens = np.array([5, 7, 5, 9, 7, 5, 7])  # 5: 3 rows, 7: 3 rows, 9: 1 row
    assert tails_first(gens, 1).tolist() == [3, 0, 1, 2, 4, 5, 6]
    assert tails_first(gens, 3).tolist() == list(range(7))  # every generation is small
    assert tails_first(gens, 0).tolist() == list(range(7))


def test_retire_below_backfills_a_generations_last_items_first() -> None:
    # stale: generation 1 holds 10, 13, 15; generation 2 holds 11, 14, 17 (3 each)
    base = order("uncertainty")  # [17, 11, 13, 15, 10, 14]
    assert backfill_order(IDS, GEN, MARGIN, TARGET, "uncertainty", retire_below=2).tolist() == (
        base
    )
    gen = GEN.copy()
    gen[[1, 4]] = 1  # generation 2 keeps only item 17 -> it goes first
    got = backfill_order(IDS, gen, MARGIN, TARGET, "uncertainty", retire_below=2).tolist()
    assert got[0] == 17
    assert got[1:] == [
        i for i in backfill_order(IDS, gen, MARGIN, TARGET, "uncertainty").tolist() if i != 17
    ]


def test_complete_generations_go_first_in_policy_order() -> None:
    # uncertainty order: [17, 11, 13, 15, 10, 14]; generation 1 holds 10, 13, 15
    assert generations_first(np.array([2, 2, 1, 1, 1, 2]), [1]).tolist() == [2, 3, 4, 0, 1, 5]
    got = backfill_order(IDS, GEN, MARGIN, TARGET, "uncertainty", complete=[1]).tolist()
    assert got == [13, 15, 10, 17, 11, 14]
    # with tails first as well, the generations to complete still lead
    gen = GEN.copy()
    gen[[1, 4]] = 1  # generation 2 keeps only item 17, a tail of 1 item
    got = backfill_order(IDS, gen, MARGIN, TARGET, "uncertainty", retire_below=1, complete=[1])
    assert got.tolist() == [11, 13, 15, 10, 14, 17]


def test_a_targeted_debt_goes_before_everything_in_policy_order() -> None:
    # uncertainty order: [17, 11, 13, 15, 10, 14]; the debt holds 10, 14 and 12 (12 is
    # already the champion's: not stale, so not in the order at all)
    debt = np.array([10, 12, 14])
    got = backfill_order(IDS, GEN, MARGIN, TARGET, "uncertainty", first_items=debt).tolist()
    assert got == [10, 14, 17, 11, 13, 15]
    # before generations to complete as well (13, 15, 10 of generation 1)
    got = backfill_order(
        IDS, GEN, MARGIN, TARGET, "uncertainty", complete=[1], first_items=debt
    ).tolist()
    assert got == [10, 14, 13, 15, 17, 11]
