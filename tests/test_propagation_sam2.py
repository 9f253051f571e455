"""Propagation with SAM2's video method on HRMedSegSAM2 (hrmedseg.engine.sam2_video).

No trained SAM2 memory weights exist here: the model is random (a tiny LGViT, SAM2.1 heads and
memory modules from a random checkpoint file in Meta's layout, at a 128 px input so the memory
attention runs quickly). The tests check the mechanics, not the quality of the masks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from hrmedseg.engine import BoxPredictor  # noqa: E402
from hrmedseg.engine.propagation import PropagationResult, SlicePrompt  # noqa: E402
from hrmedseg.engine.sam2_video import CropFrames, propagate_sam2, tracking_crop  # noqa: E402
from hrmedseg.errors import InputError, WeightsError  # noqa: E402
from hrmedseg.models import EncoderConfig, build_encoder  # noqa: E402
from hrmedseg.models import sam2_video  # noqa: E402
from hrmedseg.models.info import LoadedModel  # noqa: E402
from hrmedseg.models.sam2 import _ShapeOnlyImageEncoder, build_hrmedseg_sam2_with_metadata, build_sam2_base  # noqa: E402

Z, H, W = 6, 96, 112
BOX = (30.0, 30.0, 50.0, 55.0)
NEVER = dict(min_area=0, min_score=-math.inf)  # a stop rule that never stops


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    """A random SAM2.1 checkpoint in the released layout ({"model": state_dict}), without Hiera."""
    torch.manual_seed(3)
    state = build_sam2_base(_ShapeOnlyImageEncoder(), "sam2.1_hiera_t").state_dict()
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    return path


def _small(loaded: LoadedModel) -> LoadedModel:
    """The same model at a 128 px input (no tensor depends on the input size)."""
    torch.manual_seed(1)
    model = build_sam2_base(loaded.module.image_encoder, "sam2.1_hiera_t", image_size=128)
    model.load_state_dict(loaded.module.state_dict())
    with torch.no_grad():  # as if trained: the object-score head says the object is present
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return LoadedModel(model.eval(), loaded.metadata)


def _encoder():
    torch.manual_seed(0)
    return build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()


@pytest.fixture(scope="module")
def loaded(sam2_file):
    return _small(build_hrmedseg_sam2_with_metadata(_encoder(), sam2_file))


def _predictor(loaded, **kw):
    return BoxPredictor(loaded, device="cpu", backend="reference", **kw)


@pytest.fixture(scope="module")
def stack():
    return np.random.default_rng(0).integers(0, 255, (Z, H, W), dtype=np.uint8)


@pytest.fixture(scope="module")
def full_run(loaded, stack):
    """Object 1 prompted on slice 2, tracked to both ends, never stopped; the frames sam2 ran, in order."""
    order: list[int] = []
    build = sam2_video.build_video_predictor

    def recording(model, config):
        video = build(model, config)
        run = video._run_single_frame_inference
        video._run_single_frame_inference = lambda *a, **k: (order.append(k["frame_idx"]), run(*a, **k))[1]
        return video

    mp = pytest.MonkeyPatch()
    mp.setattr(sam2_video, "build_video_predictor", recording)
    try:
        result = propagate_sam2(_predictor(loaded), stack, [SlicePrompt(2, 1, box=BOX)], **NEVER)
    finally:
        mp.undo()
    return result, order


def test_memory_modules_come_from_the_file(loaded, sam2_file):
    state = torch.load(sam2_file, weights_only=True)["model"]
    video = sam2_video.build_video_predictor(loaded.module, "sam2.1_hiera_t")
    assert loaded.metadata.sam2.memory
    for key in ("memory_attention.layers.0.self_attn.q_proj.weight", "memory_encoder.fuser.layers.0.pwconv1.weight",
                "obj_ptr_proj.layers.0.weight", "maskmem_tpos_enc"):
        assert torch.equal(video.state_dict()[key], state[key]), key
    # shared, not copied: the predictor runs the model's own modules
    assert video.memory_attention is loaded.module.memory_attention and video.sam_mask_decoder is loaded.module.sam_mask_decoder
    assert video.image_size == 128


def test_load_sam2_memory_keeps_the_decoder(sam2_file):
    bare = _small(build_hrmedseg_sam2_with_metadata(_encoder()))
    assert not bare.metadata.sam2.memory
    decoder_before = {k: v.clone() for k, v in bare.module.state_dict().items() if k.startswith("sam_mask_decoder.")}
    with_memory = sam2_video.load_sam2_memory(bare, sam2_file)
    state = torch.load(sam2_file, weights_only=True)["model"]
    assert with_memory.metadata.sam2.memory
    now = with_memory.module.state_dict()
    assert torch.equal(now["memory_attention.layers.0.cross_attn_image.k_proj.weight"], state["memory_attention.layers.0.cross_attn_image.k_proj.weight"])
    assert all(torch.equal(now[k], v) for k, v in decoder_before.items())


def test_bundle_without_memory_weights_is_refused(sam2_file, stack, tmp_path):
    bare = _small(build_hrmedseg_sam2_with_metadata(_encoder()))
    with pytest.raises(InputError, match="no SAM2 video-memory weights.*sam2.1_hiera_tiny.pt"):
        propagate_sam2(_predictor(bare), stack, [SlicePrompt(2, 1, box=BOX)], **NEVER)
    image_only = tmp_path / "image_only.pt"
    torch.save({"model": {k: v for k, v in torch.load(sam2_file, weights_only=True)["model"].items() if k.startswith("sam_")}}, image_only)
    with pytest.raises(WeightsError):
        sam2_video.load_sam2_memory(bare, image_only)


def test_state_has_the_keys_of_sam2s_init_state(loaded, tmp_path):
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / f"{i}.jpg")
    video = sam2_video.build_video_predictor(loaded.module, "sam2.1_hiera_t")
    theirs = video.init_state(str(tmp_path))
    ours = sam2_video.new_inference_state(video, [None, None], 128)
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k not in ("images", "cached_features", "video_height", "video_width")} == {
        k: v for k, v in theirs.items() if k not in ("images", "cached_features", "video_height", "video_width")
    }


def test_result_types_shapes_and_order(full_run, loaded):
    result, order = full_run
    assert isinstance(result, PropagationResult)
    assert result.labels.shape == (Z, H, W) and result.labels.dtype == np.uint32
    assert set(np.unique(result.labels)) <= {0, 1}
    assert result.extents == {1: (0, Z - 1)}
    assert sorted(result.scores[1]) == list(range(Z)) and all(isinstance(s, float) for s in result.scores[1].values())
    # sam2's order: the prompted slice, forward to the end, then in reverse from the prompted slice
    assert order == [2, 3, 4, 5, 1, 0]
    # masks are set only inside the tracking crop, in native pixels
    crop = tracking_crop(np.array(BOX), (H, W), _predictor(loaded), 0.5)
    outside = np.ones((H, W), bool)
    outside[crop.y0 : crop.y0 + crop.size, crop.x0 : crop.x0 + crop.size] = False
    assert not result.labels[:, outside].any()
    assert result.labels[2].any()


def _scripted(monkeypatch, iou: dict[int, float], absent: set[int]) -> None:
    """Replace sam2's predicted IoU of some slices, and empty others as sam2 does for an absent object."""
    from sam2.modeling.sam2_base import NO_OBJ_SCORE

    build = sam2_video.build_video_predictor

    def scripted(model, config):
        video = build(model, config)
        run = video._run_single_frame_inference

        def run_scripted(*args, **kwargs):
            out, masks = run(*args, **kwargs)
            t = kwargs["frame_idx"]
            out["iou"] = torch.tensor([iou.get(t, 0.9)])
            if t in absent:
                out["pred_masks"] = torch.full_like(out["pred_masks"], NO_OBJ_SCORE)
            return out, masks

        video._run_single_frame_inference = run_scripted
        return video

    monkeypatch.setattr(sam2_video, "build_video_predictor", scripted)


