"""The CUDA-only paths: graph replay of the encoder and the engine's GPU defaults.

Skipped without a CUDA GPU; `device/bench_gpu_speed.sh` runs this file on the lent H100.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrmedseg.engine import BoxPredictor
from hrmedseg.models import EncoderConfig, build_encoder
from hrmedseg.models.cuda_graph import CudaGraphRunner
from hrmedseg.models.neck import HRMedSegEncoder
from hrmedseg.models.runtime import build_fast_encoder
from hrmedseg.models.sam import build_hrmedseg_sam

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_cpu_inputs_run_the_module_eagerly():
    module = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    runner = CudaGraphRunner(module)
    assert torch.equal(runner(x), module(x)) and not runner._captures


@pytest.fixture
def exact_float32(monkeypatch):
    """No TF32 in matmuls or convolutions (cuDNN's default allows it), so fp32 errors are ~1e-6."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@cuda
@torch.no_grad()
def test_graph_replay_equals_eager_per_shape_and_outputs_are_kept(exact_float32):
    torch.manual_seed(0)
    reference = build_encoder(SMALL).eval().cuda()
    runner = build_fast_encoder(reference, "fast")
    assert isinstance(runner, CudaGraphRunner)
    a, b = torch.randn(1, 3, 128, 128, device="cuda"), torch.randn(2, 3, 64, 96, device="cuda")
    out_a = runner(a)
    out_b = runner(b)
    again = runner(a * 2)  # replays a's graph with new input: out_a must not change
    errors = {
        "a vs eager": rel_l2(out_a, runner.module(a)),
        "a vs reference": rel_l2(out_a, reference(a)),
        "b vs reference": rel_l2(out_b, reference(b)),
        "2a vs reference": rel_l2(again, reference(a * 2)),
    }
    assert max(errors.values()) < 1e-4, errors
    assert len(runner._captures) == 2


@cuda
@torch.no_grad()
def test_bf16_runs_in_bf16_and_graphs_can_be_turned_off(monkeypatch):
    torch.manual_seed(0)
    reference = build_encoder(SMALL).eval().cuda()
    x = torch.randn(1, 3, 128, 128, device="cuda")
    runner = build_fast_encoder(reference, "fast-bf16")
    out = runner(x)
    assert out.dtype == torch.bfloat16 and rel_l2(out, reference(x)) < 3e-2
    monkeypatch.setenv("HRMEDSEG_CUDA_GRAPHS", "0")
    assert not isinstance(build_fast_encoder(reference, "fast"), CudaGraphRunner)


@cuda
def test_engine_gpu_defaults_and_masks_match_the_reference():
    torch.manual_seed(0)
    model = build_hrmedseg_sam(HRMedSegEncoder(SMALL))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    boxes = np.array([[20, 30, 80, 90], [150, 100, 260, 180], [300, 200, 390, 290]], float)
    default = BoxPredictor(model, device="cuda")
    assert default.backend == "fast-bf16" and default.decode_batch == 64
    fast = [m.mask for m in BoxPredictor(model, device="cuda", backend="fast").predict_boxes(image, boxes)]
    ref = [m.mask for m in BoxPredictor(model, device="cuda", backend="reference").predict_boxes(image, boxes)]
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and (a != b).mean() < 1e-3
    assert len(list(default.predict_boxes(image, boxes))) == 3
