"""The lineage on a real PostgreSQL 15 server that the test starts (127.0.0.1 only) and stops."""

from __future__ import annotations

from flows.report import build_report
from store.lineage import Lineage


def test_lineage_on_postgres(pg_url: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GRACEFUL_DB_URL", pg_url)
    lin = Lineage()
    assert lin.url == pg_url
    base = dict(dataset="digits", stage=0, architecture={"kind": "mlp", "width": 8}, embed_dim=4)
    g1 = lin.add_generation(**base, status="trained", classes=[0, 1])
    lin.promote(g1.id)
    g2 = lin.start_generation([(g1.id, "influence", 1.0)], **base, status="trained")
    lin.record_metrics(
        [
            (g2.id, g1.id, "nfr", 0.1),
            (g1.id, g1.id, "compat_top1", 0.8),
            (g2.id, g1.id, "compat_top1", 0.85),
            (g2.id, g2.id, "compat_top1", 0.9),
        ]
    )
    lin.record_metrics([(g2.id, g1.id, "nfr", 0.05)])  # upsert, not a second row
    lin.promote(g2.id)
    lin.retire(g1.id, "backfilled away")

    rep = build_report(Lineage(pg_url))
    assert rep["champion"] == g2.id
    assert rep["nfr"] == [[g2.id, g1.id, 0.05]]
    assert rep["ac"] == 1.0
    assert rep["generations"][0]["architecture"] == {"kind": "mlp", "width": 8}
    assert rep["generations"][1]["constraints"][0]["status"] == "retired"
    # nothing was written to SQLite under the home
    assert not (tmp_path / "home" / "lineage.db").exists()
