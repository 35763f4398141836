"""Hand-computed cases for the served state per class and the targeted selection."""

from __future__ import annotations

import numpy as np

from workers.measuring.metrics import retrieval_hits
from workers.measuring.served import (
    class_prototypes,
    mixed_reference,
    served_by_class,
    targeted_selection,
)


def test_retrieval_hits_and_mixed_reference_by_hand() -> None:
    # reference items: class 0 at (1, 0), class 1 at (0, 1); a query at (0.9, 0.1) of
    # class 0 finds the first (hit), one at (0.2, 0.8) of class 0 finds the second (miss)
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    hits = retrieval_hits(
        np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]), ref, np.array([0, 1])
    )
    assert hits.tolist() == [True, False]
    # re-embedding the second item (by the candidate, at (1, 1)): only it changes
    mixed = mixed_reference(ref, np.array([[5.0, 5.0], [1.0, 1.0]]), np.array([False, True]))
    assert mixed.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_served_by_class_corrects_for_the_number_of_classes() -> None:
    # 2 classes of 10 queries. Class 0: the new state loses 6 queries the old served
    # (delta -0.6); class 1: one gained, one lost (delta 0). Each class's interval is at
    # 1 - 0.05 / 2 = 97.5%: the paired bootstrap of (-1 x6, 0 x4) gives [-0.9, -0.2] (worse
    # with evidence), of (+1, -1, 0 x8) [-0.3, 0.3] (not)
    y = np.repeat([0, 1], 10)
    old = np.ones(20, bool)
    new = old.copy()
    new[:6] = False  # class 0: 6 losses
    old[10] = False  # class 1: a gain ...
    new[11] = False  # ... and a loss
    got = served_by_class(new, old, y)
    assert [(d.cls, d.queries, d.gain, d.loss) for d in got] == [(0, 10, 0, 6), (1, 10, 1, 1)]
    assert (got[0].delta, got[0].lo, got[0].hi, got[0].worse) == (-0.6, -0.9, -0.2, True)
    assert (got[1].delta, got[1].lo, got[1].hi, got[1].worse) == (0.0, -0.3, 0.3, False)


def test_targeted_selection_by_nearest_prototype() -> None:
    # the old generation's view of 3 classes: reference items along x, y and -x
    ref = np.array([[2.0, 0.0], [1.0, 0.1], [0.0, 3.0], [-1.0, 0.0]])
    protos = class_prototypes(ref, np.array([0, 0, 1, 2]), num_classes=4)
    assert np.allclose(np.linalg.norm(protos[:3], axis=1), 1.0) and not protos[3].any()
    # stored embeddings of its collection items: near x, near y, near -x, and one that
    # would be nearest the empty class 3 row if it counted
    items = np.array([[0.9, 0.2], [0.1, 1.0], [-2.0, 0.1], [0.0, -1.0]])
    assert targeted_selection(items, protos, [1]).tolist() == [False, True, False, False]
    assert targeted_selection(items, protos, [0, 2]).tolist() == [True, False, True, True]
    assert targeted_selection(np.zeros((0, 2)), protos, [0]).shape == (0,)


def _two_class_view(candidate_class1_query: tuple[float, float]):
    """Generation 1 holds 4 reference items (2 a class) and is the champion; 20 queries a
    class. The candidate keeps class 0 where generation 1 put it and moves class 1 from
    (0, 1) to (1, -1)."""
    from workers.measuring.served import ServedView

    ref_y = np.array([0, 0, 1, 1])
    old_ref = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    new_ref = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, -1.0], [1.0, -0.9]])
    query_y = np.repeat([0, 1], 20)
    old_q = np.array([[1.0, 0.05]] * 20 + [[0.05, 1.0]] * 20)
    new_q = np.array([[1.0, 0.05]] * 20 + [list(candidate_class1_query)] * 20)
    return ServedView(query_y, ref_y, old_q, new_q, new_ref, np.ones(4, int), {1: old_ref})


def test_plan_targeted_re_embeds_only_the_class_that_would_regress() -> None:
    from workers.measuring.served import plan_targeted

    # Nothing re-embedded: a class-1 query by the candidate, (1, -1), is nearest (cos 0.71)
    # to the class-0 items (1, 0) and (1, 0.1): all 20 class-1 queries are lost
    # (delta -1, interval [-1, -1]: worse), class 0 keeps its 20 hits.
    view = _two_class_view((1.0, -1.0))
    plain = plan_targeted(view, movable=[1], num_classes=2, greedy=False)
    assert not plain.feasible and [d.cls for d in plain.worse] == [1]
    assert (plain.overall.delta, plain.overall.loss) == (-0.5, 20)
    # The plan: class 1's items as generation 1 places them (its prototypes) are
    # re-embedded by the candidate, at (1, -1) and (1, -0.9): every query is served again.
    plan = plan_targeted(view, movable=[1], num_classes=2)
    assert plan.classes == [1] and plan.replaced.tolist() == [False, False, True, True]
    assert plan.feasible and [(d.cls, d.delta) for d in plan.deltas] == [(0, 0.0), (1, 0.0)]
    assert (plan.regressed, plan.recovered) == (20, 20)
    # a generation that may not move (pinned): nothing can be re-embedded, so no plan
    stuck = plan_targeted(view, movable=[], num_classes=2)
    assert stuck.classes == [] and not stuck.feasible


def test_plan_targeted_rejects_what_no_backfill_can_mend() -> None:
    from workers.measuring.served import plan_targeted

    # The candidate's class-1 query, (1, 0.2), is nearer the class-0 items than its own
    # class's even in its own space: re-embedding class 1, then class 0 too, mends nothing.
    plan = plan_targeted(_two_class_view((1.0, 0.2)), movable=[1], num_classes=2)
    assert plan.classes == [0, 1] and plan.replaced.all()
    assert not plan.feasible and [d.cls for d in plan.worse] == [1]
    assert (plan.regressed, plan.recovered) == (20, 0)


def test_plan_targeted_full_replacement_of_an_owed_generation() -> None:
    from workers.measuring.served import plan_targeted

    plan = plan_targeted(_two_class_view((1.0, -1.0)), [1], 2, greedy=False, replace_gens=[1])
    assert plan.replaced.all() and plan.classes == [] and plan.feasible


def test_collection_selection_from_stored_embeddings() -> None:
    from workers.measuring.served import collection_selection

    # generation 1's prototypes: class 0 along x, class 1 along y
    protos = {1: class_prototypes(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), 2)}
    batches = [
        (np.array([10, 11]), np.array([1, 1]), np.array([[1.0, 0.2], [0.2, 1.0]])),
        # 12 is held by generation 2 (not to move), 13 by generation 1 near y
        (np.array([13, 12]), np.array([1, 2]), np.array([[0.3, 1.0], [0.0, 1.0]])),
    ]
    assert collection_selection(batches, protos, [1]).tolist() == [11, 13]
    assert collection_selection(batches, protos, []).tolist() == []
    assert collection_selection([], protos, [1]).tolist() == []
