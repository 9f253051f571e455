"""oneDNN-fused linear + GELU / residual add: the same function as the plain ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hrmedseg.models.fused_linear import linear, linear_add, linear_gelu, linear_silu, matmul_nt, onednn_linear_available


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_equals_plain_ops(autocast):
    torch.manual_seed(0)
    x, w, b, r = torch.randn(2, 300, 96), torch.randn(384, 96) / 10, torch.randn(384), torch.randn(2, 300, 384)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused, plain = linear_gelu(x, w, b), F.gelu(F.linear(x, w, b))
        fused_add, plain_add = linear_add(x, w, b, r), F.linear(x, w, b) + r
    tol = dict(rtol=2e-2, atol=5e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    assert fused.dtype == plain.dtype and fused.shape == (2, 300, 384)
    torch.testing.assert_close(fused.float(), plain.float(), **tol)
    torch.testing.assert_close(fused_add.float(), plain_add.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_plain_linear_silu_and_channel_major_product(dtype, batch):
    torch.manual_seed(1)
    x, w, b = torch.randn(batch, 300, 96, dtype=dtype), (torch.randn(40, 96) / 10).to(dtype), torch.randn(40, dtype=dtype)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w, b).float(), F.linear(x, w, b).float(), **tol)
    torch.testing.assert_close(linear_silu(x, w, b).float(), F.silu(F.linear(x, w, b)).float(), **tol)
    product = matmul_nt(w, x)  # (batch, 40, 300), channel-major
    assert product.shape == (batch, 40, 300) and product.dtype == dtype
    torch.testing.assert_close(product.float(), (w.float() @ x.float().mT), **tol)


def test_non_contiguous_residual_and_other_dtypes_take_the_plain_path():
    x, w, b = torch.randn(5, 8), torch.randn(4, 8), torch.randn(4)
    r = torch.randn(4, 5).T  # non-contiguous
    torch.testing.assert_close(linear_add(x, w, b, r), F.linear(x, w, b) + r)
    xd, wd, bd = x.double(), w.double(), b.double()
    torch.testing.assert_close(linear_gelu(xd, wd, bd), F.gelu(F.linear(xd, wd, bd)))


def test_onednn_is_used_on_x86_builds():
    assert onednn_linear_available() == (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def test_a_dtype_onednn_cannot_run_takes_the_plain_path(monkeypatch):
    """On AVX2-only CPUs oneDNN has no bf16 primitive: autocast products must still run (plain ops)."""
    import hrmedseg.models.fused_linear as fused_linear

    monkeypatch.setattr(fused_linear, "onednn_linear_available", lambda dtype=torch.float32: dtype == torch.float32)
    x, w, b, r = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4), torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
        assert torch.equal(linear_add(x, w, b, r), F.linear(x, w, b) + r)
