"""FastMaskDecoder equals segment-anything's MaskDecoder: full grid, box regions, mask inputs."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.models.fast_decoder import FastMaskDecoder, paste_regions, regions_from_boxes
from hrmedseg.models.sam import build_sam_prompt_decoder


@pytest.fixture(scope="module")
def sam_parts():
    torch.manual_seed(0)
    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    with torch.no_grad():  # move away from the init so LayerNorms and biases matter
        for p in list(mask_decoder.parameters()) + list(prompt_encoder.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return prompt_encoder.eval(), mask_decoder.eval()


def _boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = torch.randint(8, 300, (n, 2), generator=g).float()
    xy = torch.rand(n, 2, generator=g) * (1024 - wh)
    return torch.cat([xy, xy + wh], dim=1)


@torch.no_grad()
def _sam_reference(sam_parts, embedding, boxes, multimask=False):
    """(sparse, dense, image_pe, masks, iou) of segment-anything's own decoder for ``boxes``."""
    prompt_encoder, mask_decoder = sam_parts
    sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
    image_pe = prompt_encoder.get_dense_pe()
    return (sparse, dense, image_pe, *mask_decoder(embedding, image_pe, sparse, dense, multimask))


@pytest.mark.parametrize("multimask", [False, True])
def test_full_grid_equals_sam(sam_parts, multimask):
    prompt_encoder, mask_decoder = sam_parts
    embedding = torch.randn(1, 256, 64, 64)
    sparse, dense, image_pe, ref_masks, ref_iou = _sam_reference(sam_parts, embedding, _boxes(3, 1), multimask)
    with torch.no_grad():
        fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
        fast.prepare(embedding, image_pe)
        out = fast.predict(sparse, dense, multimask_output=multimask)
    assert out.masks.shape == ref_masks.shape == (3, 3 if multimask else 1, 256, 256)
    assert torch.allclose(out.masks, ref_masks, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.iou_predictions, ref_iou, atol=1e-5)


def test_regions_equal_sam_inside_each_box_and_chunking(sam_parts):
    prompt_encoder, mask_decoder = sam_parts
    embedding = torch.randn(1, 256, 64, 64)
    boxes = _boxes(11, 2)
    boxes[0] = torch.tensor([0.0, 0.0, 1024.0, 1024.0])  # the whole grid
    boxes[1] = torch.tensor([1000.0, 3.0, 1023.0, 9.0])  # at the border, a few pixels tall
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        image_pe = prompt_encoder.get_dense_pe()
        ref_masks, ref_iou = mask_decoder(embedding, image_pe, sparse, dense, False)
        fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
        fast.prepare(embedding, image_pe)
        regions = regions_from_boxes(boxes, margin=3)
        out = fast.predict(sparse, None, regions, chunk_size=4)  # 3 chunks
    assert regions[0].tolist() == [0, 0, 256, 256]
    assert len(out.masks) == 11
    for k, (mask, (x0, y0, x1, y1)) in enumerate(zip(out.masks, regions.tolist())):
        assert mask.shape == (1, y1 - y0, x1 - x0)
        assert torch.allclose(mask, ref_masks[k, :, y0:y1, x0:x1], atol=1e-4, rtol=1e-4), k
    assert torch.allclose(out.iou_predictions, ref_iou, atol=1e-5)
    pasted = paste_regions(out.masks, regions, (256, 256))
    inside = pasted > -1e4
    assert torch.allclose(pasted[inside], ref_masks[inside], atol=1e-4, rtol=1e-4)


