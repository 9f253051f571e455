"""SAM's IoU loss in box fine-tuning, and ``--train-only iou-head`` (tiny models on the CPU)."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from hrmedseg.errors import InputError
from hrmedseg.models.box_prior import add_box_prior
from hrmedseg.models.training_views import BoxPromptedSegmenter
from hrmedseg.training.checkpointing import log_path_for
from hrmedseg.training.data import CropSettings, SegmentationCrops, collate, discover_samples
from hrmedseg.training.finetune import (
    FinetuneConfig,
    _encoder_parts,
    actual_iou,
    batch_loss,
    build_model,
    finetune,
    freeze_all_but_iou_head,
    iou_head_parameters,
    set_train_mode,
)
from hrmedseg.training.metrics import iou_per_mask
from hrmedseg.training.steps import backward_and_step
from hrmedseg.weights.bundle import load_bundle
from test_training_data import write_disk_dataset

CPU = torch.device("cpu")


@pytest.fixture()
def data(tmp_path):
    write_disk_dataset(tmp_path / "data", images=4, disks_per_image=4)
    return tmp_path


def tiny(root, **kw) -> FinetuneConfig:
    base = dict(model="hrmedseg-sam", data=str(root / "data"), out=str(root / "model.pt"), encoder_preset="tiny",
                img_size=64, batch_size=2, epochs=1, max_boxes=4, num_workers=0, device="cpu", log_every=1,
                box_prior="ellipse")
    base.update(kw)
    return FinetuneConfig(**base)


def fixed_batch(cfg: FinetuneConfig, model) -> dict:
    """The same crops and boxes every call (validation crops: no jitter, no augmentation)."""
    _, preprocessing, _ = _encoder_parts(model)
    crop = CropSettings(size=cfg.img_size, mode=cfg.resolved_input_mode, scale=cfg.scale,
                        pad_value=preprocessing.pad_value)
    samples = discover_samples(cfg.data).samples
    crops = SegmentationCrops(samples, train=False, task="box", crop=crop, classes=None, max_boxes=cfg.max_boxes,
                              seed=0)
    return collate([crops[i] for i in range(len(crops))])


def predicted_and_actual(model, batch, preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        images = preprocessing.normalize(batch["image"].float())
        outputs, ious = model(images, list(batch["boxes"]), return_iou=True)
        logits = torch.cat(outputs)
        target = F.adaptive_avg_pool2d(torch.cat(list(batch["masks"]))[:, None].float(), logits.shape[-2:])
        return torch.cat(ious), actual_iou(logits, target)


def test_iou_loss_is_mse_to_the_iou_of_the_mask_with_its_box_prior(data):
    """The actual IoU is that of the thresholded logits *with* the ellipse prior added, as at inference."""
    cfg = tiny(data)
    model = build_model(cfg, 1, None).eval()
    assert model.box_prior == "ellipse"
    _, preprocessing, _ = _encoder_parts(model)
    batch = fixed_batch(cfg, model)
    parts: dict = {}
    with torch.no_grad():
        loss, n = batch_loss(model, batch, preprocessing, CPU, iou_loss_weight=2.0, parts=parts)

        # The same by hand, from SAM's own decoder call.
        sam = model.sam
        images = preprocessing.normalize(batch["image"].float())
        embeddings = sam.image_encoder(images)
        preds, actuals, raw_actuals = [], [], []
        for i, (boxes, masks) in enumerate(zip(batch["boxes"], batch["masks"])):
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
            raw, iou = sam.mask_decoder(image_embeddings=embeddings[i : i + 1],
                                        image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)
            logits = add_box_prior(raw, boxes, (64, 64), "ellipse")
            target = F.adaptive_avg_pool2d(masks[:, None].float(), logits.shape[-2:])
            preds.append(iou[:, 0])
            actuals.append(iou_per_mask(logits[:, 0] > 0, target[:, 0] >= 0.5))
            raw_actuals.append(iou_per_mask(raw[:, 0] > 0, target[:, 0] >= 0.5))
    expected = F.mse_loss(torch.cat(preds), torch.cat(actuals))
    assert n == sum(len(m) for m in batch["masks"]) > 0
    assert parts["iou_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["mask_loss"].item() + 2.0 * parts["iou_loss"].item(), rel=1e-5)
    # Without the prior the masks, so the actual IoUs, are different: the prior really is in there.
    assert not torch.allclose(torch.cat(actuals), torch.cat(raw_actuals))


def test_iou_loss_moves_the_predicted_iou_toward_the_actual_iou(data):
    cfg = tiny(data, train_only="iou-head")
    torch.manual_seed(0)
    model = build_model(cfg, 1, None)
    freeze_all_but_iou_head(model)
    set_train_mode(model, cfg)
    _, preprocessing, _ = _encoder_parts(model)
    batch = fixed_batch(cfg, model)
    pred0, actual0 = predicted_and_actual(model, batch, preprocessing)
    error0 = (pred0 - actual0).abs().mean().item()
    assert actual0.std() > 0.01  # a spread of actual IoUs, not one value to learn

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(60):
        loss, _ = batch_loss(model, batch, preprocessing, CPU, iou_loss_weight=1.0)
        backward_and_step(loss, optimizer, None)
    pred1, actual1 = predicted_and_actual(model, batch, preprocessing)
    error1 = (pred1 - actual1).abs().mean().item()

    assert torch.equal(actual0, actual1)  # the masks did not change
    assert error1 < 0.5 * error0 and error1 < 0.1, (error0, error1)
    # Better than any constant near the mean: it tells the masks apart.
    assert error1 < (actual1 - actual1.mean()).abs().mean()


def test_iou_loss_weight_decides_whether_the_head_learns(data):
    for weight, learns in ((1.0, True), (0.0, False)):
        cfg = tiny(data, iou_loss_weight=weight)
        model = build_model(cfg, 1, None)
        _, preprocessing, _ = _encoder_parts(model)
        loss, _ = batch_loss(model, fixed_batch(cfg, model), preprocessing, CPU, iou_loss_weight=weight)
        loss.backward()
        head = iou_head_parameters(model)
        assert len(head) == 6
        assert all((p.grad is not None and p.grad.abs().sum() > 0) == learns for p in head.values())


def test_frozen_fast_decoder_matches_sams_decoder(data):
    """``--train-only iou-head`` computes the frozen masks with FastMaskDecoder: the same logits and scores."""
    cfg = tiny(data)
    model = build_model(cfg, 1, None)
    model.eval()
    _, preprocessing, _ = _encoder_parts(model)
    batch = fixed_batch(cfg, model)
    assert isinstance(model, BoxPromptedSegmenter) and not model.frozen_fast
    reference = predicted_and_actual(model, batch, preprocessing)
    images = preprocessing.normalize(batch["image"].float())
    with torch.no_grad():
        ref_logits = model(images, list(batch["boxes"]))
        model.frozen_fast = True
        fast_logits = model(images, list(batch["boxes"]))
    fast = predicted_and_actual(model, batch, preprocessing)
    for a, b in zip(ref_logits, fast_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference[0], fast[0], atol=1e-5, rtol=1e-5)
    assert not any("fast" in k for k in model.state_dict())  # the helper is not part of the weights


def _changed(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_train_only_iou_head_changes_only_the_iou_head(data):
    start = tiny(data, out=str(data / "start.pt"), max_steps=1)
    finetune(start)
    cfg = tiny(data, init=start.out, train_only="iou-head", lr=1e-2, epochs=2, max_steps=4, out=str(data / "iou.pt"))
    result = finetune(cfg)
    before, after = load_bundle(start.out), load_bundle(cfg.out)
    changed = _changed(before["state_dict"], after["state_dict"])
    # Every weight and buffer (BatchNorm running statistics included) is bit-identical but the head's.
    assert changed and all(k.startswith("mask_decoder.iou_prediction_head.") for k in changed), changed
    assert after["config"] == before["config"] and after["config"]["box_prior"] == "ellipse"
    assert after["provenance"]["recipe"]["train_only"] == "iou-head"
    assert 0 <= after["provenance"]["val_iou_mae"] <= 2
    # The masks cannot change, so neither can the validation Dice; the IoU head's error is logged.
    assert result.val_dice_before == pytest.approx(result.history[0]["val_dice"], abs=1e-6)
    with open(log_path_for(cfg.out), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"val_iou_mae", "train_iou_loss"} <= set(rows[0]) and float(rows[-1]["val_iou_mae"]) >= 0


def test_train_only_iou_head_sam2(data):
    pytest.importorskip("sam2")
    from hrmedseg.models.sam2 import load_hrmedseg_sam2

    start = tiny(data, model="hrmedseg-sam2", box_prior=None, out=str(data / "s2.pt"), max_steps=1)
    finetune(start)
    cfg = tiny(data, model="hrmedseg-sam2", box_prior=None, init=start.out, train_only="iou-head", lr=1e-2,
               max_steps=2, out=str(data / "s2_iou.pt"))
    result = finetune(cfg)
    changed = _changed(load_bundle(start.out)["state_dict"], load_bundle(cfg.out)["state_dict"])
    assert changed and all(k.startswith("sam_mask_decoder.iou_prediction_head.") for k in changed), changed
    assert "val_iou_mae" in result.history[0]
    load_hrmedseg_sam2(cfg.out)


def test_bad_iou_options(data):
    with pytest.raises(InputError, match="box models"):
        finetune(tiny(data, model="hrmedseg", box_prior=None, train_only="iou-head"))
    with pytest.raises(InputError, match="iou-loss-weight"):
        finetune(tiny(data, train_only="iou-head", iou_loss_weight=0.0))
    with pytest.raises(InputError, match="iou-loss-weight"):
        finetune(tiny(data, iou_loss_weight=-1.0))
    with pytest.raises(InputError, match="train-only"):
        finetune(tiny(data, train_only="decoder"))


def test_cli_train_only_iou_head(data, capsys):
    from hrmedseg.training.cli import main

    init = tiny(data, out=str(data / "start.pt"), max_steps=1)
    finetune(init)
    out = data / "cli.pt"
    code = main(["finetune", "--model", "hrmedseg-sam", "--data", str(data / "data"), "--out", str(out),
                 "--init", init.out, "--train-only", "iou-head", "--iou-loss-weight", "0.5", "--img-size", "64",
                 "--batch-size", "2", "--epochs", "1", "--max-steps", "1", "--num-workers", "0", "--device", "cpu"])
    assert code == 0 and out.exists()
    assert "IoU-head MAE" in capsys.readouterr().err
    recipe = load_bundle(out)["provenance"]["recipe"]
    assert recipe["train_only"] == "iou-head" and recipe["iou_loss_weight"] == 0.5
