"""SAM's interactive training recipe (training/clicks.py): the simulated annotator, the schedule,
the decoder inputs against the engine's for the same box and clicks, and a --clicks run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from hrmedseg.engine import BoxPredictor, Crop
from hrmedseg.models.info import LoadedModel, ModelMetadata
from hrmedseg.models.training_views import BoxPromptedSegmenter
from hrmedseg.training.clicks import ClickSchedule, InteractiveRefinement, distance_inside, next_clicks
from test_engine_predictor import tiny_sam


def disc(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def exact_distance(region: np.ndarray) -> np.ndarray:
    """The benchmark annotator's distance transform (the grid border counts as outside)."""
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def as_logits(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(mask, 5.0, -5.0)).float()[None, None]


def cell_of(xy: torch.Tensor, input_size: int, grid: int) -> tuple[int, int]:
    """(row, col) of the low-res cell a click (input px) lies in."""
    x, y = (xy * grid / input_size).floor().long().tolist()
    return y, x


def test_distance_inside_is_close_to_the_euclidean_transform():
    rng = np.random.default_rng(0)
    shapes = [disc((64, 80), 30, 40, 17), np.zeros((64, 80), bool), np.ones((64, 80), bool)]
    blobs = ndimage.gaussian_filter(rng.random((64, 80)), 3) > 0.5
    shapes.append(blobs)
    ours = distance_inside(torch.from_numpy(np.stack(shapes))).numpy()
    for region, d in zip(shapes, ours):
        exact = exact_distance(region)
        assert (d[~region] == 0).all() and (d[region] >= 1).all()
        # the octagonal distance is within 8% of the Euclidean one, plus a cell for the pixel grid
        if region.any():
            assert np.abs(d - exact)[region].max() <= 0.08 * exact.max() + 1.0


def test_missed_object_gets_a_positive_click_at_its_centre():
    grid, size = 64, 256
    target = disc((grid, grid), 20, 41, 9)
    xy, labels = next_clicks(as_logits(np.zeros_like(target)), torch.from_numpy(target).float()[None, None], size)
    assert xy.shape == (1, 1, 2) and labels.tolist() == [[1]]
    assert cell_of(xy[0, 0], size, grid) == (20, 41)
    # cell centres in input px: the frame the engine passes clicks in
    assert xy[0, 0].tolist() == [(41 + 0.5) * 4, (20 + 0.5) * 4]


def test_wrong_part_larger_than_missed_part_gets_a_negative_click_inside_it():
    grid, size = 64, 1024
    target = disc((grid, grid), 32, 20, 10)
    wrong_part = disc((grid, grid), 30, 48, 8)  # a false positive blob, larger than the miss below
    pred = target.copy()
    pred[22:24, 18:22] = False  # a small miss
    pred |= wrong_part
    xy, labels = next_clicks(as_logits(pred), torch.from_numpy(target).float()[None, None], size)
    assert labels.tolist() == [[0]]
    row, col = cell_of(xy[0, 0], size, grid)
    wrong = pred & ~target
    assert wrong[row, col]
    assert exact_distance(wrong)[row, col] >= 0.9 * exact_distance(wrong).max()


def test_batch_of_objects_each_gets_its_own_click_and_a_perfect_one_confirms_itself():
    grid, size = 32, 128
    target = np.stack([disc((grid, grid), 10, 10, 5), disc((grid, grid), 20, 20, 6)])
    pred = np.stack([np.zeros((grid, grid), bool), target[1]])  # the second is right everywhere
    logits = torch.from_numpy(np.where(pred, 5.0, -5.0)).float()[:, None]
    xy, labels = next_clicks(logits, torch.from_numpy(target).float()[:, None], size)
    assert labels.tolist() == [[1], [1]]
    assert cell_of(xy[0, 0], size, grid) == (10, 10) and cell_of(xy[1, 0], size, grid) == (20, 20)


def test_schedule_follows_sam():
    plan = ClickSchedule(8, 2).plan(random.Random(3))
    assert len(plan) == 10 and sum(plan) == 8
    assert plan[0] and not plan[-1]  # a click first (nothing to refine before), a mask-only iteration last
    assert plan[:-1].count(False) == 1
    assert ClickSchedule(3, 0).plan(random.Random(0)) == [True] * 3
    places = {ClickSchedule(4, 2).plan(random.Random(s)).index(False) for s in range(40)}
    assert len(places) > 1  # the intermediate mask-only iteration moves


@pytest.fixture(scope="module")
def sam():
    model = tiny_sam(5)
    with torch.no_grad():  # away from the init, so clicks and mask prompts visibly change the logits
        for p in list(model.mask_decoder.parameters()) + list(model.prompt_encoder.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _record_decoder_inputs(sam):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: kwargs[k].detach().clone() for k in ("image_embeddings", "sparse_prompt_embeddings",
                                                               "dense_prompt_embeddings")})

    return calls, sam.mask_decoder.register_forward_pre_hook(hook, with_kwargs=True)


