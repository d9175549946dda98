"""scripts/grad_fidelity.py's arithmetic: parameters grouped into families across layers, and each
family's distance and bias to the reference gradient, against hand-computed values and against
the same measures taken on the concatenated family with plain torch."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import grad_fidelity  # noqa: E402


def test_family_stars_layer_indices_only():
    assert grad_fidelity.family("layers.11.ffn.experts.w1") == "layers.*.ffn.experts.w1"
    assert grad_fidelity.family("mtp.0.block.attn.wq_b.weight") == "mtp.*.block.attn.wq_b.weight"
    assert grad_fidelity.family("head.weight") == "head.weight"


def test_by_family_hand_computed():
    ref = {"layers.0.w": torch.tensor([3.0, 4.0]), "layers.1.w": torch.tensor([1.0, 0.0]),
           "head.weight": torch.tensor([2.0, -2.0])}
    grads = {"layers.0.w": torch.tensor([3.0, 5.0]), "layers.1.w": torch.tensor([0.5, 0.0]),
             "head.weight": torch.tensor([2.0, -2.0])}
    rel, bias = grad_fidelity.by_family(grads, ref)["layers.*.w"]
    # differences (0, 1) and (-0.5, 0): |d|^2 = 1.25, |ref|^2 = 25 + 1, <d, ref> = 4 - 0.5
    assert math.isclose(rel, math.sqrt(1.25 / 26), rel_tol=1e-6)
    assert math.isclose(bias, 3.5 / 26, rel_tol=1e-6)
    assert grad_fidelity.by_family(grads, ref)["head.weight"] == (0.0, 0.0)


def test_by_family_matches_the_concatenated_family():
    gen = torch.Generator().manual_seed(7)
    shapes = {"layers.0.attn.wo.weight": (16, 8), "layers.1.attn.wo.weight": (16, 8),
              "layers.2.attn.wo.weight": (16, 8), "norm.weight": (8,)}
    ref = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads = {n: r * 0.9 + 0.1 * torch.randn(r.shape, generator=gen) for n, r in ref.items()}
    got = grad_fidelity.by_family(grads, ref)
    assert sorted(got) == ["layers.*.attn.wo.weight", "norm.weight"]
    names = [n for n in shapes if n.startswith("layers.")]
    r = torch.cat([ref[n].flatten() for n in names]).double()
    d = torch.cat([(grads[n] - ref[n]).flatten() for n in names]).double()
    rel, bias = got["layers.*.attn.wo.weight"]
    assert math.isclose(rel, (d.norm() / r.norm()).item(), rel_tol=1e-5)
    assert math.isclose(bias, (d @ r / (r @ r)).item(), rel_tol=1e-4)
    assert bias < -0.05  # the gradients were shrunk by 10%: the bias says so


def test_variants_by_name_and_fake_parts():
    assert grad_fidelity.variant("fp8") == dict(fp8=True)
    assert grad_fidelity.variant("bf16 eager") == dict(fused=False)
    assert grad_fidelity.variant("fake:weights+grads") == dict(fake={"weights", "grads"})
    assert grad_fidelity.variant("fake:all") == dict(fake={"weights", "inputs", "grads"})
    assert grad_fidelity.variant("fake:none") == dict(fake=frozenset())
    with pytest.raises(ValueError, match="fake:PARTS"):
        grad_fidelity.variant("fp16")
    for bad in ("fake:scales", "fake:weights+weights"):
        with pytest.raises(ValueError, match="join distinct names"):
            grad_fidelity.variant(bad)
