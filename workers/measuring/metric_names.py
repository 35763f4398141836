"""The names of the metric rows a lineage stores, (a, b, name, value): one place, one enum.

A ``StrEnum``: a member is its stored string (``Metric.ACCURACY == "accuracy"``), so rows
written before the enum read back unchanged. Definitions: DESIGN.md and workers.measuring.metrics.
"""

from __future__ import annotations

from enum import StrEnum


class Metric(StrEnum):
    """Every metric row name, grouped by who writes it."""

    # evaluation (workers.measuring.evaluate): the contract's metrics
    ACCURACY = "accuracy"  # (g, g)
    COMPAT_TOP1 = "compat_top1"  # C[a][b], top-1
    COMPAT_MAP100 = "compat_map100"  # C[a][b], mAP@100
    ECC = "ecc"  # 1.0 when C[g][k] > C[k][k]
    UPDATE_GAIN = "update_gain"
    NFR = "nfr"
    PFR = "pfr"
    NFI = "nfi"
    BTC = "btc"
    BEC = "bec"
    NFR_ANY = "nfr_any"  # (g, g): against every active ancestor
    # the gate's paired evidence per (g, k) (workers.measuring.stats.pair_evidence)
    ECC_QUERIES = "ecc_queries"
    ECC_GAIN = "ecc_gain"
    ECC_LOSS = "ecc_loss"
    ECC_DELTA = "ecc_delta"  # C[g][k] - C[k][k]
    ECC_DELTA_LO = "ecc_delta_lo"
    ECC_DELTA_HI = "ecc_delta_hi"
    FLIP_ITEMS = "flip_items"
    FLIP_NEG = "flip_neg"
    FLIP_POS = "flip_pos"
    NFR_LO = "nfr_lo"
    NFR_HI = "nfr_hi"
    FLIP_P = "flip_p"  # one-sided exact McNemar
    ECC_GAP_SEEN = "ecc_gap_seen"  # the gap on queries of classes k trained on
    ECC_GAP_UNSEEN = "ecc_gap_unseen"  # ... and on the others
    ECC_UNSEEN_QUERIES = "ecc_unseen_queries"
    # the gate's own level and thresholds (g, g)
    EVIDENCE_CONFIDENCE = "evidence_confidence"
    GATE_ECC_MARGIN = "gate_ecc_margin"
    GATE_MAX_NFR = "gate_max_nfr"
    # the served state the gate judged (g, g) (flows.targeted)
    SERVED_DELTA = "served_delta"
    SERVED_DELTA_LO = "served_delta_lo"
    SERVED_DELTA_HI = "served_delta_hi"
    SERVED_WORSE_CLASSES = "served_worse_classes"
    SERVED_REGRESSED = "served_regressed"
    SERVED_RECOVERED = "served_recovered"
    DEBT_ITEMS = "debt_items"  # items a promotion owes (store.debts)
    DEBT_SHARE = "debt_share"
    BACKFILL_OWED = "backfill_owed"  # (g, k, 1.0): g owes k a full backfill
    # the collection (g, g): the scenario's mixed-gallery retrieval
    M_MIX = "m_mix"