@pytest.mark.parametrize("rule", ["min_score", "min_area"])
def test_each_direction_stops_at_the_first_failing_slice(loaded, stack, monkeypatch, rule):
    """Prompted on slice 2: slice 4 fails forward, slice 0 in reverse; neither is labelled, nor what lies beyond."""
    if rule == "min_score":
        _scripted(monkeypatch, iou={4: 0.2, 0: 0.3, 5: 0.9}, absent=set())
    else:
        _scripted(monkeypatch, iou={}, absent={4, 0})
    result = propagate_sam2(_predictor(loaded), stack, [SlicePrompt(2, 1, box=BOX)], min_area=1, min_score=0.5)
    assert result.extents == {1: (1, 3)}
    assert sorted(result.scores[1]) == [1, 2, 3]
    assert all(result.labels[t].any() for t in (1, 2, 3)) and not result.labels[[0, 4, 5]].any()


def test_prompted_slice_failing_gives_nothing(loaded, stack):
    result = propagate_sam2(_predictor(loaded), stack, [SlicePrompt(2, 1, box=BOX)], min_area=H * W + 1, min_score=0.0)
    assert result.extents == {} and result.scores == {} and not result.labels.any()


def test_cancel_returns_what_was_done_and_progress_counts(loaded, stack):
    calls: list[tuple[int, int]] = []
    result = propagate_sam2(_predictor(loaded), stack, [SlicePrompt(2, 1, box=BOX)], **NEVER,
                            progress=lambda d, t: calls.append((d, t)), cancel=lambda: len(calls) >= 2)
    assert calls == [(1, Z), (2, Z)]
    assert result.extents == {1: (2, 3)} and not result.labels[[0, 1, 4, 5]].any()


