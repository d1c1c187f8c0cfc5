"""`phenoflow weights import inception|dinov2 FILE`: the published feature-network files -> the local format.

Where the files come from (nothing is downloaded by phenoflow; fetch them yourself, docs/eval.md):
  inception  the FID Inception-v3 (TF graph 2015-12-05) as ported to torch, released as
             https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
             and (the same file) as torch-fidelity's weights-inception-2015-12-05-6726825d.pth
             (https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/). The release publishes its checksum
             the torch-hub way: the file name carries the first 8 hex digits of the file's sha256 (6726825d). The
             full digest checked here, 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2, starts
             with that published prefix (it was computed from the release file by users, not published by the
             authors).
  dinov2     the official DINOv2 ViT-L/14 backbone checkpoint of facebookresearch/dinov2,
             https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth (what
             torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14") loads). No checksum is published for it,
             so the import checks its state dict strictly instead (every key of the architecture, nothing else,
             every shape, floating-point tensors) and records the file's sha256 in the sidecar so that copies can
             be compared.
Import: the file is read without executing anything (torch.load(weights_only=True): a pickle that names any
global outside torch's tensor allow-list is refused before it runs; phenoflow.eval.weights.read_state_dict), its
sha256 is compared with the published one (`expected_sha256` replaces it: a copy you verified yourself), its keys
and shapes are compared with the network's (built on the meta device: no memory for the 300M DINOv2 parameters),
and the tensors are written as `<out>.safetensors` (contiguous float32, the network's key names) with
`<out>.json` beside it (kind, source file and sha256, what was checked). Every refusal is a WeightsError naming the
file (the CLI prints it without a traceback, exit 2); nothing is written then.
Local format and where evaluation finds it: the default output folder is $PHENOFLOW_WEIGHTS_DIR, else
~/.cache/phenoflow/weights; eval.inception_weights / eval.dinov2_weights left empty take the imported file from
there (phenoflow.eval.features.weights_path); set them to use another file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phenoflow.eval.weights import WeightsError, read_state_dict, state_problems


@dataclass(frozen=True)
class Published:
    kind: str
    file_name: str  # the published file's name
    url: str
    sha256: str  # "" when none is published
    local_name: str  # file name of the imported weights in the weights folder
    strip_prefixes: tuple[str, ...] = ("module.",)


PUBLISHED = {
    "inception": Published(
        "inception", "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", "inception-2015-12-05.safetensors"),
    "dinov2": Published(
        "dinov2", "dinov2_vitl14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth", "",
        "dinov2_vitl14.safetensors", ("module.", "backbone.")),
}


def weights_dir() -> Path:
    """Where imported weights go by default and where evaluation looks when eval.*_weights is empty."""
    env = os.environ.get("PHENOFLOW_WEIGHTS_DIR", "")
    return Path(os.path.expanduser(env or "~/.cache/phenoflow/weights"))  # no HOME: "~" stays, never an error


def default_path(kind: str) -> Path:
    return weights_dir() / PUBLISHED[kind].local_name


def _network(kind: str, shape: Any = None) -> torch.nn.Module:
    """The architecture on the meta device (keys and shapes only; no memory)."""
    with torch.device("meta"):
        if kind == "inception":
            from phenoflow.eval.inception import FIDInceptionV3

            return FIDInceptionV3()
        from phenoflow.eval.dinov2 import VIT_L14, DINOv2

        return DINOv2(shape or VIT_L14)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_state(path: Path, state: dict[str, torch.Tensor], net: torch.nn.Module, what: str,
                optional: tuple[str, ...] = ("num_batches_tracked",)) -> dict[str, torch.Tensor]:
    """The network's keys, each with its shape and a floating-point dtype (`optional` keys may be absent);
    anything else is a WeightsError naming the file and the first offending keys. Returns the state dict in the
    network's key order."""
    own = net.state_dict()
    parts = state_problems(own, state, optional, what, floating=True)
    if parts:
        raise WeightsError(f"{path} is not the {what} checkpoint: " + "; ".join(parts) + "; nothing was written")
    return {k: state[k] for k in own if k in state}


def import_weights(kind: str, src: str | Path, out: str | Path | None = None, *, expected_sha256: str | None = None,
                   overwrite: bool = False, shape: Any = None) -> dict[str, Any]:
    """Check the published file `src` and write it in the local format (module docstring). Returns a summary:
    {"out", "sidecar", "sha256", "checked", "tensors", "parameters"}. `shape`: another ViTShape for dinov2 (tests)."""
    if kind not in PUBLISHED:
        raise WeightsError(f"unknown feature network {kind!r} (known: {sorted(PUBLISHED)})")
    pub, src = PUBLISHED[kind], Path(src)
    out = Path(out) if out else default_path(kind)
    if out.suffix != ".safetensors":
        out = out / pub.local_name if out.is_dir() or not out.suffix else out
        if out.suffix != ".safetensors":
            raise WeightsError(f"--out {out}: the local format is a .safetensors file (or give a folder)")
    if out.exists() and not overwrite:
        raise WeightsError(f"{out} exists; pass --overwrite to replace it")
    if not src.is_file():
        raise WeightsError(f"weights file {src} does not exist (download {pub.file_name} from {pub.url} first; "
                           "phenoflow never downloads)")
    digest = sha256_file(src)
    want = (expected_sha256 or pub.sha256).lower()
    if want and digest != want:
        given = "--sha256" if expected_sha256 else f"the published checksum of {pub.file_name}"
        raise WeightsError(f"{src}: sha256 {digest} differs from {given} ({want}): not the published file, or "
                           f"damaged; download it again from {pub.url} (a copy you verified yourself: pass "
                           "--sha256 with its digest). Nothing was written")
    state = read_state_dict(src)  # weights_only: refuses pickled code, names the file
    for p in pub.strip_prefixes:
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    what = "FID Inception-v3" if kind == "inception" else "DINOv2 " + ("ViT-L/14" if shape is None else "ViT")
    state = check_state(src, state, _network(kind, shape), what)
    tensors = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in state.items()}
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    sidecar = out.with_name(out.name.removesuffix(".safetensors") + ".json")
    info = {"kind": kind, "network": what, "source_file": str(src.resolve()), "source_name": src.name,
            "source_sha256": digest, "published_name": pub.file_name, "published_url": pub.url,
            "checked": ("sha256 " + ("(given with --sha256)" if expected_sha256 else "(published)") if want else
                        "no checksum is published: state-dict keys and shapes checked strictly") + "; keys, shapes",
            "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))}
    try:
        save_file(tensors, str(tmp), metadata={"phenoflow_kind": kind, "source_sha256": digest})
        tmp.replace(out)
        stmp = sidecar.with_name(f".{sidecar.name}.tmp{os.getpid()}")
        stmp.write_text(json.dumps(info, indent=1) + "\n")
        stmp.replace(sidecar)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "sidecar": str(sidecar), "sha256": digest, "checked": info["checked"],
            "tensors": info["tensors"], "parameters": info["parameters"]}
