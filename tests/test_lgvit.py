"""LGViT + neck: faithfulness to the authors' code, any input size, autocast, checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.errors import WeightsError
from hrmedseg.models import EncoderConfig, build_encoder, load_encoder, save_encoder
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.models.rope import RotaryEmbedding2d, rope_angles


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_golden_output_reproduced(golden, tmp_path):
    path = tmp_path / "golden_state.pt"
    torch.save(golden["state_dict"], path)
    encoder = load_encoder(path)
    with torch.no_grad():
        out = encoder(golden["input"])
    assert out.shape == (1, 256, 64, 64)
    assert rel_l2(out, golden["output"]) < 1e-4


def test_dataparallel_prefix_and_rope_tables_load(golden, tmp_path):
    # The official file: 'module.' prefix (DataParallel) and stored RoPE tables that we recompute.
    sd = {f"module.{k}": v for k, v in golden["state_dict"].items()}
    for stage, depth in ((1, 2), (2, 6), (3, 2)):
        for b in range(depth):
            sd[f"module.image_encoder.layers.{stage}.blocks.{b}.attn.rope.rotations"] = torch.zeros(64, 64, 48, 2)
    path = tmp_path / "SAM_PFD_10K.pth"
    torch.save({"model": sd}, path)
    encoder = load_encoder(path)
    assert encoder.preprocessing == Preprocessing.hrmedseg_release()
    with torch.no_grad():
        assert rel_l2(encoder(golden["input"]), golden["output"]) < 1e-4


def test_parameter_count_matches_paper():
    encoder = build_encoder()
    n_total = sum(p.numel() for p in encoder.parameters())
    n_lgvit = sum(p.numel() for p in encoder.image_encoder.parameters())
    assert abs(n_total - 1.57e6) / 1.57e6 < 0.01
    assert abs(n_lgvit - 0.96e6) / 0.96e6 < 0.01


@pytest.mark.parametrize("hw", [(256, 512), (160, 96)])
def test_any_multiple_of_16(hw):
    encoder = build_encoder().eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, *hw))
    assert out.shape == (2, 256, hw[0] // 16, hw[1] // 16)


def test_rope_matches_complex_rotation():
    x = torch.randn(2, 5, 7, 96)
    angles = rope_angles(5, 7, 96)
    expected = torch.view_as_real(torch.polar(torch.ones_like(angles), angles) * torch.view_as_complex(x.reshape(2, 5, 7, 48, 2))).flatten(-2)
    assert torch.allclose(RotaryEmbedding2d(96)(x), expected, atol=1e-5)


def test_non_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        build_encoder()(torch.randn(1, 3, 100, 128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_close_to_fp32(golden, tmp_path, dtype):
    # Real cos/sin RoPE: the authors' complex-number rotation fails under bf16 autocast.
    torch.save(golden["state_dict"], tmp_path / "w.pt")
    encoder = load_encoder(tmp_path / "w.pt")
    x = golden["input"][..., :256, :256]
    with torch.no_grad():
        ref = encoder(x)
        with torch.autocast("cpu", dtype=dtype):
            low = encoder(x)
    assert low.dtype == dtype
    assert rel_l2(low, ref) < 0.05


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    x = torch.randn(1, 3, 64, 64)
    encoder(x).square().mean().backward()
    ref = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    encoder.set_grad_checkpointing(True)
    encoder(x).square().mean().backward()
    for g, p in zip(ref, encoder.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_bundle_round_trip_keeps_config_and_preprocessing(tmp_path):
    config = EncoderConfig(embed_dim=48, depths=(1, 2), num_heads=(3, 6))
    encoder = build_encoder(config, Preprocessing.hrmedseg_release()).eval()
    path = save_encoder(encoder, tmp_path / "enc.pt", provenance={"source": "test"})
    loaded = load_encoder(path)
    assert loaded.config == config
    assert loaded.preprocessing == Preprocessing.hrmedseg_release()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), loaded(x))


def test_corrupt_and_truncated_files_named(golden, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(golden["state_dict"], good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated.pt"):
        load_encoder(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_encoder(garbage)
    with pytest.raises(WeightsError, match="not found"):
        load_encoder(tmp_path / "absent.pt")


def test_wrong_architecture_named(golden, tmp_path):
    sd = dict(golden["state_dict"])
    sd["neck.0.weight"] = torch.zeros(128, 96, 1, 1)
    path = tmp_path / "other_width.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="other_width.pt.*another shape|other_width.pt"):
        load_encoder(path)
    sam_like = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}, sam_like)
    with pytest.raises(WeightsError, match="not an LGViT"):
        load_encoder(sam_like)
