"""hrmedseg export-onnx: files that onnxruntime runs with PyTorch's results, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from hrmedseg.cli import main  # noqa: E402
from hrmedseg.models.onnx_export import OnnxEncoder, export_decoder, export_encoder  # noqa: E402
from hrmedseg.models import EncoderConfig, build_encoder, save_encoder  # noqa: E402
from hrmedseg.models.sam import build_hrmedseg_sam, build_sam_prompt_decoder, save_hrmedseg_sam  # noqa: E402


def test_encoder_export_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    path = export_encoder(encoder, tmp_path / "encoder.onnx", size=64)
    x = torch.randn(2, 3, 64, 64)  # batch 2: the batch axis is dynamic
    with torch.no_grad():
        expected = encoder(x)
    got = OnnxEncoder(path, threads=1)(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.onnx"]  # no temporary left behind


def test_decoder_export_matches_sam_for_any_box_count(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    prompt_encoder.eval(), mask_decoder.eval()
    path = export_decoder(prompt_encoder, mask_decoder, tmp_path / "decoder.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 200.0], [500.0, 500.0, 520.0, 530.0], [0, 0, 1024, 1024],
                          [700.0, 100.0, 900.0, 800.0], [1.0, 2.0, 3.0, 4.0]])
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        ref_masks, ref_iou = mask_decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, False)
    masks, iou = session.run(None, {"embedding": embedding.numpy(), "boxes": boxes.numpy()})
    assert masks.shape == (5, 1, 256, 256)
    np.testing.assert_allclose(masks, ref_masks.numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-4)


def test_cli_both_parts_from_bundle(tmp_path, capsys):
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6), img_size=128))
    model = build_hrmedseg_sam(encoder)
    bundle = save_hrmedseg_sam(model, tmp_path / "model.pt")
    out = tmp_path / "onnx"
    assert main(["export-onnx", "--model", str(bundle), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx"]
    printed = capsys.readouterr().out
    assert printed.count("max abs error") == 3  # embedding, low_res_masks, iou_predictions


def test_cli_names_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export-onnx", "--model", str(bad), "--out", str(tmp_path / "o"), "--part", "encoder"]) == 2
    assert "broken.pt" in capsys.readouterr().err
    assert not (tmp_path / "o" / "encoder.onnx").exists()


def test_encoder_only_file(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6), img_size=64))
    path = save_encoder(encoder, tmp_path / "enc.pt")
    assert main(["export-onnx", "--model", str(path), "--out", str(tmp_path / "o"), "--part", "encoder"]) == 0
    assert (tmp_path / "o" / "encoder.onnx").stat().st_size > 100_000


def _tiny_box_model():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    return build_hrmedseg_sam(encoder).eval()


def test_engine_onnxruntime_backend_exports_once_and_gives_the_reference_masks(tmp_path, monkeypatch):
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models.onnx_export import onnx_cache_dir

    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny_box_model()
    rng = np.random.default_rng(0)
    image = (rng.random((300, 400)) * 200).astype(np.uint8)
    image[100:160, 150:230] = 250
    boxes = np.array([[140.0, 90.0, 240.0, 170.0], [10.0, 10.0, 40.0, 50.0]])
    ort_predictor = BoxPredictor(model, device="cpu", backend="onnxruntime")
    exported = list(onnx_cache_dir().glob("encoder-*.onnx"))
    assert ort_predictor.backend == "onnxruntime" and len(exported) == 1
    reference = BoxPredictor(model, device="cpu", backend="reference")
    for got, want in zip(ort_predictor.predict_boxes(image, boxes), reference.predict_boxes(image, boxes)):
        assert got.region == want.region and abs(got.score - want.score) < 1e-3
        assert want.mask.any() and (got.mask != want.mask).sum() <= 3  # pixels at the threshold only
    stamp = exported[0].stat().st_mtime_ns
    monkeypatch.setenv("HRMEDSEG_BACKEND", "onnxruntime")
    again = BoxPredictor(model, device="cpu")  # same weights: the cached export, not a new one
    assert again.backend == "onnxruntime" and exported[0].stat().st_mtime_ns == stamp
    assert list(onnx_cache_dir().glob("encoder-*.onnx")) == exported


def test_engine_onnxruntime_backend_reexports_a_broken_cache_file_and_refuses_gpus(tmp_path, monkeypatch):
    from hrmedseg.engine.predictor import resolve_backend
    from hrmedseg.errors import InputError
    from hrmedseg.models.onnx_export import cached_onnx_encoder, onnx_cache_dir, weights_digest

    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny_box_model()
    broken = onnx_cache_dir() / f"encoder-{weights_digest(model.image_encoder)[:20]}-1024.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="could not be loaded"):
        encoder = cached_onnx_encoder(model.image_encoder)
    assert broken.stat().st_size > 100_000
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        assert torch.allclose(encoder(x), model.image_encoder(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="CPU only"):  # checked before any GPU is touched
        resolve_backend("onnxruntime", torch.device("cuda"))


def test_onnxruntime_backend_without_the_package_says_what_to_install(monkeypatch):
    import builtins

    from hrmedseg.errors import HRMedSegError
    from hrmedseg.models.onnx_export import cached_onnx_encoder

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(HRMedSegError, match=r"onnxruntime is missing.*\[onnx\]"):
        cached_onnx_encoder(_tiny_box_model().image_encoder)