def test_first_single_box_skips_shared_projections_and_matches_later_boxes(sam_parts):
    """A crop's first box alone is decoded without block 0's shared projections (re-associated);
    the second call projects them, laid out for in-place products; both paths give SAM's logits."""
    prompt_encoder, mask_decoder = sam_parts
    embedding = torch.randn(1, 256, 64, 64)
    sparse, _, image_pe, ref_masks, ref_iou = _sam_reference(sam_parts, embedding, _boxes(2, 7))
    with torch.no_grad():
        fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
        crop = fast.prepare(embedding, image_pe)
        first = fast.predict(sparse[:1])
        assert crop.k0 is None and crop.q0 is None and crop.v0 is None
        again = fast.predict(sparse[:1])
        assert crop.k0 is not None
        # laid out so each box's products read them in place: PE rows with a plain batch stride
        # (not .contiguous()'s leftover of a size-1 dim), block-0 queries transposed
        n, c, heads = 64 * 64, 256, mask_decoder.transformer.layers[0].cross_attn_image_to_token.num_heads
        assert crop.pe.stride() == (n * c, c, 1)
        assert crop.q0.shape == (1, heads, c // 2 // heads, n) and crop.q0.is_contiguous()
        second = fast.predict(sparse[1:])
        batch = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
        batch_crop = batch.prepare(embedding, image_pe)
        both = batch.predict(sparse, chunk_size=1)  # several boxes: projected before the first
        assert batch_crop.k0 is not None
    for out, ref in ((first, ref_masks[:1]), (again, ref_masks[:1]), (second, ref_masks[1:]), (both, ref_masks)):
        assert torch.allclose(out.masks, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(first.masks, again.masks, atol=1e-5, rtol=1e-5)
    assert torch.allclose(first.iou_predictions, ref_iou[:1], atol=1e-5)


def test_regions_cover_boxes_with_margin():
    boxes = torch.tensor([[100.0, 200.0, 300.0, 260.0], [-5.0, 1000.0, 20.0, 1030.0]])
    regions = regions_from_boxes(boxes, margin=2)
    assert regions.tolist() == [[23, 48, 77, 67], [0, 248, 7, 256]]


def test_mask_input_uses_per_box_image_side(sam_parts):
    prompt_encoder, mask_decoder = sam_parts
    embedding = torch.randn(1, 256, 64, 64)
    boxes = _boxes(2, 3)
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=torch.randn(2, 1, 256, 256))
        image_pe = prompt_encoder.get_dense_pe()
        ref_masks, _ = mask_decoder(embedding, image_pe, sparse, dense, True)
        fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
        fast.prepare(embedding, image_pe)
        out = fast.predict(sparse, dense, multimask_output=True)
    assert torch.allclose(out.masks, ref_masks, atol=1e-4, rtol=1e-4)


def test_other_grid_size_and_errors(sam_parts):
    prompt_encoder, mask_decoder = sam_parts
    fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
    sparse = torch.randn(2, 2, 256)
    with pytest.raises(RuntimeError, match="before prepare"):
        fast.predict(sparse)
    embedding, image_pe = torch.randn(1, 256, 16, 24), torch.randn(1, 256, 16, 24)
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 16, 24)
    with torch.no_grad():
        ref_masks, _ = mask_decoder(embedding, image_pe, sparse, dense, False)
        fast.prepare(embedding, image_pe)
        out = fast.predict(sparse, dense)
        assert torch.allclose(out.masks, ref_masks, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="outside"):
            fast.predict(sparse, regions=torch.tensor([[0, 0, 10, 10], [90, 0, 100, 10]]))
        with pytest.raises(ValueError, match=r"\(B, 4\)"):
            fast.predict(sparse, regions=torch.tensor([[0, 0, 10, 10]]))


def test_engine_drop_in_equals_engine_sam_decoder(sam_parts):
    from hrmedseg.engine.decoder import SamBoxDecoder
    from hrmedseg.models.fast_decoder import FastSamBoxDecoder

    prompt_encoder, mask_decoder = sam_parts
    model = torch.nn.Module()
    model.prompt_encoder, model.mask_decoder = prompt_encoder, mask_decoder
    embedding = torch.randn(1, 256, 64, 64)
    boxes = _boxes(4, 5)
    for multimask in (False, True):
        ref_logits, ref_scores = SamBoxDecoder(model, multimask=multimask)(embedding, boxes)
        fast = FastSamBoxDecoder(model, multimask=multimask)
        logits, scores = fast(embedding, boxes[:2])  # two calls on one crop: prepared once
        logits2, scores2 = fast(embedding, boxes[2:])
        assert torch.allclose(torch.cat([logits, logits2]), ref_logits, atol=1e-4, rtol=1e-4)
        assert torch.allclose(torch.cat([scores, scores2]), ref_scores, atol=1e-5)
    single, _ = SamBoxDecoder(model)(embedding, boxes)
    limited, _ = FastSamBoxDecoder(model, margin=4)(embedding, boxes)
    inside = limited > -1e4
    assert 0 < inside.float().mean() < 1
    assert torch.allclose(limited[inside], single[inside], atol=1e-4, rtol=1e-4)
    # A new embedding (another crop) is prepared again, not served from the old one.
    other = torch.randn(1, 256, 64, 64)
    ref_other, _ = SamBoxDecoder(model)(other, boxes)
    fast = FastSamBoxDecoder(model)
    fast(embedding, boxes)
    assert torch.allclose(fast(other, boxes)[0], ref_other, atol=1e-4, rtol=1e-4)


