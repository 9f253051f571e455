"""The box engine's default (fast) backend against the plain PyTorch reference (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from hrmedseg.engine import BoxPredictor, CropPolicy, SamBoxDecoder, logits_to_native, plan_crops
from hrmedseg.engine.crops import mask_region
from hrmedseg.engine.decoder import RegionBoxDecoder, region_margin
from hrmedseg.errors import InputError
from hrmedseg.io import open_image
from hrmedseg.models.fast_decoder import FastSamBoxDecoder, regions_from_boxes
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder
from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
from hrmedseg.models.runtime import select_backend


def prompt_and_mask_decoder():
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt, decoder


def tiny_sam(image_encoder=None, seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    enc = image_encoder or HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    prompt, decoder = prompt_and_mask_decoder()
    return Sam(image_encoder=enc, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("HRMEDSEG_BACKEND", raising=False)


def textured_image(h: int = 640, w: int = 704, seed: int = 0) -> np.ndarray:
    """Smooth random texture with bright blobs (uint8 RGB): gives the encoder something to see."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, h // 16, w // 16)).astype(np.float32))
    img = torch.nn.functional.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in rng.uniform([0, 0, 5], [h, w, 30], (25, 3)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 250
    return img.clip(0, 255).astype(np.uint8)


def test_default_is_fast_on_cpu_bf16_with_amx_and_reference_on_request(sam, monkeypatch):
    monkeypatch.setattr("hrmedseg.models.runtime.cpu_has_amx_bf16", lambda: False)
    fast = BoxPredictor(sam, device="cpu")
    assert fast.backend == "fast"
    assert isinstance(fast.encoder.image_encoder, FastHRMedSegEncoder) and not fast.encoder.image_encoder.bf16
    assert isinstance(fast.decoder, RegionBoxDecoder) and isinstance(fast.decoder, FastSamBoxDecoder)

    monkeypatch.setattr("hrmedseg.models.runtime.cpu_has_amx_bf16", lambda: True)
    amx = BoxPredictor(sam, device="cpu")
    assert amx.backend == "fast-bf16" and amx.encoder.image_encoder.bf16
    assert isinstance(amx.decoder, FastSamBoxDecoder)
    # the static rule (no calibration) keeps the decoder float32: bf16 only where it was measured faster
    assert amx.decoder.dtype == fast.decoder.dtype == torch.float32
    assert BoxPredictor(sam, device="cpu", allow_bf16=False).backend == "fast"

    ref = BoxPredictor(sam, device="cpu", backend="reference")
    assert ref.backend == "reference"
    assert ref.encoder.image_encoder is sam.image_encoder
    assert type(ref.decoder) is SamBoxDecoder

    monkeypatch.setenv("HRMEDSEG_BACKEND", "reference")
    from_env = BoxPredictor(sam, device="cpu")
    assert from_env.backend == "reference" and type(from_env.decoder) is SamBoxDecoder

    # the embedding cache key tells the backends apart
    image = open_image(np.zeros((100, 100), np.uint8))
    crop = plan_crops(np.array([[10.0, 10, 30, 30]]), image.shape_yx, fast.policy)[0]
    assert fast._cache_key(image, crop, fast.scaling(image)) != ref._cache_key(image, crop, ref.scaling(image))


def test_bad_backend_names_the_choices(sam, monkeypatch):
    with pytest.raises(InputError, match="reference"):
        BoxPredictor(sam, device="cpu", backend="turbo")
    monkeypatch.setenv("HRMEDSEG_BACKEND", "turbo")
    with pytest.raises(InputError, match="HRMEDSEG_BACKEND"):
        BoxPredictor(sam, device="cpu")


def test_non_hrmedseg_encoder_keeps_its_own_forward():
    vit = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=1, num_heads=1, out_chans=256, window_size=4)
    model = tiny_sam(vit)
    p = BoxPredictor(model, device="cpu")
    assert p.backend == select_backend("cpu")
    assert p.encoder.image_encoder is vit  # no fast path for SAM's ViT: the model's own module
    assert isinstance(p.decoder, RegionBoxDecoder)


