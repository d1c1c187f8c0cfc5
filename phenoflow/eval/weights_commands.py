"""`phenoflow weights import inception|dinov2 FILE`: convert a published feature-network file to the local format
(phenoflow/eval/weights_import.py says where the files come from and what is checked).

``register(subparsers)`` adds the ``weights`` command to the top-level parser (called by phenoflow/cli.py).
"""
from __future__ import annotations

import argparse

IMPORT_HELP = """\
Check a published feature-network file and convert it to the local format (.safetensors + .json), read without
executing anything (weights_only). Where to get the files (phenoflow downloads nothing):
  inception  pt_inception-2015-12-05-6726825d.pth
             https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
             (torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same file); its sha256 is checked.
  dinov2     dinov2_vitl14_pretrain.pth
             https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth
             no checksum is published: every key and shape of ViT-L/14 is checked instead.
Evaluation then finds the imported file in the weights folder ($PHENOFLOW_WEIGHTS_DIR, else
~/.cache/phenoflow/weights) when eval.inception_weights / eval.dinov2_weights are empty.
"""


def _cmd_import(args: argparse.Namespace) -> int:
    from phenoflow.eval.weights_import import import_weights

    s = import_weights(args.kind, args.file, args.out, expected_sha256=args.sha256, overwrite=args.overwrite)
    print(f"imported {args.kind}: {s['out']} ({s['tensors']} tensors, {s['parameters']:,} parameters; source "
          f"sha256 {s['sha256']}; checked: {s['checked']}); provenance in {s['sidecar']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    w = subparsers.add_parser("weights", help="feature-network weights for evaluation (Inception-v3, DINOv2)")
    sub = w.add_subparsers(dest="weights_command", required=True)
    p = sub.add_parser("import", help="convert a published Inception-v3 / DINOv2 file to the local format",
                       description=IMPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["inception", "dinov2"], help="which network the file holds")
    p.add_argument("file", help="the downloaded file (pt_inception-2015-12-05-6726825d.pth or "
                                "dinov2_vitl14_pretrain.pth)")
    p.add_argument("--out", default=None,
                   help="output .safetensors file or folder (default: the weights folder, $PHENOFLOW_WEIGHTS_DIR "
                        "or ~/.cache/phenoflow/weights)")
    p.add_argument("--sha256", default=None,
                   help="expected sha256 of FILE instead of the published one (a copy you verified yourself)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing imported file")
    p.set_defaults(func=_cmd_import)
