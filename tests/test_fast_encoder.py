"""FastHRMedSegEncoder computes what the reference HRMedSegEncoder computes."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.models import EncoderConfig, build_encoder
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder, elu_plus_one, rope_tables, swap_pairs
from hrmedseg.models.rope import RotaryEmbedding2d
from hrmedseg.models.runtime import select_backend


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _small_encoder(seed: int = 0):
    torch.manual_seed(seed)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is tested
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
                module.weight.data.normal_(1, 0.2)
                module.bias.data.normal_(0, 0.2)
    return encoder


def test_golden_output_fp32(golden):
    encoder = build_encoder().eval()
    encoder.load_state_dict(golden["state_dict"])
    fast = FastHRMedSegEncoder.from_reference(encoder)
    out = fast(golden["input"])
    assert out.shape == (1, 256, 64, 64)
    assert rel_l2(out, golden["output"]) < 1e-4


@pytest.mark.parametrize("hw", [(64, 96), (160, 48)])
def test_small_model_any_size_and_batch(hw):
    encoder = _small_encoder()
    fast = FastHRMedSegEncoder.from_reference(encoder)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = encoder(x)
    out = fast(x)
    assert out.shape == ref.shape == (2, 256, hw[0] // 16, hw[1] // 16)
    assert rel_l2(out, ref) < 1e-5


def test_bf16_option_close_and_reference_unchanged():
    encoder = _small_encoder(1)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    fast = FastHRMedSegEncoder.from_reference(encoder, bf16=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = encoder(x)
    out = fast(x)
    assert 0 < rel_l2(out, ref) < 0.05
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())


def test_rope_table_identity_matches_reference_rotation():
    # rope(x) = x * cos + swap(x * sin') for the table the fast encoder uses.
    x = torch.randn(1, 5, 7, 48)
    table = rope_tables(5, 7, 48).view(5, 7, 2, 48)
    fast = x * table[:, :, 0] + swap_pairs(x * table[:, :, 1], -1)
    assert torch.allclose(fast, RotaryEmbedding2d(48)(x), atol=1e-5)


def test_helpers():
    x = torch.linspace(-5, 5, 101)
    assert torch.allclose(elu_plus_one(x), torch.nn.functional.elu(x) + 1, atol=1e-6)
    assert swap_pairs(torch.arange(6), 0).tolist() == [1, 0, 3, 2, 5, 4]


def test_refuses_non_multiple_of_16():
    fast = FastHRMedSegEncoder.from_reference(_small_encoder())
    with pytest.raises(ValueError, match="multiples of 16"):
        fast(torch.randn(1, 3, 40, 64))


def test_select_backend(monkeypatch):
    monkeypatch.delenv("HRMEDSEG_BACKEND", raising=False)
    monkeypatch.setattr("hrmedseg.models.runtime.cpu_has_amx_bf16", lambda: False)
    assert select_backend("cpu") == "fast"
    assert select_backend("cuda") == "fast-bf16"  # fastest on GPUs, same held-out Dice
    assert select_backend("cuda", allow_bf16=False) == "fast"
    monkeypatch.setattr("hrmedseg.models.runtime.cpu_has_amx_bf16", lambda: True)
    assert select_backend("cpu") == "fast-bf16"  # AMX: bf16 encoder measured faster
    assert select_backend("cpu", allow_bf16=False) == "fast"
    monkeypatch.setenv("HRMEDSEG_BACKEND", "reference")
    assert select_backend("cpu") == "reference"
    monkeypatch.setenv("HRMEDSEG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="HRMEDSEG_BACKEND"):
        select_backend("cpu")
