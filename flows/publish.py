"""Prefect artifacts for the UI: matrices as tables, a markdown summary with plots."""

from __future__ import annotations

import base64

from flows import text
from flows.naming import artifact_key, lineage_label, safe_spec
from flows.plots import curves, heatmap
from flows.report import build_report
from store.lineage import Lineage
from store.settings import subdir


def matrix_rows(pairs: list[list[float]], ids: list[int]) -> list[dict[str, str]]:
    """A square table (rows a, columns b) for a Prefect table artifact, the row label first.

    The UI lays the columns out in its JavaScript objects' key order, which puts keys
    that read as integers ("1", "2") before all others: the columns are named ``b=1``,
    ``b=2``, ..., so the row label ``a \\ b`` stays the first column.
    """
    value = {(int(a), int(b)): v for a, b, v in pairs}
    return [
        {"a \\ b": str(a)}
        | {f"b={b}": (f"{value[(a, b)]:.4f}" if (a, b) in value else "") for b in ids}
        for a in ids
    ]


def _markdown(kind: str, label: str, lines: list[str], description: str) -> None:
    """A markdown artifact of this lineage, keyed ``<kind>-<label>``."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(kind, label), description=description
    )


def _img(path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{path.stem}](data:image/png;base64,{data})"


def publish_cycle(
    lineage: Lineage,
    gen_id: int,
    backfill: dict | None = None,
    retired: list | None = None,
) -> dict:
    """Write plots under GRACEFUL_HOME/reports and create the cycle's artifacts (keyed by
    this lineage: :func:`flows.naming.artifact_key`); ``backfill`` and ``retired`` are
    what this cycle's backfill and retire steps did."""
    from prefect.artifacts import create_table_artifact

    label = lineage_label()
    rep = build_report(lineage)
    ids = [g["id"] for g in rep["generations"] if g["accuracy"] is not None]
    out = subdir("reports")
    plots = []
    for metric, title, key, cmap in (
        ("nfr", "NFR(a, b)", "nfr-matrix", "magma"),
        ("compat_top1", "C[a][b] top-1", "compat-matrix", "viridis"),
    ):
        if rep[metric]:
            plots.append(heatmap(rep[metric], title, out / f"{metric}.png", cmap=cmap))
            create_table_artifact(
                matrix_rows(rep[metric], ids),
                key=artifact_key(key, label),
                description=f"{title} after generation {gen_id}",
            )
    jobs = [j for j in rep["backfills"] if j["curve"]]
    if jobs:
        series = {f"job {j['job_id']} ({j['policy']})": j["curve"] for j in jobs[-3:]}
        plots.append(curves(series, "Backfill curves", out / "backfill_curves.png"))
    gen = next(g for g in rep["generations"] if g["id"] == gen_id)
    champion = rep["champion"] if rep["champion"] is not None else "none"
    collection = rep["gallery"]
    lines = [
        f"# Generation {gen_id}: {gen['status']}",
        "",
        f"accuracy **{text.num(gen['accuracy'])}** · champion **{champion}** · "
        f"AC **{text.num(rep['ac'])}** · AM **{text.num(rep['am'])}** · "
        f"M_mix **{text.num(rep['m_mix'])}**",
        "",
        "## Gate",
        *[f"- {r}" for r in gen["gate_reasons"]],
        "",
        *_gate_table(gen.get("gate")),
        *_served_table(gen.get("gate")),
        *_snapshot_lines(gen.get("snapshot")),
        "## Constraints",
        *[
            f"- {c['kind']} → {c['target']} (weight {c['weight']:g}, {c['status']})"
            for c in gen["constraints"]
        ],
        *([] if gen["constraints"] else ["- none (a first generation)"]),
        "",
        "## Collection",
        f"- {collection['items']:,} items: {text.by_generation(collection['by_generation'])}",
        f"- this cycle's backfill: {text.cycle_backfill(backfill)}",
        f"- retired from the constraint chain: {text.retired(retired)}",
        "",
        f"Lineage `{label}`.",
        "",
        *[_img(p) for p in plots],
    ]
    _markdown("cycle-summary", label, lines, f"generation {gen_id}: {gen['status']}")
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
            f"{text.num(a['nfr'])} | {_ci(*a['nfr_ci'], fmt='.4f')} | {flips} | {p} |"
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
    classes = ", ".join(f"{name}: {n}" for name, n in snap["classes"].items())
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
    label = lineage_label()
    rep = build_report(lineage)
    job = next(j for j in rep["backfills"] if j["job_id"] == result["job"])
    what = f"job {job['job_id']}: {job['policy']}, budget {job['budget']:g}"
    lines = [
        f"# Backfill {what}",
        "",
        f"items **{job['items_done']:,}**/{job['items_total']:,} re-embedded by generation "
        f"{result['generation']} · M_mix {text.num(job['m_mix_before'])} → "
        f"{text.num(job['m_mix_after'])} · area {text.num(job['area'])} · "
        f"no regret {text.yes_no(job['no_regret'])}",
        "",
        f"- curve: {text.curve(job['curve'])}",
        f"- collection before: {text.by_generation(result.get('by_generation_before'))}",
        f"- collection after: {text.by_generation(rep['gallery']['by_generation'])}",
        f"- retired from the constraint chain: {text.retired(result['retired'])}",
        "",
        f"Lineage `{label}`.",
    ]
    if job["curve"]:
        path = curves(
            {job["policy"]: job["curve"]}, "Backfill curve", subdir("reports") / "backfill.png"
        )
        lines += ["", _img(path)]
    _markdown("backfill-summary", label, lines, f"backfill {what}")


def publish_skip(message: str) -> None:
    """The summary of a cycle that had nothing new to train on."""
    label = lineage_label()
    summary = (
        f"# Update cycle\n\n**{message}**: the training data's snapshot equals the one that "
        "generation trained on, so no generation was trained. Add data, or run with "
        f"`force`.\n\nLineage `{label}`."
    )
    _markdown("cycle-summary", label, [summary], message)


def publish_index(result: dict) -> None:
    """The index run's summary: what was added, re-embedded, pruned, skipped."""
    label = lineage_label()
    spec = safe_spec(result["spec"])
    lines = [
        f"# Indexed {spec} with generation {result['generation']}",
        "",
        "| added | re-embedded | pruned | unchanged | skipped (unreadable) | items |",
        "|---|---|---|---|---|---|",
        f"| {result['added']} | {result['reembedded']} | {result['pruned']} | "
        f"{result['unchanged']} | {result['skipped']} | {result['items']} |",
        "",
        f"- collection: {text.by_generation(result['by_generation'])}",
        f"- search index: {text.search_index(result.get('index'))}",
    ]
    for item in result["skipped_items"]:
        lines.append(f"- skipped `{item['key']}`: {item['reason']}")
    lines += ["", f"Lineage `{label}`."]
    _markdown("index-summary", label, lines, f"index {spec}")
