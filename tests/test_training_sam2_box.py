"""Box-prompted fine-tuning of HRMedSegSAM2 on the CPU: a tiny run, its bundle works in SAM2ImagePredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from hrmedseg.errors import InputError  # noqa: E402
from hrmedseg.models.training_views import Sam2BoxPromptedSegmenter  # noqa: E402
from hrmedseg.training.finetune import FinetuneConfig, finetune  # noqa: E402
from test_training_data import write_disk_dataset  # noqa: E402


@pytest.fixture()
def data(tmp_path):
    write_disk_dataset(tmp_path / "data", images=3, disks_per_image=3)
    return tmp_path


def tiny(tmp_path, **kw) -> FinetuneConfig:
    base = dict(model="hrmedseg-sam2", data=str(tmp_path / "data"), out=str(tmp_path / "sam2.pt"),
                encoder_preset="tiny", img_size=64, batch_size=2, epochs=5, max_steps=2, max_boxes=3,
                num_workers=0, device="cpu", log_every=1)
    base.update(kw)
    return FinetuneConfig(**base)


def test_sam2_box_run_writes_a_bundle_sam2_predictor_uses(data):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from hrmedseg.models.sam2 import load_hrmedseg_sam2

    events = []
    result = finetune(tiny(data), events.append)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert result.stopped == "max steps" and result.history[0]["val_masks"] > 0
    assert 0.0 <= result.best_val_dice <= 1.0

    model = load_hrmedseg_sam2(result.out)
    # Trained at 64 px, saved with SAM2's own 1024 geometry.
    assert model.sam_prompt_encoder.input_image_size == (1024, 1024)
    assert model.sam_prompt_encoder.image_embedding_size == (64, 64)
    predictor = SAM2ImagePredictor(model)
    image = np.random.default_rng(0).integers(0, 255, (72, 80, 3), dtype=np.uint8)
    with torch.no_grad():
        predictor.set_image(image)
        masks, scores, low_res = predictor.predict(box=np.array([10, 12, 40, 50]), multimask_output=False)
    assert masks.shape == (1, 72, 80) and low_res.shape == (1, 256, 256) and np.isfinite(scores).all()


def test_wrapper_matches_the_predictor_path(data):
    """At 1024 px the training forward gives SAM2ImagePredictor's low-res logits for the same box."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from hrmedseg.models.neck import HRMedSegEncoder
    from hrmedseg.models.sam2 import SAM2_PREDICTOR_PREPROCESSING, build_hrmedseg_sam2
    from hrmedseg.training.finetune import ENCODER_PRESETS

    torch.manual_seed(0)
    sam2 = build_hrmedseg_sam2(encoder=HRMedSegEncoder(ENCODER_PRESETS["tiny"])).eval()
    wrapper = Sam2BoxPromptedSegmenter(sam2, 1024).eval()
    image = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    box = np.array([100.0, 200.0, 600.0, 700.0])
    with torch.no_grad():
        x = SAM2_PREDICTOR_PREPROCESSING.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float())
        ours = wrapper(x, [torch.tensor(box[None], dtype=torch.float32)])[0]
        predictor = SAM2ImagePredictor(sam2)
        predictor.set_image(image)
        _, _, theirs = predictor.predict(box=box, multimask_output=False, return_logits=True)
    assert ours.shape == (1, 1, 256, 256)
    torch.testing.assert_close(ours[0], torch.from_numpy(theirs), atol=1e-3, rtol=1e-3)


def test_only_the_single_image_path_is_trainable(data):
    from hrmedseg.training.finetune import build_model

    model = build_model(tiny(data), 1, None)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder", "sam_mask_decoder", "sam_prompt_encoder", "no_mem_embed"}


def test_box_prior_is_refused_for_sam2(data):
    with pytest.raises(InputError, match="hrmedseg-sam only"):
        finetune(tiny(data, box_prior="ellipse"))


def test_cli_accepts_hrmedseg_sam2(data):
    from hrmedseg.training.cli import main

    out = data / "cli.pt"
    code = main(["finetune", "--model", "hrmedseg-sam2", "--data", str(data / "data"), "--out", str(out),
                 "--encoder-preset", "tiny", "--img-size", "64", "--batch-size", "2", "--epochs", "1",
                 "--max-steps", "1", "--num-workers", "0", "--device", "cpu"])
    assert code == 0 and out.exists()