def test_training_iterations_feed_the_decoder_what_the_engine_feeds_it(sam):
    """The same box, the training sampler's clicks and the previous logits (with the box prior):
    the training path and the engine give the decoder the same embeddings and get the same logits.

    A 1024 x 1024 image: the engine's crop is then the whole image at scale 1, so native pixels
    are input pixels and both paths can be compared one to one.
    """
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    box = np.array([[300.0, 340.0, 560.0, 620.0]])
    target = torch.from_numpy(disc((1024, 1024), 470, 440, 120)).float()[None]  # (1, S, S)
    prior = "ellipse"
    plan = [True, True, False]

    calls, handle = _record_decoder_inputs(sam)
    try:
        view = BoxPromptedSegmenter(sam, 1024, prior).eval()
        images = ((torch.from_numpy(image).permute(2, 0, 1)[None].float() - sam.pixel_mean) / sam.pixel_std)
        with torch.no_grad():
            iterations = view(images, [torch.from_numpy(box).float()], refine=InteractiveRefinement(
                [torch.from_numpy(box).float()], [target], plan, 1024))
        training_calls = list(calls)
        calls.clear()

        predictor = BoxPredictor(LoadedModel(sam, ModelMetadata(kind="hrmedseg_sam", box_prior=prior)),
                                 device="cpu", backend="reference", click_update="sam", click_mask_prompt=True)  # what click training feeds the decoder
        last = next(predictor.predict_boxes(image, box))
        assert last.crop == Crop(1.0, 0, 0, 1024, 1024)
        low_target = torch.nn.functional.adaptive_avg_pool2d(target[:, None], 256)
        xy, labels = np.zeros((0, 2)), np.zeros(0, np.int64)
        engine_logits = [last.low_res_logits]
        for add_click in plan:
            if add_click:  # the annotator's click from the engine's own previous logits
                p, lab = next_clicks(last.low_res_logits[None], low_target, 1024)
                xy, labels = np.r_[xy, p[0].numpy()], np.r_[labels, lab[0].numpy()]
            last = next(predictor.predict_boxes(image, box, points=[xy], point_labels=[labels],
                                                mask_inputs=[last.low_res_logits], crops=[last.crop]))
            engine_logits.append(last.low_res_logits)
    finally:
        handle.remove()
    assert len(training_calls) == len(calls) == len(plan) + 1
    for ours, engine in zip(training_calls, calls):
        for key in ours:
            torch.testing.assert_close(ours[key], engine[key], atol=1e-4, rtol=1e-4)
    for (logits, _), theirs in zip(iterations, engine_logits):
        torch.testing.assert_close(logits[0], theirs, atol=1e-3, rtol=1e-3)
    # the clicks and the mask prompt did change the prediction
    assert (engine_logits[0] - engine_logits[-1]).abs().max() > 0.1
    assert training_calls[1]["sparse_prompt_embeddings"].shape[1] == 1 + 2 + 0  # 1 click, 2 box corners
    assert training_calls[2]["sparse_prompt_embeddings"].shape[1] == 2 + 2


def test_clicks_run_trains_point_and_mask_prompts_and_keeps_box_embedding(tmp_path):
    from hrmedseg.models.sam import load_hrmedseg_sam
    from hrmedseg.training.finetune import FinetuneConfig, build_model, finetune, save_model
    from test_training_data import disks, write_pair

    for i in range(4):
        write_pair(tmp_path / "data", f"im{i}", disks((80, 90), n=4, seed=i))
    cfg = FinetuneConfig(model="hrmedseg-sam", data=str(tmp_path / "data"), out=str(tmp_path / "model.pt"),
                         encoder_preset="tiny", img_size=64, batch_size=2, epochs=1, num_workers=0, device="cpu",
                         max_boxes=3, clicks=2, click_mask_only=1, lr=1e-2, init=str(tmp_path / "init.pt"))
    save_model(build_model(FinetuneConfig(**{**cfg.__dict__, "init": None}), 1, None), cfg, cfg.init, {})
    events = []
    result = finetune(cfg, events.append)
    row = result.history[0]
    assert 0.0 <= row["val_dice_clicks"] <= 1.0 and np.isfinite(row["train_loss"])
    assert "val_dice_clicks" in next(e for e in events if e["event"] == "baseline")
    start, trained = load_hrmedseg_sam(cfg.init).prompt_encoder, load_hrmedseg_sam(cfg.out).prompt_encoder
    for k in (2, 3):  # box corners: unchanged
        torch.testing.assert_close(trained.point_embeddings[k].weight, start.point_embeddings[k].weight)
    torch.testing.assert_close(trained.no_mask_embed.weight, start.no_mask_embed.weight)
    # the click embeddings learn (one step: its clicks may all be of one sign)
    assert any(not torch.equal(trained.point_embeddings[k].weight, start.point_embeddings[k].weight) for k in (0, 1))
    assert not torch.equal(trained.mask_downscaling[0].weight, start.mask_downscaling[0].weight)


def test_clicks_option_is_checked():
    from hrmedseg.errors import InputError
    from hrmedseg.training.finetune import FinetuneConfig

    with pytest.raises(InputError, match="--clicks applies to the box models"):
        FinetuneConfig(model="hrmedseg", data="x", clicks=2).check()
    with pytest.raises(InputError, match="cannot go with --train-only"):
        FinetuneConfig(model="hrmedseg-sam", data="x", clicks=2, train_only="iou-head").check()
    with pytest.raises(InputError, match="0 or more"):
        FinetuneConfig(model="hrmedseg-sam", data="x", clicks=-1).check()
