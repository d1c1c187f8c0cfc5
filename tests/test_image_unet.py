"""The ADM-style 2D U-Net as the image model (model.arch=unet, data.modality=microscopy): the MiT paper's Configs
A-E baseline trains through the one trainer, counts its FLOPs, exports and is evaluated from its export with
guidance, like the MiT."""
from __future__ import annotations

import torch

from phenoflow.config import ConfigError, resolve
from phenoflow.modalities import image_network

TINY = ["model.arch=unet", "model.prediction=velocity", "model.unet_base_channels=16", "model.unet_channel_mult=[1,2]", "data.image_size=16",
        "data.channels=3", "data.train_images=128", "data.val_images=32", "data.samples_per_shard=64",
        "train.batch_size=16", "train.precision=fp32", "train.device=cpu"]


def test_image_unet_trains_exports_and_evaluates(tmp_path):
    from phenoflow.eval.evaluate import load_export
    from phenoflow.model.unet import UNet
    from phenoflow.train.trainer import Trainer

    c = resolve("demo", [*TINY, "train.total_samples=64", f"run.out_dir={tmp_path}", "run.name=adm"])
    torch.manual_seed(0)
    tr = Trainer(c)
    assert isinstance(tr.model, UNet) and tr.model.dims == 2
    flops = tr.modality.train_flops(tr.model)
    assert flops > 0  # counted (MFU and the study's ExaFLOPs need it)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    model, cfg, _ = load_export(c.run_dir, 0.05)
    assert isinstance(model, UNet) and cfg.model.arch == "unet"
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed  # the export holds trained weights
    # Guided velocity on image-shaped input with null rows: the same API as the MiT.
    from phenoflow.flow.guidance import guided_velocity

    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    labels = {g: torch.zeros(2, dtype=torch.long) for g in model.num_classes}
    v = guided_velocity(model, x, t, labels, 2.0, ("perturbation",))
    assert v.shape == x.shape and torch.isfinite(v).all()
    from phenoflow.cli import main

    assert main(["evaluate", "--run-dir", str(c.run_dir), "eval.steps=2", "eval.solver=euler", "eval.guidance=[1,2]",
                 "eval.max_images=32"]) == 0
    assert (c.run_dir / "report" / "metrics.md").is_file()


def test_image_unet_config_checks():
    c = resolve("demo", TINY)
    assert type(image_network(c, {"perturbation": 3, "experiment": 2, "cell_type": 1})).__name__ == "UNet"
    for bad, msg in (("model.unet_base_channels=48", "multiple of 32"), ("model.arch=mlp", "expression model")):
        try:
            resolve("demo", [*TINY, bad])
        except ConfigError as e:
            assert msg in str(e), e
        else:
            raise AssertionError(f"{bad} was accepted")
