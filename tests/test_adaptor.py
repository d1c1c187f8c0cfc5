"""The molecule adaptor (phenoflow/model/molecule_adaptor.py): init rule, null path with classifier-free
guidance, one-hot and adaptor labels in one model, dose scaling, the export round trip, and train.trainable=adaptor
(frozen parameters bit-identical after optimizer steps, trainable ones change)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phenoflow.config import resolve
from phenoflow.flow.guidance import guided_velocity
from phenoflow.model.mit import build_model
from phenoflow.model.molecule_adaptor import attach_adaptor, attach_from_state
from phenoflow.train.finetune import freeze, parameter_counts

SMALL = ["data.image_size=16", "data.channels=3", "model.size=tiny", "model.depth=2", "model.hidden_size=32",
         "model.num_heads=2", "model.patch_size=4", "mol.conditioning=adaptor", "mol.adaptor_depth=2",
         "model.proj_dropout=0.0"]
N_PERT = 4  # control + 3 compounds


def make(seed=0, *extra):
    torch.manual_seed(seed)
    cfg = resolve("demo", SMALL + list(extra))
    m = build_model(cfg, {"perturbation": N_PERT, "experiment": 2})
    table = np.random.default_rng(seed).integers(0, 2, size=(N_PERT, 64)).astype(np.float32)
    has = np.array([False, True, True, True])
    attach_adaptor(m, cfg, table, has, (0.1, 3.0))
    return m.eval(), cfg


def inputs(n=6):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, 3, 16, 16, generator=g), torch.rand(n, generator=g)
    labels = {"perturbation": torch.tensor([0, 1, 2, 3, 4, 2][:n]), "experiment": torch.tensor([0, 1, 0, 1, 0, 1][:n]),
              "dose": torch.tensor([0.0, 0.1, 1.0, 3.0, 0.0, 30.0][:n])}
    return x, t, labels


def perturb(model, scale=0.5):
    """Give the zero-initialised parts of the base and the adaptor some weight (as training would)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("adaLN_modulation", "final_layer", "linear", "proj_out", "null_delta")):
                p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)


def test_init_rule_compounds_start_as_the_null_row():
    """At initialisation (W_o = 0) every compound embeds as the base model's null row: cond == uncond."""
    m, _ = make()
    perturb(m.final_layer, 0.5)  # a non-trivial base output, the adaptor untouched
    for blk in m.blocks:
        perturb(blk)
    x, t, lab = inputs()
    null = m.null_labels(lab)
    v_cond, v_null = m(x, t, lab), m(x, t, null)
    compound = (lab["perturbation"] >= 1) & (lab["perturbation"] <= 3)
    assert torch.equal(v_cond[compound], v_null[compound])
    assert not torch.allclose(v_cond[0], v_null[0])  # the control keeps its one-hot row


def test_null_path_and_cfg():
    m, _ = make()
    perturb(m)
    x, t, lab = inputs()
    null = m.null_labels(lab)
    assert null["perturbation"].tolist() == [N_PERT] * 6 and torch.equal(null["dose"], lab["dose"])
    v_cond, v_null = m(x, t, lab), m(x, t, null)
    assert not torch.allclose(v_cond, v_null)
    # w = 0 is the null model, w = 1 the conditional one, w = 2 the CFG combination (one batched forward).
    assert torch.allclose(guided_velocity(m, x, t, lab, 0.0), v_null)
    assert torch.allclose(guided_velocity(m, x, t, lab, 1.0), v_cond)
    assert torch.allclose(guided_velocity(m, x, t, lab, 2.0), v_null + 2 * (v_cond - v_null), atol=1e-5)
    # The null embedding is the base null row plus the learned delta: changing the delta moves only null ids.
    with torch.no_grad():
        m.mol_adaptor.null_delta.add_(0.3)
    assert not torch.allclose(m(x, t, null), v_null)
    assert torch.allclose(m(x, t, lab)[:4], v_cond[:4])
    # Null ids ignore the dose: the null branch carries no molecule and no dose information.
    other = dict(null, dose=torch.rand(6))
    assert torch.equal(m(x, t, other), m(x, t, null))


