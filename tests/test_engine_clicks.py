"""Clicks and mask prompts in the engine give what SAM's and SAM2's own predictors give.

A small random-weight model on a 1024 x 1024 image: the engine's crop is then the whole image at
scale 1, so its prompts, logits and masks are comparable one to one with ``SamPredictor`` (and
``SAM2ImagePredictor``) given the same box, clicks and mask input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrmedseg.engine import BoxPredictor, Crop
from hrmedseg.errors import InputError
from test_engine_predictor import tiny_sam

BOX = np.array([300.0, 350.0, 600.0, 640.0])  # box + context fits half the input at scale 1
CLICKS = np.array([[450.0, 500.0], [380.0, 600.0]])
LABELS = np.array([1, 0])


@pytest.fixture(scope="module")
def sam():
    model = tiny_sam(3)
    with torch.no_grad():  # away from the init, so prompts visibly change the logits
        for p in list(model.mask_decoder.parameters()) + list(model.prompt_encoder.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sam_predictor(sam, image):
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor


def _theirs(sam_predictor, **prompts):
    masks, scores, low = sam_predictor.predict(multimask_output=False, return_logits=True, **prompts)
    return masks[0], float(scores[0]), torch.from_numpy(low)


def _assert_logits_close(ours, theirs):
    """Equal wherever ours were computed (the fast backend fills cells beyond every region with -1e4)."""
    computed = ours > -1e3
    assert computed.float().mean() > 0.05
    torch.testing.assert_close(ours[computed], theirs[computed], atol=1e-3, rtol=1e-3)


def _assert_mask_equal(obj, theirs_logits):
    y0, y1, x0, x1 = obj.region
    theirs = theirs_logits[y0:y1, x0:x1]
    sure = np.abs(theirs) > 1e-3  # pixels right at the threshold may round either way
    np.testing.assert_array_equal(obj.mask[sure], (theirs > 0)[sure])


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_box_and_clicks_then_mask_prompt_equal_sam_predictor(sam, image, sam_predictor, backend):
    # click_update "sam" with the mask prompt: SAM's own recomputation (the default "local" update below)
    predictor = BoxPredictor(sam, device="cpu", backend=backend, click_update="sam", click_mask_prompt=True)
    obj = next(predictor.predict_boxes(image, BOX[None], points=[CLICKS], point_labels=[LABELS]))
    assert obj.crop == Crop(1.0, 0, 0, 1024, 1024) and obj.has_box
    masks, score, low = _theirs(sam_predictor, point_coords=CLICKS, point_labels=LABELS, box=BOX)
    _assert_logits_close(obj.low_res_logits, low)
    assert obj.score == pytest.approx(score, abs=1e-4)
    _assert_mask_equal(obj, masks)
    box_only = next(predictor.predict_boxes(image, BOX[None]))
    assert (box_only.low_res_logits - obj.low_res_logits).abs().max() > 0.1, "the clicks must change the logits"

    # The next click: all clicks, and the previous logits as SAM's mask input, on the same crop.
    more, more_labels = np.r_[CLICKS, [[520.0, 420.0]]], np.r_[LABELS, 1]
    again = next(predictor.predict_boxes(image, BOX[None], points=[more], point_labels=[more_labels],
                                         mask_inputs=[obj.low_res_logits], crops=[obj.crop]))
    masks, score, low = _theirs(sam_predictor, point_coords=more, point_labels=more_labels, box=BOX,
                                mask_input=obj.low_res_logits.numpy())
    _assert_logits_close(again.low_res_logits, low)
    _assert_mask_equal(again, masks)
    assert predictor.encoder_calls == 1  # every prompt on the one cached crop


def test_clicks_alone_equal_sam_predictor(sam, image, sam_predictor):
    predictor = BoxPredictor(sam, device="cpu", backend="reference", click_update="local")  # SamPredictor's decode, without the native click fix
    clicks, labels = np.array([[500.0, 500.0], [560.0, 520.0]]), np.array([1, 1])
    obj = next(predictor.predict_boxes(image, None, points=[clicks], point_labels=[labels], object_size=300))
    assert not obj.has_box and obj.crop == Crop(1.0, 0, 0, 1024, 1024)
    # the extent: a 300 px square centred on the positive clicks
    np.testing.assert_allclose(obj.box, [380.0, 360.0, 680.0, 660.0])
    masks, _, low = _theirs(sam_predictor, point_coords=clicks, point_labels=labels)
    _assert_logits_close(obj.low_res_logits, low)
    _assert_mask_equal(obj, masks)


def test_mixed_prompts_in_one_call_equal_one_by_one(sam, image):
    """Objects with 0, 1 and 2 clicks, and one without a box, batched on one crop."""
    predictor = BoxPredictor(sam, device="cpu", backend="fast")
    boxes = np.array([BOX, BOX + 40, [np.nan] * 4, BOX - 30, BOX + 20])
    points = [None, CLICKS[:1], np.array([[500.0, 480.0]]), CLICKS, None]
    labels = [None, [1], [1], LABELS, None]
    together = list(predictor.predict_boxes(image, boxes, points=points, point_labels=labels))
    assert [o.box_index for o in together] == [0, 1, 2, 3, 4] and predictor.encoder_calls == 1
    # one batch per (clicks, box?) group, none padded: {0, 4}, {1}, {2}, {3}
    assert predictor.decoder_calls == 4
    for i, obj in enumerate(together):
        alone = next(predictor.predict_boxes(image, boxes[i : i + 1], points=[points[i]], point_labels=[labels[i]],
                                             object_size=float(BOX[2] - BOX[0])))
        torch.testing.assert_close(obj.low_res_logits, alone.low_res_logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(obj.mask, alone.mask)


def test_bad_prompts_name_the_object(sam):
    predictor = BoxPredictor(sam, device="cpu", backend="reference")
    img = np.zeros((100, 100), np.uint8)
    with pytest.raises(InputError, match="object 1 has neither a box nor points"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5], [np.nan] * 4]))
    with pytest.raises(InputError, match=r"point \(150, 3\) of object 0 lies outside"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5]], points=[[[150, 3]]]))
    with pytest.raises(InputError, match="labels of object 0 must be 1 .* or 0"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5]], points=[[[2, 3]]], point_labels=[[2]]))
    with pytest.raises(InputError, match="object 0 has 1 points but 2 point labels"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5]], points=[[[2, 3]]], point_labels=[[1, 0]]))
    with pytest.raises(InputError, match="points has 2 entries, but there are 1 objects"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5]], points=[None, None]))
    with pytest.raises(InputError, match="object 0 has a mask input but no crop"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5]], mask_inputs=[torch.zeros(1, 256, 256)]))
    first = predictor.predict_box(img, [1, 1, 5, 5])
    with pytest.raises(InputError, match=r"mask inputs of objects \[0\] are \(64, 64\)"):
        list(predictor.predict_boxes(img, [[1, 1, 5, 5]], mask_inputs=[torch.zeros(64, 64)], crops=[first.crop]))
    with pytest.raises(InputError, match=r"row 2 of boxes .*outside"):  # rows stay those of the call (1-based)
        list(predictor.predict_boxes(img, [[np.nan] * 4, [200, 200, 220, 220]], points=[[[2, 2]], None]))


def test_sam2_clicks_and_mask_prompt_equal_sam2_image_predictor(image):
    pytest.importorskip("sam2")
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from test_engine_sam2 import _tiny_sam2

    model = _tiny_sam2()
    predictor = BoxPredictor(model, device="cpu", click_update="sam", click_mask_prompt=True)
    theirs = SAM2ImagePredictor(model)
    theirs.set_image(image)
    obj = next(predictor.predict_boxes(image, BOX[None], points=[CLICKS], point_labels=[LABELS]))
    _, _, low = theirs.predict(point_coords=CLICKS, point_labels=LABELS, box=BOX, multimask_output=False, return_logits=True)
    torch.testing.assert_close(obj.low_res_logits.clamp(-32, 32), torch.from_numpy(low), atol=1e-4, rtol=1e-4)
    again = next(predictor.predict_boxes(image, BOX[None], points=[CLICKS], point_labels=[LABELS],
                                         mask_inputs=[obj.low_res_logits], crops=[obj.crop]))
    _, _, low = theirs.predict(point_coords=CLICKS, point_labels=LABELS, box=BOX, mask_input=obj.low_res_logits.numpy(),
                               multimask_output=False, return_logits=True)
    torch.testing.assert_close(again.low_res_logits.clamp(-32, 32), torch.from_numpy(low), atol=1e-4, rtol=1e-4)
    assert predictor.encoder_calls == 1


def test_local_click_update_changes_only_the_clicked_part():
    from hrmedseg.engine.click_update import local_click_update

    old = torch.full((2, 1, 64, 64), -5.0)
    old[:, :, 20:40, 20:40] = 5.0  # the previous mask: a square
    new = old.clone()
    new[:, :, 27:33, 40:46] = 5.0  # the new mask adds a band on the right (the click's side) ...
    new[:, :, 10:14, 2:6] = 5.0  # ... and a blob far away
    new[:, :, 20:24, 20:40] = -5.0  # ... and drops the top rows
    clicks = np.array([[43.0, 30.0], [60.0, 60.0]])  # object 0 clicks in the band; object 1 on background
    boxes = np.array([[20, 20, 40, 40]] * 2, float)
    out = local_click_update(new, old, clicks, np.array([True, True]), boxes)
    grown = old[0, 0] > 0
    grown[27:33, 40:46] = True  # only the clicked band joins the mask: not the blob, the top rows stay
    assert torch.equal(out[0, 0] > 0, grown)
    changed = out[0, 0] != old[0, 0]
    assert torch.equal(out[0, 0][changed], new[0, 0][changed])  # new logits there, the old ones elsewhere
    assert torch.equal(out[1], old[1])  # the new mask does not cover the click: nothing changes
    # a negative click in the dropped rows removes part of them (near the click) and nothing else
    out = local_click_update(new[:1], old[:1], np.array([[30.0, 21.0]]), np.array([False]), boxes[:1])
    removed = (old[0, 0] > 0) & ~(out[0, 0] > 0)
    assert removed[21, 30] and not removed[24:].any() and not (out[0, 0] > old[0, 0]).any()


def test_local_click_update_keeps_the_previous_logits_away_from_the_click(sam, image):
    predictor = BoxPredictor(sam, device="cpu", backend="reference", click_update="local")
    assert BoxPredictor(sam, device="cpu", backend="reference").click_update == "pixel" and not predictor.click_mask_prompt
    first = next(predictor.predict_boxes(image, BOX[None]))
    click = np.array([[BOX[0] + 5.0, BOX[1] + 5.0]])
    again = next(predictor.predict_boxes(image, BOX[None], points=[click], point_labels=[np.array([1])],
                                         mask_inputs=[first.low_res_logits], crops=[first.crop]))
    changed = (again.low_res_logits != first.low_res_logits)[0]
    ys, xs = torch.nonzero(changed, as_tuple=True)
    if len(ys):  # the change holds the click's grid cell and lies within the grown box
        to_grid = 256 / 1024
        bx0, by0, bx1, by1 = BOX * to_grid
        pad = 0.5 * max(bx1 - bx0, by1 - by0)
        assert xs.min() >= bx0 - pad - 1 and xs.max() <= bx1 + pad + 1 and ys.min() >= by0 - pad - 1 and ys.max() <= by1 + pad + 1
    sam_way = BoxPredictor(sam, device="cpu", backend="reference", click_update="sam")
    recomputed = next(sam_way.predict_boxes(image, BOX[None], points=[click], point_labels=[np.array([1])],
                                            mask_inputs=[first.low_res_logits], crops=[first.crop]))
    assert changed.float().mean() < (recomputed.low_res_logits != first.low_res_logits).float().mean()


def _bumpy_logits(shape, seed):
    """(H, W) float32 smooth logits with a blob in the middle and random bumps (for the click fix)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = 12.0 - np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    return (blob + ndimage.gaussian_filter(rng.normal(0, 30, shape), 3)).astype(np.float32)


