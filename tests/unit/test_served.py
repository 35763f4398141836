"""Hand-computed cases for the served state per class and the targeted selection."""

from __future__ import annotations

import numpy as np

from workers.served import (
    class_prototypes,
    mixed_reference,
    served_by_class,
    targeted_selection,
    top1_hits,
)


def test_top1_hits_and_mixed_reference_by_hand() -> None:
    # reference items: class 0 at (1, 0), class 1 at (0, 1); a query at (0.9, 0.1) of
    # class 0 finds the first (hit), one at (0.2, 0.8) of class 0 finds the second (miss)
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    hits = top1_hits(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]), ref, np.array([0, 1]))
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
