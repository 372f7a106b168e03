"""The helpers every stage shares: logits of an output, KL of logits, BatchNorm's affine map."""
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanconv.batchnorm import bn_affine
from leanconv.errors import ModelError
from leanconv.logits import find_logits, first_tensor, kl_divergence, logits_of


def test_logits_found_in_every_output_form():
    t = torch.randn(4, 10)
    Out = namedtuple("Out", "logits aux")

    class HF:  # an output object with .logits (Hugging Face)
        logits = t
    for out in (t, (t, torch.randn(4, 3)), [t], {"logits": t, "x": 1}, Out(t, None), HF()):
        assert logits_of(out) is t and find_logits(out) is t


def test_no_logits_is_none_or_one_clear_error():
    fmap = torch.randn(2, 8, 4, 4)
    for out in (fmap, (fmap,), {"features": fmap}, [], "text"):
        assert find_logits(out) is None
        with pytest.raises(ModelError, match="cannot find logits"):
            logits_of(out)
    assert first_tensor(fmap) is fmap and first_tensor((fmap, 1)) is fmap
    assert first_tensor({"features": fmap}) is fmap
    with pytest.raises(ModelError):
        first_tensor("text")


def test_kl_divergence_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g).double(), torch.randn(5, 7, generator=g).double()
    for temp in (1.0, 3.0):
        p, q = F.softmax(t / temp, -1), F.softmax(s / temp, -1)
        want = (p * (p.log() - q.log())).sum()
        got = kl_divergence(s, t, temp)
        assert torch.allclose(got, want, atol=1e-12), f"max abs error {(got - want).abs().item():.3g}"
    assert kl_divergence(t, t).item() == pytest.approx(0.0, abs=1e-12)


def test_bn_affine_is_the_eval_batchnorm():
    g = torch.Generator().manual_seed(1)
    for affine in (True, False):
        bn = nn.BatchNorm2d(6, affine=affine).eval()
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.1)
        if affine:
            with torch.no_grad():
                bn.weight.copy_(torch.randn(6, generator=g))
                bn.bias.copy_(torch.randn(6, generator=g))
        x = torch.randn(2, 6, 3, 3, generator=g)
        a, b = bn_affine(bn)
        y = a[:, None, None] * x + b[:, None, None]
        assert torch.allclose(y, bn(x), atol=1e-6), f"max abs error {(y - bn(x)).abs().max().item():.3g}"
    with pytest.raises(ValueError, match="running statistics"):
        bn_affine(nn.BatchNorm2d(3, track_running_stats=False))