@pytest.mark.parametrize("max_upscale", [1.0, 2.0, 4.0, 8.0])
def test_region_margin_covers_every_logit_read(max_upscale):
    """Logits -1e4 outside the decoder's regions, +1 inside: every native pixel of each box's
    mask region must come out True, i.e. bilinear sampling never reads a cell outside."""
    rng = np.random.default_rng(int(max_upscale))
    policy = CropPolicy(max_upscale=max_upscale)
    shape = (900, 1300)
    wh = np.exp(rng.uniform(np.log(3), np.log(700), (60, 2)))
    xy = rng.uniform(-20, np.array(shape[::-1]) - wh + 20)
    boxes = np.c_[xy, xy + wh]
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, shape[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, shape[0])
    boxes[:4] = [[0, 0, 7.3, 9.9], [shape[1] - 11.5, shape[0] - 4.2, shape[1], shape[0]], [0, 400.25, 30, 420], [12.5, 12.5, 13.5, 13.5]]
    crops = plan_crops(boxes, shape, policy)
    for box, crop in zip(boxes, crops):
        margin = region_margin(box[None], crop, policy, shape, 256)
        lr_margin = max(policy.mask_fraction * max(box[2] - box[0], box[3] - box[1]), policy.min_mask_px) * crop.scale / 4
        assert margin <= np.ceil(lr_margin) + 3  # covers, without computing much more
        region_lr = regions_from_boxes(torch.tensor(crop.box_to_input(box[None]), dtype=torch.float32), 1024, 256, margin)[0]
        x0, y0, x1, y1 = region_lr.tolist()
        logits = torch.full((256, 256), -1e4)
        logits[y0:y1, x0:x1] = 1.0
        region = mask_region(box, crop, policy, shape)
        assert logits_to_native(logits, crop, region).all(), (box, crop, margin, region_lr)


def test_fast_backend_gives_the_reference_masks(sam):
    image = textured_image()
    h, w = image.shape[:2]
    boxes = np.array([
        [200.0, 210.0, 222.0, 236.0],  # three nuclei-sized boxes in one crop
        [230.5, 205.0, 251.0, 229.5],
        [190.0, 240.0, 215.0, 262.0],
        [0.0, 0.0, 20.0, 25.0],  # on the top-left corner
        [w - 22.0, h - 18.0, w, h],  # on the bottom-right corner
        [w - 85.0, 300.0, w - 3.0, 370.0],  # medium, near the right edge
        [100.0, 250.0, 520.0, 600.0],  # large: a downscaled crop
    ])
    ref = BoxPredictor(sam, device="cpu", backend="reference", decode_batch=2)
    fast = BoxPredictor(sam, device="cpu", backend="fast", decode_batch=2)
    ref_objs = list(ref.predict_boxes(image, boxes))
    fast_objs = list(fast.predict_boxes(image, boxes))
    assert fast.backend == "fast"
    assert fast.encoder_calls == ref.encoder_calls < len(boxes)  # crops are shared as before
    assert len({o.crop for o in ref_objs}) < len(boxes)
    assert {o.crop.scale for o in ref_objs} >= {2.0, 0.5}
    assert fast.decoder.margin is not None and fast.decoder.margin < 64  # regions, not the full grid

    informative = 0
    lazy = open_image(image)
    for i, (r, f) in enumerate(zip(ref_objs, fast_objs)):
        assert (r.region, r.crop, r.level) == (f.region, f.crop, f.level)
        assert abs(r.score - f.score) < 1e-4, i
        informative += bool(r.mask.any() and not r.mask.all())
        differ = r.mask != f.mask
        if differ.any():
            # only pixels whose reference logit lies within 1e-4 of the threshold may flip
            emb, _ = ref.embedding(lazy, r.crop)
            logits, _ = ref.decoder(emb, torch.from_numpy(r.crop.box_to_input(boxes[i : i + 1])))
            near = logits_to_native(logits[0, 0], r.crop, r.region, -1e-4) & ~logits_to_native(logits[0, 0], r.crop, r.region, 1e-4)
            assert differ.sum() <= 5 and not (differ & ~near).any(), (i, int(differ.sum()))
    assert informative >= 3  # masks with both labels: the comparison can fail


def test_bf16_backend_stays_close_to_the_reference(sam):
    """The default on GPUs and AMX CPUs: bf16 encoder products, so close masks, not equal ones."""
    image = textured_image()
    boxes = np.array([[200.0, 210.0, 222.0, 236.0], [230.5, 205.0, 251.0, 229.5], [0.0, 0.0, 20.0, 25.0], [100.0, 250.0, 520.0, 600.0]])
    ref = BoxPredictor(sam, device="cpu", backend="reference")
    bf16 = BoxPredictor(sam, device="cpu", backend="fast-bf16")
    assert bf16.encoder.image_encoder.bf16
    for r, f in zip(ref.predict_boxes(image, boxes), bf16.predict_boxes(image, boxes)):
        assert (r.region, r.crop) == (f.region, f.crop)
        assert r.mask.any() and not r.mask.all()
        assert 2 * (r.mask & f.mask).sum() / (r.mask.sum() + f.mask.sum()) > 0.99
        assert abs(r.score - f.score) < 1e-2


def test_fast_cache_hits_and_allow_bf16_false_keeps_float32(sam):
    p = BoxPredictor(sam, device="cpu", allow_bf16=False)
    image = textured_image(200, 200)
    a = p.predict_box(image, [50, 50, 70, 75])
    b = p.predict_box(image, [80, 60, 100, 90])  # same crop: cached embedding, no new encoder call
    assert p.encoder_calls == 1 and a.crop == b.crop
    assert p.backend == "fast" and not p.encoder.image_encoder.bf16