def test_onehot_and_adaptor_coexist_and_dose_matters():
    m, _ = make()
    perturb(m)
    x, t, lab = inputs()
    v = m(x, t, lab)
    with torch.no_grad():  # a compound's one-hot row is not used (its molecule is) ...
        m.label_embedders.perturbation.weight[1:4].add_(1.0)
    v2 = m(x, t, lab)
    assert torch.equal(v2[1:4], v[1:4])
    with torch.no_grad():  # ... the control's row is
        m.label_embedders.perturbation.weight[0].add_(1.0)
    v3 = m(x, t, lab)
    assert not torch.allclose(v3[0], v2[0]) and torch.equal(v3[1:4], v2[1:4])
    # The dose modulates the adaptor; outside the stored range it is clamped to [0, 1].
    s = m.mol_adaptor.scaled_dose(torch.tensor([0.0, 0.1, 1.55, 3.0, 30.0]), 5, "cpu")
    assert s.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    lab2 = dict(lab, dose=torch.full((6,), 1.0))
    assert not torch.allclose(m(x, t, lab2)[1], v2[1])
    # mol.dose_log: the stored range is on the log1p scale and the dose is mapped the same way.
    m.mol_adaptor.dose_log.fill_(1.0)
    m.mol_adaptor.dose_range.copy_(torch.log1p(torch.tensor([0.1, 3.0])))
    s = m.mol_adaptor.scaled_dose(torch.tensor([0.1, 3.0, float(np.expm1((np.log1p(0.1) + np.log1p(3.0)) / 2))]), 3, "cpu")
    assert s.tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-6)


def test_export_round_trip_rebuilds_the_adaptor(tmp_path):
    from safetensors.torch import load_file, save_file

    m, cfg = make()
    perturb(m)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    assert {"mol_adaptor.table", "mol_adaptor.has_molecule", "mol_adaptor.dose_range", "mol_adaptor.dose_log"} <= set(state)
    save_file(state, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    fresh = build_model(cfg, {"perturbation": N_PERT, "experiment": 2})
    assert attach_from_state(fresh, cfg, loaded) is not None
    fresh.load_state_dict(loaded)
    x, t, lab = inputs()
    assert torch.equal(fresh.eval()(x, t, lab), m(x, t, lab))
    assert fresh.mol_adaptor.dose_range.tolist() == pytest.approx([0.1, 3.0])
    plain = build_model(cfg, {"perturbation": N_PERT, "experiment": 2})
    assert attach_from_state(plain, cfg, {k: v for k, v in loaded.items() if not k.startswith("mol_")}) is None


def test_trainable_adaptor_freezes_the_base_bit_for_bit():
    """train.trainable=adaptor: only adaLN modulation layers (base and adaptor) and the adaptor train; after
    Adam steps every frozen tensor is bit-identical and every trainable one has moved."""
    m, _ = make()
    perturb(m)  # a "pretrained" base: zero-initialised output layers would pass no gradient to the blocks
    m.train()
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    freeze(m, "adaptor")
    counts = parameter_counts(m)
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable == {k for k in before if "adaLN_modulation" in k or k.startswith("mol_adaptor.")}
    assert counts["trainable"] == sum(before[k].numel() for k in trainable) and counts["frozen"] > 0
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, t, lab = inputs()
    target = torch.randn_like(x)
    for _ in range(3):
        opt.zero_grad()
        ((m(x, t, lab) - target) ** 2).mean().backward()
        opt.step()
    for k, p in m.named_parameters():
        if k in trainable:
            assert not torch.equal(p.detach(), before[k]), f"{k} should have trained"
        else:
            assert torch.equal(p.detach(), before[k]), f"{k} should be frozen"
