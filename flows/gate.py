"""The promotion gate: a pure decision with its reasons."""

from __future__ import annotations

from flows.config import GateConfig


def decide(
    accuracy: float,
    champion_accuracy: float | None,
    compat: dict[int, tuple[float, float]],
    nfr: dict[int, float],
    cfg: GateConfig,
) -> tuple[bool, list[str]]:
    """Promote only if every threshold holds.

    ``compat[k] = (C[g][k], C[k][k])`` and ``nfr[k] = NFR(g, k)`` for each active ancestor k.
    """
    if not cfg.enabled:
        return True, ["gate disabled: promoted without checks"]
    reasons: list[str] = []
    ok = True
    if champion_accuracy is None:
        reasons.append("first generation: nothing to compare against")
    else:
        tol = cfg.accuracy_tolerance
        if accuracy + 1e-12 >= champion_accuracy - tol:
            reasons.append(f"accuracy {accuracy:.4f} >= champion {champion_accuracy:.4f} - {tol}")
        else:
            ok = False
            reasons.append(
                f"FAIL accuracy {accuracy:.4f} < champion {champion_accuracy:.4f} - {tol}"
            )
    for k, (c_gk, c_kk) in sorted(compat.items()):
        if not cfg.require_ecc:
            break
        if c_gk > c_kk:
            reasons.append(f"compatible with {k}: C[g][{k}]={c_gk:.4f} > C[{k}][{k}]={c_kk:.4f}")
        else:
            ok = False
            reasons.append(
                f"FAIL not compatible with {k}: C[g][{k}]={c_gk:.4f} <= C[{k}][{k}]={c_kk:.4f}"
            )
    for k, value in sorted(nfr.items()):
        if value <= cfg.max_nfr:
            reasons.append(f"NFR against {k} = {value:.4f} <= {cfg.max_nfr}")
        else:
            ok = False
            reasons.append(f"FAIL NFR against {k} = {value:.4f} > {cfg.max_nfr}")
    return ok, reasons
