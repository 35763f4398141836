"""Prefect artifacts for the UI: matrices as tables, a markdown summary with plots."""

from __future__ import annotations

import base64

from flows.plots import curves, heatmap
from flows.report import build_report
from store.lineage import Lineage
from store.settings import subdir


def matrix_rows(pairs: list[list[float]], ids: list[int]) -> list[dict[str, str]]:
    """A square table (rows a, columns b) for a Prefect table artifact."""
    value = {(int(a), int(b)): v for a, b, v in pairs}
    return [
        {"a \\ b": str(a)}
        | {str(b): (f"{value[(a, b)]:.4f}" if (a, b) in value else "") for b in ids}
        for a in ids
    ]


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _img(path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{path.stem}](data:image/png;base64,{data})"


def publish_cycle(lineage: Lineage, gen_id: int) -> dict:
    """Write plots under GRACEFUL_HOME/reports and create the cycle's artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rep = build_report(lineage)
    ids = [g["id"] for g in rep["generations"] if g["accuracy"] is not None]
    out = subdir("reports")
    plots = []
    if rep["nfr"]:
        plots.append(heatmap(rep["nfr"], "NFR(a, b)", out / "nfr.png", cmap="magma"))
        create_table_artifact(
            matrix_rows(rep["nfr"], ids), key="nfr-matrix", description="NFR(a, b)"
        )
    if rep["compat_top1"]:
        plots.append(heatmap(rep["compat_top1"], "C[a][b] top-1", out / "compat_top1.png"))
        create_table_artifact(
            matrix_rows(rep["compat_top1"], ids), key="compat-matrix", description="C[a][b] top-1"
        )
    jobs = [j for j in rep["backfills"] if j["curve"]]
    if jobs:
        series = {f"job {j['job_id']} ({j['policy']})": j["curve"] for j in jobs[-3:]}
        plots.append(curves(series, "Backfill curves", out / "backfill_curves.png"))
    gen = next(g for g in rep["generations"] if g["id"] == gen_id)
    lines = [
        f"# Generation {gen_id}: {gen['status']}",
        "",
        f"accuracy **{gen['accuracy']:.4f}** · champion **{rep['champion']}** · "
        f"AC **{_num(rep['ac'])}** · AM **{_num(rep['am'])}** · M_mix **{_num(rep['m_mix'])}**",
        "",
        "## Gate",
        *[f"- {r}" for r in gen["gate_reasons"]],
        "",
        *_gate_table(gen.get("gate")),
        *_served_table(gen.get("gate")),
        *_snapshot_lines(gen.get("snapshot")),
        "## Constraints",
        *[
            f"- {c['kind']} → {c['target']} (w={c['weight']}, {c['status']})"
            for c in gen["constraints"]
        ],
        "",
        f"Gallery: {rep['gallery']}",
        "",
        *[_img(p) for p in plots],
    ]
    create_markdown_artifact(
        "\n".join(lines), key="cycle-summary", description=f"generation {gen_id}"
    )
    return rep


def _ci(lo: float | None, hi: float | None, fmt: str = "+.4f") -> str:
    return "–" if lo is None or hi is None else f"[{lo:{fmt}}, {hi:{fmt}}]"


def _groups(g: dict | None) -> str:
    """The ECC gap on the classes k trained on / on the others ("–" where none)."""
    if not g or g.get("seen") is None:
        return "–"
    unseen = "–" if g.get("unseen") is None else f"{g['unseen']:+.4f} ({g['unseen_queries']} q)"
    return f"{g['seen']:+.4f} / {unseen}"


def _served_table(gate: dict | None) -> list[str]:
    """The served state per class the gate judged (after the cycle's backfill minus now)."""
    if not gate or not gate.get("served"):
        return []
    outcome = gate.get("outcome") or "–"
    debt = gate.get("targeted_backfill") or {}
    lines = [
        f"## Served search per class ({outcome})",
        "",
        f"Targeted backfill: {debt.get('items', 0)} items ({debt.get('share', 0.0):.1%} of "
        "the collection).",
        "",
        "| class | queries | delta | CI (Bonferroni) | worse |",
        "|---|---|---|---|---|",
    ]
    for row in gate["served"]:
        lo, hi = row["ci"]
        worse = "**yes**" if hi is not None and hi < 0 else "no"
        lines.append(
            f"| {row['class']} | {row.get('queries', '–')} | {row['delta']:+.4f} | "
            f"{_ci(lo, hi)} | {worse} |"
        )
    return lines + [""]


def _gate_table(gate: dict | None) -> list[str]:
    """The gate's paired evidence per ancestor as a markdown table (intervals included)."""
    if not gate or not gate["ancestors"]:
        return []
    level = f"{100 * gate['confidence']:g}% CI" if gate.get("confidence") else "CI"
    margin, max_nfr = gate.get("ecc_margin"), gate.get("max_nfr")
    lines = [
        f"| k | C[g][k] − C[k][k] | {level} | queries | on classes k trained on / never saw "
        f"| NFR | {level} | neg / pos flips | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in gate["ancestors"]:
        flips = (
            f"{a['negative_flips']} / {a['positive_flips']} of {a['items']}"
            if a["items"] is not None
            else "–"
        )
        p = "–" if a["p"] is None else f"{a['p']:.3g}"
        delta = "–" if a["ecc_delta"] is None else f"{a['ecc_delta']:+.4f}"
        lines.append(
            f"| {a['k']} | {delta} | {_ci(*a['ci'])} | {a['queries'] or '–'} | "
            f"{_groups(a.get('ecc_gap_by_class'))} | "
            f"{_num(a['nfr'])} | {_ci(*a['nfr_ci'], fmt='.4f')} | {flips} | {p} |"
        )
    rule = []
    if margin is not None:
        rule.append(f"ECC fails when the interval's upper bound is below {0.0 - margin:+.4f}")
    if max_nfr is not None:
        rule.append(f"NFR fails when its lower bound is above {max_nfr}")
    return lines + ([""] + ["; ".join(rule) + "."] if rule else []) + [""]


def _snapshot_lines(snap: dict | None) -> list[str]:
    if not snap:
        return []
    classes = ", ".join(f"{name} {n}" for name, n in snap["classes"].items())
    lines = [
        "## Snapshot",
        f"- source `{snap['source']}`: **{snap['items']}** items ({classes})",
        f"- fingerprint `{snap['fingerprint'][:16]}`",
    ]
    if snap.get("skipped"):
        lines.append(f"- **{snap['skipped']} unreadable item(s) skipped** (keys in the lineage)")
    return lines + [""]


def publish_backfill(lineage: Lineage, result: dict) -> None:
    """A markdown artifact with the job's numbers and the backfill curve."""
    from prefect.artifacts import create_markdown_artifact

    rep = build_report(lineage)
    job = next(j for j in rep["backfills"] if j["job_id"] == result["job"])
    lines = [
        f"# Backfill job {job['job_id']}: {job['policy']}, budget {job['budget']}",
        "",
        f"items {job['items_done']}/{job['items_total']} · M_mix {_num(job['m_mix_before'])} → "
        f"{_num(job['m_mix_after'])} · area {_num(job['area'])} · no regret {job['no_regret']}",
        "",
        f"Gallery by generation: {rep['gallery']['by_generation']}",
        f"Retired: {result['retired']}",
    ]
    if job["curve"]:
        path = curves(
            {job["policy"]: job["curve"]}, "Backfill curve", subdir("reports") / "backfill.png"
        )
        lines += ["", _img(path)]
    create_markdown_artifact(
        "\n".join(lines), key="backfill-summary", description="partial backfill"
    )


def publish_skip(message: str) -> None:
    """The summary of a cycle that had nothing new to train on."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="cycle-summary",
        markdown=f"# Update cycle\n\n**{message}**: the training data's snapshot equals the "
        "champion's, so no generation was trained. Add data, or run with `force`.",
        description=message,
    )
