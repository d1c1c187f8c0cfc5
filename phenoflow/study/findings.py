"""The MiT paper's design-space findings, checked against a study's numbers (report.json's "findings").

Variants are matched by their `config` tag (A-E, the paper's letters) and architecture (model.arch: mit, unet =
ADM); interpolants by flow.path among noise -> data variants. FD and KD are the first feature set's, at each
variant's best guidance strength, mean over seeds. Thresholds: "no gain" = FD not lower by more than 5%;
"close" = FD within 10%; "equal compute" = training ExaFLOPs within 10%.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

NOT_MEASURED = "not measured in this study"


def _val(row: dict[str, Any], metric: str) -> float:
    return row["best"][metric][0] if row.get("best") else math.nan


def _tagged(data: dict[str, Any], config: str) -> dict[str, dict[str, Any]]:
    return {r["arch"]: r for r in data["variants"] if r.get("config") == config and r.get("best") and "arch" in r}


def _arch(a: str) -> str:
    return {"unet": "ADM", "mit": "MiT"}.get(a, a)


def _holds(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def findings(data: dict[str, Any]) -> list[dict[str, str]]:
    if len(data.get("metrics", [])) < 2:
        return [{"finding": "all findings", "verdict": NOT_MEASURED + " (no evaluated variant)"}]
    fd, kd = data["metrics"][0], data["metrics"][1]
    A, B, C, D, E = (_tagged(data, c) for c in "ABCDE")
    out = []

    def pairwise(title: str, first: dict, second: dict, judge, describe) -> None:
        parts = []
        for arch in sorted(set(first) & set(second)):
            x, y = first[arch], second[arch]
            parts.append(f"{_arch(arch)}: {_holds(judge(x, y))} ({describe(x, y)})")
        out.append({"finding": title, "verdict": "; ".join(parts) if parts else NOT_MEASURED})

    pairwise("noise -> data (B) beats control -> perturbed (A)", B, A, lambda b, a: _val(b, fd) < _val(a, fd),
             lambda b, a: f"{fd} B {_val(b, fd):.3g} vs A {_val(a, fd):.3g}")
    pairwise("counterfactual sampling (C) is worse on FD than generation (B) but lower on KD", C, B,
             lambda c, b: _val(c, fd) > _val(b, fd) and _val(c, kd) < _val(b, kd),
             lambda c, b: f"{fd} C {_val(c, fd):.3g} vs B {_val(b, fd):.3g}, {kd} C {_val(c, kd):.3g} vs "
                          f"B {_val(b, kd):.3g}")
    parts = []
    for arch in sorted(set(D) & set(B)):
        d, b = _val(D[arch], fd), _val(B[arch], fd)
        txt = f"D {d:.3g} vs B {b:.3g}"
        ok = not d < 0.95 * b
        if arch in E and arch in C:
            e, c = _val(E[arch], fd), _val(C[arch], fd)
            txt += f", E {e:.3g} vs C {c:.3g}"
            ok = ok and not e < 0.95 * c
        parts.append(f"{_arch(arch)}: {_holds(ok)} ({fd} {txt})")
    out.append({"finding": "OT couplings (D, E) give no gain (FD not >5% lower)",
                "verdict": "; ".join(parts) if parts else NOT_MEASURED})
    out.append({"finding": "VP is close to linear (FD within 10%); the Brownian bridge is worse, increasingly "
                           "with sigma", "verdict": _interpolants(data, fd)})
    out.append({"finding": "the MiT beats the ADM", "verdict": _mit_vs_adm(data, fd)})
    return out


def _interpolants(data: dict[str, Any], fd: str) -> str:
    rows = [r for r in data["variants"] if r.get("best") and r.get("eval_mode") == "generate"
            and r.get("coupling") == "independent"]
    lin = [r for r in rows if r["path"] == "linear"]
    vp = [r for r in rows if r["path"] == "vp"]
    br = sorted((r for r in rows if r["path"] == "bridge"), key=lambda r: r["bridge_sigma"])
    if not lin or not (vp or br):
        return NOT_MEASURED
    base = _val(lin[0], fd)
    parts = []
    if vp:
        v = _val(vp[0], fd)
        parts.append(f"VP {_holds(abs(v - base) <= 0.1 * base)} close ({fd} VP {v:.3g} vs linear {base:.3g})")
    if br:
        vals = [_val(r, fd) for r in br]
        worse = all(x > base for x in vals)
        rising = all(b > a for a, b in itertools.pairwise(vals))
        desc = ", ".join(f"sigma={r['bridge_sigma']:g}: {x:.3g}" for r, x in zip(br, vals))
        parts.append(f"bridge worse than linear: {_holds(worse)}; increasingly with sigma: "
                     f"{_holds(rising) if len(br) > 1 else NOT_MEASURED} ({desc}; linear {base:.3g})")
    return "; ".join(parts)


def _mit_vs_adm(data: dict[str, Any], fd: str) -> str:
    b = [r for r in data["variants"] if r.get("config") == "B" and r.get("best")]
    mit = [r for r in b if r["arch"] == "mit"]
    adm = [r for r in b if r["arch"] == "unet"]
    if not mit or not adm:
        return NOT_MEASURED + " (needs evaluated Config B variants of both the MiT and the ADM U-Net)"
    m, a = mit[0], adm[0]
    parts = [(f"at each's budget: {_holds(_val(m, fd) < _val(a, fd))} ({fd} MiT {_val(m, fd):.3g} at "
             f"{m['exaflops'] or 0:.3g} EF vs ADM {_val(a, fd):.3g} at {a['exaflops'] or 0:.3g} EF)")]
    pairs = [(x, y) for x in mit for y in adm if x["exaflops"] and y["exaflops"]
             and abs(x["exaflops"] - y["exaflops"]) <= 0.1 * max(x["exaflops"], y["exaflops"])]
    if pairs:
        x, y = pairs[0]
        parts.append(f"at equal compute: {_holds(_val(x, fd) < _val(y, fd))} ({x['name']} {_val(x, fd):.3g} vs "
                     f"{y['name']} {_val(y, fd):.3g}, {x['exaflops']:.3g} vs {y['exaflops']:.3g} EF)")
    else:
        parts.append("at equal compute: " + NOT_MEASURED + " (no MiT/ADM Config B pair within 10% compute)")
    return "; ".join(parts)