def test_engine_drop_in_follows_new_prompt_encoder_weights(sam_parts):
    """The dense PE is kept between crops; new Gaussian weights (a reload) are seen, and so are
    new mask decoder weights in a decoder built after loading them."""
    import copy

    from hrmedseg.engine.decoder import SamBoxDecoder
    from hrmedseg.models.fast_decoder import FastSamBoxDecoder

    model = torch.nn.Module()
    model.prompt_encoder, model.mask_decoder = copy.deepcopy(sam_parts)
    boxes = _boxes(3, 6)
    fast = FastSamBoxDecoder(model)
    fast(torch.randn(1, 256, 64, 64), boxes)
    with torch.no_grad():
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(1.5)
    embedding = torch.randn(1, 256, 64, 64)
    ref, _ = SamBoxDecoder(model)(embedding, boxes)
    assert torch.allclose(fast(embedding, boxes)[0], ref, atol=1e-4, rtol=1e-4)
    other = copy.deepcopy(model.mask_decoder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.mask_decoder.load_state_dict(other.state_dict())
    ref, _ = SamBoxDecoder(model)(embedding, boxes)
    assert torch.allclose(FastSamBoxDecoder(model)(embedding, boxes)[0], ref, atol=1e-4, rtol=1e-4)


def test_bf16_decoder_is_close_to_float32_and_leaves_the_model_alone(sam_parts):
    """dtype=bfloat16 decodes a bf16 copy (float32 heads, float32 logits out), close to float32's
    logits and masks, for boxes and for clicks with a mask prompt; the model's decoder stays float32."""
    from hrmedseg.engine.decoder import SamBoxDecoder
    from hrmedseg.models.fast_decoder import FastSamBoxDecoder

    prompt_encoder, mask_decoder = sam_parts
    model = torch.nn.Module()
    model.prompt_encoder, model.mask_decoder = prompt_encoder, mask_decoder
    embedding = torch.randn(1, 256, 64, 64)
    boxes = _boxes(6, 7)
    ref, ref_scores = SamBoxDecoder(model)(embedding, boxes)
    fast = FastSamBoxDecoder(model, dtype=torch.bfloat16)
    logits, scores = fast(embedding, boxes)
    assert logits.dtype == scores.dtype == torch.float32
    assert next(mask_decoder.parameters()).dtype == torch.float32  # a copy was cast, not the model's
    assert next(fast.fast.decoder.output_hypernetworks_mlps.parameters()).dtype == torch.float32
    assert next(fast.fast.transformer.parameters()).dtype == torch.bfloat16
    scale = ref.abs().mean()
    assert (logits - ref).abs().mean() < 0.02 * scale  # bf16's 8-bit mantissa, not another model
    assert ((logits > 0) == (ref > 0)).float().mean() > 0.99
    assert torch.allclose(scores, ref_scores, atol=0.02)
    # A click and the previous logits as mask prompt take the per-object image side, in bf16 too.
    points, labels = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2, torch.ones(6, 1)
    ref_click, _ = SamBoxDecoder(model)(embedding, boxes, points=points, point_labels=labels, mask_inputs=ref)
    click, _ = fast(embedding, boxes, points=points, point_labels=labels, mask_inputs=logits)
    assert ((click > 0) == (ref_click > 0)).float().mean() > 0.99


def test_bf16_masks_do_not_depend_on_which_box_came_first_on_a_crop(sam_parts):
    """A box's bf16 logits are the same whether it was its crop's first box or a later one (float32
    is exact enough for the first box's cheaper path; bf16 rounding is not, so it always shares)."""
    from hrmedseg.models.fast_decoder import FastSamBoxDecoder

    model = torch.nn.Module()
    model.prompt_encoder, model.mask_decoder = sam_parts
    embedding = torch.randn(1, 256, 64, 64)
    boxes = _boxes(3, 8)
    first = FastSamBoxDecoder(model, margin=4, dtype=torch.bfloat16)
    alone, _ = first(embedding, boxes[:1])  # the crop's first box
    later = FastSamBoxDecoder(model, margin=4, dtype=torch.bfloat16)
    later(embedding, boxes[1:])
    again, _ = later(embedding, boxes[:1])  # the same box after others on the crop
    assert torch.equal(alone, again)
