"""The synthetic generator's documented effects, measured on real and on generated images (for the report).

`phenoflow.data.synthetic` documents one primary effect per perturbation (nucleus size, elongation, cytoplasm
size, intensity of one channel, texture; up or down). Each is measured with a weight-free morphology feature
(`phenoflow.eval.morphology`) as the ratio of the feature's mean over the perturbation's images to its mean over
the control images of the same set (real perturbed / real control, generated perturbed / generated control):

    nucleus_size    nuc_mean_size            mean nucleus area (pixels; radius x f gives area ~ x f^2)
    elongation      nuc_eccentricity         mean nucleus eccentricity (aspect ratio up -> eccentricity up)
    cytoplasm_size  ch1_mean                 mean intensity of channel 1 (ER / tubulin: stains the cytoplasm)
    intensity       ch{c}_mean               mean intensity of the target channel c
    texture         ch*_grad_energy/ch*_mean mean squared gradient over mean intensity, averaged over channels
                                             (the plain gradient energy follows intensity changes as well)

The model reproduces an effect when the generated ratio changes in the documented direction and its log is
within TOLERANCE of the real one's: |ln g - ln r| <= TOLERANCE |ln r|. An effect the real images do not show
in the documented direction with this feature is reported as not measurable.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from phenoflow.eval.morphology import morphology_features

TOLERANCE = 0.5  # relative tolerance on the log-ratio (generated against real)

FEATURE_OF = {
    "nucleus_size": ("nuc_mean_size", "mean nucleus area"),
    "elongation": ("nuc_eccentricity", "mean nucleus eccentricity"),
    "cytoplasm_size": ("ch1_mean", "mean intensity of channel 1 (cytoplasm stain)"),
    "intensity": ("ch{c}_mean", "mean intensity of {name}"),
    "texture": ("grad_energy", "mean squared gradient / mean intensity, over channels"),
}
# Morphology means shown per perturbation (feature, column title).
MEANS = (("nuc_mean_size", "nucleus area (px)"), ("nuc_eccentricity", "eccentricity"), ("nuc_count", "nuclei"),
         ("ch0_mean", "ch0 mean"))


def documented_effects(manifest: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """[{perturbation, kind, direction, factor, target_channel, channel_name}] of a synthetic data set (k >= 1), or
    None when the data are not synthetic (no documented effects)."""
    from phenoflow.data.synthetic import _DOWN, _UP, SyntheticSpec, describe_effects

    src = manifest.get("source") or {}
    if src.get("kind") != "synthetic" or "spec" not in src:
        return None
    spec = SyntheticSpec(**src["spec"])
    d = describe_effects(spec)
    out = []
    for name, r in d["perturbations"].items():
        if r["direction"] == 0:
            continue
        factor = (_UP if r["direction"] > 0 else _DOWN)[r["kind"]]
        chans = d["channels"]
        c = chans.index(r["target_channel"]) if r["target_channel"] is not None else None
        out.append({"perturbation": name, "kind": r["kind"], "direction": int(r["direction"]), "factor": factor,
                    "target_channel": c, "channel_name": r["target_channel"]})
    return out


WHAT = {"nucleus_size": "nuclear radius", "elongation": "nuclear aspect ratio", "cytoplasm_size": "cytoplasm radius",
        "intensity": "{name} (ch{c}) intensity", "texture": "texture amplitude"}


def describe(effect: Mapping[str, Any]) -> str:
    """'nuclear radius x1.35' style text of a documented effect."""
    what = WHAT[effect["kind"]].format(name=effect["channel_name"], c=effect["target_channel"])
    return f"{what} x{effect['factor']:g}"


def _value(feats: torch.Tensor, names: list[str], effect: Mapping[str, Any]) -> torch.Tensor:
    """Per-image value of the feature that measures `effect`."""
    key = FEATURE_OF[effect["kind"]][0]
    if effect["kind"] == "texture":
        c = sum(n.endswith("_grad_energy") for n in names)
        g = feats[:, [names.index(f"ch{i}_grad_energy") for i in range(c)]]
        m = feats[:, [names.index(f"ch{i}_mean") for i in range(c)]].clamp_min(1e-6)
        return (g / m).mean(1)
    if effect["kind"] == "intensity":
        key = key.format(c=effect["target_channel"])
    return feats[:, names.index(key)]


def _ratio(values: torch.Tensor, is_pert: torch.Tensor, is_ctrl: torch.Tensor) -> float | None:
    if not bool(is_pert.any()) or not bool(is_ctrl.any()):
        return None
    a, b = float(values[is_pert].mean()), float(values[is_ctrl].mean())
    if b <= 0 or a <= 0:
        return None
    return a / b


def verdict(direction: int, real: float | None, gen: float | None, tol: float = TOLERANCE) -> str:
    """Whether the generated ratio reproduces the real one (see the module docstring)."""
    if real is None:
        return "not measurable (no real images)"
    if gen is None:
        return "no (no generated images)"
    lr, lg = math.log(real), math.log(gen)
    if lr * direction <= 0:
        return "not measurable (real images do not show it)"
    if lg * direction <= 0:
        return "no (wrong direction)"
    if abs(lg - lr) > tol * abs(lr):
        return "no (" + ("too weak" if abs(lg) < abs(lr) else "too strong") + ")"
    return "yes"


def measure(effects: Sequence[Mapping[str, Any]], real: torch.Tensor, real_names: Sequence[str],
            gen: torch.Tensor, gen_names: Sequence[str], control: str = "control") -> list[dict[str, Any]]:
    """One row per documented effect: the real and the generated perturbed/control ratios and the verdict.

    real, gen: (N, C, H, W) images (controls included); *_names: each image's perturbation name."""
    feats_r, names = morphology_features(real)
    feats_g, _ = morphology_features(gen)
    rows = []
    for e in effects:
        vr, vg = _value(feats_r, names, e), _value(feats_g, names, e)
        p = e["perturbation"]
        pr = torch.tensor([n == p for n in real_names], dtype=torch.bool)
        cr = torch.tensor([n == control for n in real_names], dtype=torch.bool)
        pg = torch.tensor([n == p for n in gen_names], dtype=torch.bool)
        cg = torch.tensor([n == control for n in gen_names], dtype=torch.bool)
        if not bool(pr.any()):
            continue  # the perturbation is not in the evaluated split
        r, g = _ratio(vr, pr, cr), _ratio(vg, pg, cg)
        title = FEATURE_OF[e["kind"]][1]
        rows.append({"perturbation": p, "effect": describe(e), "kind": e["kind"], "direction": e["direction"],
                     "feature": title.format(name=f"ch{e['target_channel']} {e['channel_name']}"),
                     "real_ratio": r, "generated_ratio": g, "n_real": int(pr.sum()), "n_generated": int(pg.sum()),
                     "reproduced": verdict(e["direction"], r, g)})
    return rows


def morphology_means(real: torch.Tensor, real_names: Sequence[str], gen: torch.Tensor,
                     gen_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{perturbation: {n_real, n_generated, <feature>: [real mean, generated mean]}} for the MEANS features."""
    feats_r, names = morphology_features(real)
    feats_g, _ = morphology_features(gen)
    out: dict[str, dict[str, Any]] = {}
    for p in dict.fromkeys(list(real_names) + list(gen_names)):
        pr = torch.tensor([n == p for n in real_names], dtype=torch.bool)
        pg = torch.tensor([n == p for n in gen_names], dtype=torch.bool)
        row: dict[str, Any] = {"n_real": int(pr.sum()), "n_generated": int(pg.sum())}
        for key, _ in MEANS:
            i = names.index(key)
            row[key] = [float(feats_r[pr, i].mean()) if pr.any() else None,
                        float(feats_g[pg, i].mean()) if pg.any() else None]
        out[p] = row
    return out
