"""ECM-Decoder and the prompt-free HRMedSeg model: shapes, pooling, sizes, gradients, bundles, autocast."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.errors import WeightsError
from hrmedseg.models import EncoderConfig, build_encoder, save_encoder
from hrmedseg.models.ecm_decoder import ECMDecoder, MultiscalePooling
from hrmedseg.models.hrmedseg_model import HRMedSeg, build_hrmedseg, load_hrmedseg, save_hrmedseg
from hrmedseg.models.preprocessing import Preprocessing

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("hw", [(64, 64), (48, 112), (128, 80)])
def test_model_output_shape_square_and_non_square(hw):
    torch.manual_seed(0)
    model = build_hrmedseg(num_classes=3, encoder_config=SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, 3, *hw)
    assert torch.isfinite(out).all()


def test_decoder_any_grid_and_output_size():
    decoder = ECMDecoder(num_classes=2).eval()
    with torch.no_grad():
        default = decoder(torch.randn(1, 256, 3, 5))
        resized = decoder(torch.randn(1, 256, 3, 5), output_size=(50, 70))
    assert default.shape == (1, 2, 48, 80)
    assert resized.shape == (1, 2, 50, 70)


def test_decoder_output_depends_on_grid_position():
    # psi must reach the masks: a constant embedding would otherwise give a constant mask.
    decoder = ECMDecoder(num_classes=1).eval()
    with torch.no_grad():
        out = decoder(torch.ones(1, 256, 4, 6))
    assert out.std() > 0


def test_pooling_is_parameter_free_and_changes_output():
    torch.manual_seed(0)
    with_pool = ECMDecoder(num_classes=2).eval()
    without_pool = ECMDecoder(num_classes=2, pool_sizes=()).eval()
    assert n_params(with_pool) == n_params(without_pool)
    without_pool.load_state_dict(with_pool.state_dict())
    embedding = torch.randn(1, 256, 8, 6)
    with torch.no_grad():
        a, b = with_pool(embedding), without_pool(embedding)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)


def test_multiscale_pooling_definition():
    pool = MultiscalePooling((5, 9, 13))
    x = torch.randn(2, 4, 7, 11)
    # count_include_pad=False: a constant map stays constant up to the borders.
    constant = torch.full((1, 3, 7, 11), 2.5)
    assert torch.allclose(pool(constant), constant, atol=1e-6)
    # Each kernel adds its local average minus the input.
    expected = x.clone()
    for k in (5, 9, 13):
        mean = torch.stack(
            [
                x[:, :, max(0, i - k // 2): i + k // 2 + 1, max(0, j - k // 2): j + k // 2 + 1].mean(dim=(-2, -1))
                for i in range(7)
                for j in range(11)
            ],
            dim=-1,
        ).reshape(2, 4, 7, 11)
        expected += mean - x
    assert torch.allclose(pool(x), expected, atol=1e-5)
    assert torch.equal(MultiscalePooling(())(x), x)
    with pytest.raises(ValueError, match="odd"):
        MultiscalePooling((4,))


def test_parameter_count_matches_paper():
    model = HRMedSeg(num_classes=1)
    assert abs(n_params(model) - 3.53e6) / 3.53e6 < 0.01
    assert abs(n_params(model.encoder) - 1.57e6) / 1.57e6 < 0.01
    # Each further class adds a query and a hypernetwork MLP, nothing else.
    per_class = n_params(HRMedSeg(num_classes=2).decoder) - n_params(model.decoder)
    assert per_class == 256 + sum(p.numel() for p in model.decoder.output_hypernetworks_mlps[0].parameters())


def test_gradients_reach_queries_and_encoder():
    torch.manual_seed(0)
    model = build_hrmedseg(num_classes=2, encoder_config=SMALL)
    model(torch.randn(1, 3, 64, 96)).sigmoid().mean().backward()
    for name in ("decoder.class_queries.weight", "encoder.image_encoder.patch_embed.proj.weight",
                 "decoder.query_self_attn.q_proj.weight", "decoder.layers.1.cross_attn_image_to_token.q_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = build_hrmedseg(num_classes=2, encoder_config=SMALL)
    x = torch.randn(1, 3, 64, 64)
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ref[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_bundle_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    model = build_hrmedseg(num_classes=2, encoder_config=SMALL, pool_sizes=(5, 9)).eval()
    path = save_hrmedseg(model, tmp_path / "model.pt", provenance={"source": "test"}, class_names=["disc", "cup"])
    loaded = load_hrmedseg(path)
    assert not loaded.training
    assert loaded.encoder.config == SMALL
    assert loaded.decoder.pool_sizes == (5, 9)
    assert loaded.class_names == ("disc", "cup")
    assert loaded.preprocessing == model.preprocessing
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_class_names_must_match_classes(tmp_path):
    model = build_hrmedseg(num_classes=2, encoder_config=SMALL)
    with pytest.raises(ValueError, match="3 class names"):
        save_hrmedseg(model, tmp_path / "m.pt", class_names=["a", "b", "c"])
    assert not (tmp_path / "m.pt").exists()


def test_encoder_bundle_refused_naming_file(tmp_path):
    path = save_encoder(build_encoder(SMALL), tmp_path / "just_encoder.pt")
    with pytest.raises(WeightsError, match="just_encoder.pt.*lgvit_neck"):
        load_hrmedseg(path)
    raw = tmp_path / "raw_state.pth"
    torch.save(build_encoder(SMALL).state_dict(), raw)
    with pytest.raises(WeightsError, match="raw_state.pth"):
        load_hrmedseg(raw)


def test_fine_tuning_from_distilled_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(SMALL, Preprocessing.hrmedseg_release())
    path = save_encoder(encoder, tmp_path / "distilled.pt")
    model = build_hrmedseg(num_classes=1, encoder_weights=path)
    assert model.training
    assert model.preprocessing == Preprocessing.hrmedseg_release()
    for (n, a), b in zip(encoder.state_dict().items(), model.encoder.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(WeightsError, match="distilled.pt"):
        build_hrmedseg(encoder_config=EncoderConfig(), encoder_weights=path)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = build_hrmedseg(num_classes=2, encoder_config=SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert low.shape == ref.shape
    assert rel_l2(low, ref) < 0.05