def test_slices_are_encoded_in_batches_and_cached(loaded, stack):
    predictor = _predictor(loaded)
    sizes: list[int] = []
    hook = loaded.module.image_encoder.register_forward_hook(lambda m, args, out: sizes.append(int(args[0].shape[0])))
    try:
        first = propagate_sam2(predictor, stack, [SlicePrompt(2, 1, box=BOX)], **NEVER, batch_size=3)
        assert sizes == [3, 1, 2]  # slices 2-4 forward, then 5, then 1-0 in reverse
        assert predictor.encoder_calls == 3
        again = propagate_sam2(predictor, stack, [SlicePrompt(2, 2, box=BOX)], **NEVER, batch_size=3)
    finally:
        hook.remove()
    assert sizes == [3, 1, 2] and predictor.encoder_calls == 3  # every slice's features came from the cache
    assert np.array_equal(first.labels > 0, again.labels > 0)


def test_bad_prompts_are_named(loaded, stack):
    p = _predictor(loaded)
    with pytest.raises(InputError, match="slice 9.*6 slices"):
        propagate_sam2(p, stack, [SlicePrompt(9, 1, box=BOX)], **NEVER)
    with pytest.raises(InputError, match="unique"):
        propagate_sam2(p, stack, [SlicePrompt(1, 1, box=BOX), SlicePrompt(2, 1, box=BOX)], **NEVER)
    with pytest.raises(InputError, match="stack"):
        propagate_sam2(p, stack[0], [SlicePrompt(0, 1, box=BOX)], **NEVER)


def test_crop_frames_follow_the_direction_of_travel(loaded, stack):
    from hrmedseg.io.stacks import open_stack

    p = _predictor(loaded)
    slices = open_stack(stack)
    video = sam2_video.build_video_predictor(loaded.module, "sam2.1_hiera_t")
    crop = tracking_crop(np.array(BOX), (H, W), p, 0.5)
    frames = CropFrames(p, video, slices, crop, p.scaling(slices.slice(0)), batch_size=4)
    frames.step = -1
    _, features = frames.get(4)
    assert sorted(frames._latest) == [1, 2, 3, 4]
    assert [tuple(f.shape) for f in features["backbone_fpn"]] == [(1, 32, 32, 32), (1, 64, 16, 16), (1, 256, 8, 8)]
    assert [tuple(f.shape[-2:]) for f in features["vision_pos_enc"]] == [(32, 32), (16, 16), (8, 8)]