@pytest.mark.parametrize("fade", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_click_fix_flips_every_clicked_pixel_and_nothing_beyond_its_disc(seed, fade):
    from hrmedseg.engine.click_update import ClickFix, fix_clicked_pixels

    region = (100, 160, 200, 260)  # native (y0, y1, x0, x1)
    field = _bumpy_logits((60, 60), seed)
    logits_at = lambda w: field[w[0] - 100 : w[1] - 100, w[2] - 200 : w[3] - 200]  # noqa: E731
    mask = field > 0
    rng = np.random.default_rng(seed)
    fix = ClickFix(reach=2.0, margin=0.5, max_radius=0.25, fade=fade)
    box_side = 40.0
    for _ in range(8):  # one click at a time, as the annotator gives them
        yx = rng.integers(0, 60, 2)
        label = int(not mask[yx[0], yx[1]])  # a click says the pixel is wrong
        click = np.array([[200 + yx[1] + 0.5, 100 + yx[0] + 0.5]])
        fixed = fix_clicked_pixels(mask, region, logits_at, click, np.array([label]), box_side, fix)
        assert fixed[yx[0], yx[1]] == bool(label)
        changed = np.argwhere(fixed != mask)
        assert (np.hypot(*(changed - yx).T) <= fix.max_radius * box_side + 1e-9).all()
        assert (fixed[changed[:, 0], changed[:, 1]] == bool(label)).all()  # a positive click only adds, a negative one only removes
        again = fix_clicked_pixels(mask, region, logits_at, click, np.array([label]), box_side, fix)
        np.testing.assert_array_equal(fixed, again)  # deterministic
        mask = fixed
    # a click on a pixel that already has its label, or outside the region, changes nothing
    inside = np.argwhere(mask)[0]
    same = fix_clicked_pixels(mask, region, logits_at, np.array([[200 + inside[1] + 0.5, 100 + inside[0] + 0.5], [10.0, 10.0]]),
                              np.array([1, 1]), box_side, fix)
    np.testing.assert_array_equal(same, mask)


def test_click_fix_follows_the_logits_near_the_click():
    """A positive click in a missed band just outside the mask fills the band's part above the clicked pixel's logit, near it."""
    from hrmedseg.engine.click_update import ClickFix, fix_clicked_pixels

    yy, xx = np.mgrid[:40, :40]
    field = (10.0 - xx).astype(np.float32)  # the mask: x < 10; the logit falls to the right
    logits_at = lambda w: field[w[0] : w[1], w[2] : w[3]]  # noqa: E731
    fixed = fix_clicked_pixels(field > 0, (0, 40, 0, 40), logits_at, np.array([[12.5, 20.5]]), np.array([1]), 40.0, ClickFix(2.0, 0.0, 0.5))
    added = fixed & ~(field > 0)
    assert added[20, 12] and added[:, 13:].sum() == 0  # up to the clicked pixel's level, not past it
    assert added[20, 10:13].all() and not added[:10, 10].any()  # in the disc of 2 depths + 1 around the click only


@pytest.mark.parametrize("power, reach_of_minus_one", [(1.0, 10), (0.5, 15)])
def test_faded_click_fix_moves_the_boundary_most_at_the_click(power, reach_of_minus_one):
    """With ``fade`` the threshold falls to the clicked pixel's logit (-2) there and back to the
    mask's own at max_radius box sides: the band of logit -1 joins near the click only (where
    2 (1 - d / 20) ** power >= 1), that of 0 all along the 20 px."""
    from hrmedseg.engine.click_update import ClickFix, fix_clicked_pixels

    yy, xx = np.mgrid[:40, :40]
    field = (10.0 - xx).astype(np.float32)  # the mask: x < 10; the logit falls to the right
    logits_at = lambda w: field[w[0] : w[1], w[2] : w[3]]  # noqa: E731
    fix = ClickFix(max_radius=0.5, fade=True, fade_power=power)  # 20 px for a 40 px box
    fixed = fix_clicked_pixels(field > 0, (0, 40, 0, 40), logits_at, np.array([[12.5, 20.5]]), np.array([1]), 40.0, fix)
    added = fixed & ~(field > 0)
    assert added[20, 12] and added[:, 13:].sum() == 0  # never past the clicked pixel's level
    rows = np.flatnonzero(added[:, 11])  # d = hypot(1, row - 20) <= reach_of_minus_one
    assert rows.min() == 20 - (reach_of_minus_one - 1) and rows.max() == 20 + (reach_of_minus_one - 1)
    assert added[1:, 10].all() and not added[0, 10]  # logit 0: within the 20 px cap


def test_pixel_click_update_flips_the_clicked_pixel_and_reruns_exactly(sam, image):
    """The "pixel" update: the box's own logits, every click's pixel set on the native mask; the
    same box and clicks give the same mask with or without the previous logits (a store re-run)."""
    box_only = BoxPredictor(sam, device="cpu", backend="reference")
    pixel = BoxPredictor(sam, device="cpu", backend="reference", click_update="pixel")
    first = next(box_only.predict_boxes(image, BOX[None]))
    y0, _, x0, _ = first.region
    wrong = np.argwhere(~first.mask)  # a background pixel inside the box: the click says it is foreground
    wrong = wrong[(wrong[:, 0] + y0 > BOX[1]) & (wrong[:, 0] + y0 < BOX[3]) & (wrong[:, 1] + x0 > BOX[0]) & (wrong[:, 1] + x0 < BOX[2])][0]
    click = np.array([[x0 + wrong[1] + 0.5, y0 + wrong[0] + 0.5]])
    kw = dict(points=[click], point_labels=[np.array([1])])
    fixed = next(pixel.predict_boxes(image, BOX[None], mask_inputs=[first.low_res_logits], crops=[first.crop], **kw))
    assert fixed.region == first.region and fixed.mask[tuple(wrong)]
    assert torch.equal(fixed.low_res_logits, first.low_res_logits)  # the box's logits: the clicks act on the native mask only
    assert not (first.mask & ~fixed.mask).any()  # a positive click only adds
    changed = np.argwhere(fixed.mask != first.mask)
    assert (np.hypot(*(changed - wrong).T) <= 0.5 * (BOX[2] - BOX[0]) + 1e-9).all()  # within the disc's bound
    rerun = next(pixel.predict_boxes(image, BOX[None], **kw))  # box and clicks alone, as the store keeps them
    np.testing.assert_array_equal(rerun.mask, fixed.mask)
    # a negative click on the same pixel afterwards: the later click wins
    kw2 = dict(points=[np.r_[click, click]], point_labels=[np.array([1, 0])])
    second = next(pixel.predict_boxes(image, BOX[None], mask_inputs=[fixed.low_res_logits], crops=[fixed.crop], **kw2))
    assert not second.mask[tuple(wrong)]
    sam_way = next(pixel.predict_boxes(image, BOX[None], click_update="sam", **kw))  # SAM's update stays SAM's
    plain_sam = next(box_only.predict_boxes(image, BOX[None], click_update="sam", **kw))
    np.testing.assert_array_equal(sam_way.mask, plain_sam.mask)


def test_a_models_own_click_fix_comes_from_beside_its_weights(tmp_path):
    """``<weights>.click_fix.json`` sets the predictor's click fix; an explicit one wins; a bad
    record is an error naming the file; without one the defaults hold."""
    from hrmedseg.engine.click_update import ClickFix
    from hrmedseg.errors import WeightsError
    from hrmedseg.models import EncoderConfig, HRMedSegEncoder
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam

    torch.manual_seed(0)
    weights = save_hrmedseg_sam(build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))),
                                tmp_path / "box.pt")
    assert BoxPredictor(str(weights), device="cpu").click_fix == ClickFix()
    sidecar = tmp_path / "box.click_fix.json"
    sidecar.write_text('{"fade": true, "max_radius": 0.3, "provenance": {"on": "a test"}}')
    assert BoxPredictor(str(weights), device="cpu").click_fix == ClickFix(max_radius=0.3, fade=True)
    assert BoxPredictor(str(weights), device="cpu", click_fix=ClickFix(reach=2.0)).click_fix == ClickFix(reach=2.0)
    sidecar.write_text('{"fade": true, "fade_power": 0.5}')
    assert BoxPredictor(str(weights), device="cpu").click_fix == ClickFix(fade=True, fade_power=0.5)
    sidecar.write_text('{"fade": true, "speed": 2}')
    with pytest.raises(WeightsError, match=r"box\.click_fix\.json.*speed"):
        BoxPredictor(str(weights), device="cpu")
    sidecar.write_text('{"fade": ')
    with pytest.raises(WeightsError, match=r"box\.click_fix\.json"):
        BoxPredictor(str(weights), device="cpu")


def test_the_shipped_default_model_fades_its_clicks():
    from hrmedseg.engine.predictor import model_click_fix
    from hrmedseg.models import load_model_with_metadata

    fix = model_click_fix(load_model_with_metadata("hrmedseg_sam_default").metadata)
    assert fix.fade and fix.max_radius == 0.35 and fix.fade_power == 0.5
