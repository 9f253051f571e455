"""BoxPredictor plumbing with a small random model and a stub decoder (geometry, not quality)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from hrmedseg.engine import BoxPredictor, ObjectMask, SparseLabels, paste_object
from hrmedseg.errors import InputError
from hrmedseg.io import BoxClippedWarning, open_image
from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder


def tiny_sam(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    enc = HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    return Sam(
        image_encoder=enc,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(enc.preprocessing.pixel_mean),
        pixel_std=list(enc.preprocessing.pixel_std),
    ).eval()


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


class DiscDecoder:
    """Stub decoder: logits = signed distance (in input px) to the disc inscribed in each box."""

    def __init__(self):
        self.batches = []

    def __call__(self, embedding, boxes):
        self.batches.append(len(boxes))
        c = (torch.arange(256, dtype=torch.float32) * 4 + 2)  # low-res cell centres, input px
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        r = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
        d = torch.sqrt((c[None, :, None] - cy[:, None, None]) ** 2 + (c[None, None, :] - cx[:, None, None]) ** 2)
        return (r[:, None, None] - d)[:, None], torch.full((len(boxes),), 0.9)


def disc_in_box(box, region):
    y0, y1, x0, x1 = region
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    r = min(box[2] - box[0], box[3] - box[1]) / 2
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def boxes_on(shape, n, lo=8, hi=40, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, np.array(shape[::-1]) - hi, (n, 2))
    return np.c_[xy, xy + rng.uniform(lo, hi, (n, 2))]


def test_masks_are_native_discs_at_every_scale(sam):
    image = np.zeros((3000, 2500), np.uint8)
    # (the huge box keeps > half a low-res cell (32 px at 1/16) from the image edge, where
    # logits are clamped to the outermost cell, as in SAM's own upsampling)
    boxes = np.array([[100.2, 200.7, 113.9, 214.1], [1000, 1000, 1400, 1300], [100, 120, 2400, 2900]])
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    objs = list(p.predict_boxes(image, boxes))
    assert [o.crop.scale for o in objs] == [2.0, 0.5, 0.0625]  # (box + context) * scale <= 512
    for o, b in zip(objs, boxes):
        assert o.mask.shape == (o.region[1] - o.region[0], o.region[3] - o.region[2])
        want = disc_in_box(b, o.region)
        # Wrong pixels may only sit on the boundary: bilinear interpolation of a distance field
        # sampled every 4 / scale native px is off by at most cell^2 / (4 R) near a circle.
        y0, y1, x0, x1 = o.region
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        r = min(b[2] - b[0], b[3] - b[1]) / 2
        dist = np.abs(np.hypot(yy - (b[1] + b[3]) / 2, xx - (b[0] + b[2]) / 2) - r)
        cell = 4 / o.crop.scale
        wrong = o.mask != want
        assert dist[wrong].max(initial=0) <= 0.5 + cell**2 / (4 * r), (o.crop, dist[wrong].max())
        assert wrong.sum() < 0.01 * want.sum()
        assert o.score == pytest.approx(0.9) and not o.empty


def test_interactive_policy_enlarges_small_objects_further_for_one_call(sam):
    from hrmedseg.engine import CropPolicy, interactive_policy

    image = np.zeros((3000, 2500), np.uint8)
    boxes = np.array([[100.2, 200.7, 113.9, 214.1], [1000, 1000, 1400, 1300]])
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    fine = interactive_policy(p.policy)
    assert fine.max_upscale == 4.0 and fine.input_size == p.policy.input_size
    assert interactive_policy(CropPolicy(max_upscale=8.0)).max_upscale == 8.0  # a model made for more keeps it
    objs = list(p.predict_boxes(image, boxes, policy=fine))
    assert [o.crop.scale for o in objs] == [4.0, 0.5]  # only the small object changes
    assert [o.crop.scale for o in p.predict_boxes(image, boxes)] == [2.0, 0.5]  # the predictor's own policy
    box = boxes[0]
    for o in objs[:1]:
        assert o.mask.any() and o.region[0] <= box[1] and o.region[1] >= box[3]
    with pytest.raises(InputError, match="256 px input"):
        list(p.predict_boxes(image, boxes, policy=CropPolicy(input_size=256)))


def test_batched_equals_one_by_one(sam):
    image = (np.random.default_rng(3).random((700, 900)) * 3000).astype(np.uint16)
    boxes = boxes_on(image.shape, 5, seed=3)
    # float32 ("fast") on every CPU: this checks the batching logic, at float32's rounding
    a = BoxPredictor(sam, device="cpu", decode_batch=4, backend="fast")
    batched = list(a.predict_boxes(image, boxes))
    assert a.encoder_calls < len(boxes)
    b = BoxPredictor(sam, device="cpu", cache_bytes=0, backend="fast")
    single = [b.predict_box(image, box) for box in boxes]
    for x, y in zip(batched, single):
        assert x.region == y.region and x.crop == y.crop
        assert x.score == pytest.approx(y.score, abs=1e-4)
        assert (x.mask != y.mask).sum() <= 2  # float noise of batched matmuls at the threshold
    assert b.encoder_calls == len(boxes)


def test_cache_hits_misses_bound_and_lru(sam):
    image = np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)
    # one (1, 256, 64, 64) embedding: float32, or bfloat16 where the default backend is "fast-bf16"
    per_embedding = 256 * 64 * 64 * (2 if BoxPredictor(sam, device="cpu").backend == "fast-bf16" else 4)
    p = BoxPredictor(sam, device="cpu", cache_bytes=2 * per_embedding, decoder=DiscDecoder())
    a, b, c = [100, 100, 130, 130], [1500, 1500, 1530, 1530], [2800, 100, 2830, 130]
    p.predict_box(image, a)
    assert p.cache.bytes == per_embedding
    assert (p.cache.misses, p.cache.hits, p.encoder_calls) == (1, 0, 1)
    p.predict_box(image, [105, 110, 125, 128])  # same crop: a hit, no encoder call
    assert (p.cache.hits, p.encoder_calls) == (1, 1)
    p.predict_box(image, b)
    p.predict_box(image, a)  # a becomes most recent
    p.predict_box(image, c)  # evicts b, the least recently used
    assert len(p.cache) == 2 and p.cache.bytes <= 2 * per_embedding and p.cache.evictions == 1
    calls = p.encoder_calls
    p.predict_box(image, a)
    assert p.encoder_calls == calls
    p.predict_box(image, b)
    assert p.encoder_calls == calls + 1
    # a different array with equal pixels is a different source: no stale reuse
    p.predict_box(image.copy(), a)
    assert p.encoder_calls == calls + 2


def test_segment_writes_only_regions_and_reports_everything(sam):
    class Recorder(np.ndarray):
        pass

    labels = np.full((800, 800), 0, np.int32)
    touched = np.zeros((800, 800), bool)

    class Spy:
        shape = labels.shape

        def __getitem__(self, key):
            return labels[key]

        def __setitem__(self, key, value):
            touched[key] = True
            labels[key] = value

    boxes = np.array([[100, 100, 140, 130], [120, 110, 160, 150], [500, 500, 502, 503], [600, 50, 900, 90]])
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    with pytest.warns(BoxClippedWarning):
        out, records = p.segment(np.zeros((800, 800), np.uint8), boxes, labels=Spy(), first_id=10)
    regions = [r.region for r in records]
    allowed = np.zeros_like(touched)
    for y0, y1, x0, x1 in regions:
        allowed[y0:y1, x0:x1] = True
    assert touched.any() and not (touched & ~allowed).any()
    assert [r.id for r in records] == [10, 11, 12, 13]
    assert records[3].box == (600.0, 50.0, 800.0, 90.0)  # clipped
    assert records[2].empty and records[2].area == 0 and records[2].note == "empty mask"  # radius 1 px disc at 2x...
    assert 12 not in labels
    for r in records:
        assert r.area == int((labels == r.id).sum())


def test_overlap_policies(sam):
    boxes = np.array([[100, 100, 160, 160], [130, 130, 190, 190]])
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    img = np.zeros((400, 400), np.uint8)
    new, rec_new = p.segment(img, boxes, overlap="new_wins")
    keep, rec_keep = p.segment(img, boxes, overlap="keep_existing")
    both = disc_in_box(boxes[0], (0, 400, 0, 400)) & disc_in_box(boxes[1], (0, 400, 0, 400))
    assert both.sum() > 100
    assert (new[both] == 2).mean() > 0.99 and (keep[both] == 1).mean() > 0.99
    assert rec_new[0].area < rec_keep[0].area and rec_new[1].area > rec_keep[1].area
    sparse, _ = p.segment(img, boxes, labels=SparseLabels((400, 400), overlap="keep_existing"), overlap="keep_existing")
    np.testing.assert_array_equal(sparse.read(0, 400, 0, 400), keep)
    with pytest.raises(ValueError, match="overlap"):
        p.segment(img, boxes, overlap="merge")
    existing = np.zeros((400, 400), np.int32)
    existing[140:150, 140:150] = 99
    obj = ObjectMask((100, 100, 160, 160), (100, 160, 100, 160), np.ones((60, 60), bool), 1.0)
    assert paste_object(existing, obj, 5, overlap="keep_existing") == 3600 - 100
    assert (existing[140:150, 140:150] == 99).all()


def test_progress_and_cancel(sam):
    boxes = boxes_on((1500, 1500), 12, seed=5)
    dec = DiscDecoder()
    p = BoxPredictor(sam, device="cpu", decoder=dec, decode_batch=2)
    seen = []
    out = list(p.predict_boxes(np.zeros((1500, 1500), np.uint8), boxes, progress=lambda d, t: seen.append((d, t))))
    assert [o.box_index for o in out] == list(range(12))
    assert seen == [(i + 1, 12) for i in range(12)]
    assert max(dec.batches) <= 2
    stop = threading.Event()
    got = []
    for o in p.predict_boxes(np.zeros((1500, 1500), np.uint8), boxes):
        got.append(o)
        break
    gen = p.predict_boxes(np.zeros((1500, 1500), np.uint8), boxes, cancel=stop)
    first = next(gen)
    stop.set()
    rest = list(gen)
    assert first.box_index == 0 and len(rest) < 11


def test_box_reads_only_its_neighbourhood(sam, tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (4096, 4096, 3), dtype=np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, tile=(256, 256), compression="zlib", photometric="rgb")
    image = open_image(path)
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    obj = p.predict_box(image, [3000, 1000, 3030, 1025])
    crop = obj.crop
    assert crop.size == 512
    # the crop (512 x 512 native at any 256-aligned or 128-aligned offset) touches <= 3 x 3 tiles of 256
    assert image.tiles_decoded <= 9, image.tiles_decoded
    assert image.tiles_decoded < (4096 // 256) ** 2 / 20


def test_bad_inputs(sam):
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    img = np.zeros((100, 100), np.uint8)
    with pytest.raises(InputError, match=r"row 2 of boxes \(200, 200, 220, 220\) .*outside"):
        list(p.predict_boxes(img, [[1, 1, 5, 5], [200, 200, 220, 220]]))
    with pytest.raises(InputError, match=r"row 1 of boxes \(nan, 1, 5, 5\) .*NaN"):
        p.predict_box(img, [np.nan, 1, 5, 5])
    with pytest.raises(InputError, match="labels have shape"):
        p.segment(img, [[1, 1, 5, 5]], labels=np.zeros((50, 50), np.int32))
    with pytest.raises(InputError, match="4 dimensions"):
        p.predict_box(np.zeros((2, 2, 100, 100)), [1, 1, 5, 5])
    with pytest.raises(InputError, match="no CUDA"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        BoxPredictor(sam, device="cuda")


def test_sam_predictor_still_works_with_our_model(sam):
    from segment_anything import SamPredictor

    pred = SamPredictor(sam)
    pred.set_image(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    masks, scores, low = pred.predict(box=np.array([50, 60, 150, 170]), multimask_output=False)
    assert masks.shape == (1, 300, 400) and low.shape == (1, 256, 256)


def test_uint16_multichannel_uses_percentiles_and_channel_choice(sam):
    rng = np.random.default_rng(1)
    img = np.stack([rng.integers(100, 200, (300, 300)), rng.integers(1000, 60000, (300, 300)), np.zeros((300, 300))]).astype(np.uint16)
    p = BoxPredictor(sam, device="cpu", decoder=DiscDecoder())
    im = open_image(img, channel=1)
    s = p.scaling(im)
    assert s.lo[0] == pytest.approx(np.percentile(img[1], 1)) and s.hi[0] == pytest.approx(np.percentile(img[1], 99.8))
    p.predict_box(im, [10, 10, 50, 50])
    p.predict_box(open_image(img, channel=0), [10, 10, 50, 50])
    assert p.encoder_calls == 2  # channel choice is part of the cache key
