"""BoxPredictor: box-prompted segmentation of images of any size at native resolution."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..defaults import DEFAULT_BOX_MODEL  # noqa: F401  (re-exported: the engine's default)
from ..errors import HRMedSegError, InputError
from ..io.boxes import box_label
from ..models.box_prior import DEFAULT_PRIOR_RULE, PRIOR_RULES, add_box_prior, apply_prior_rule, ellipse_prior_logits
from ..models.info import LoadedModel, ModelMetadata
from ..models.malloc_tuning import keep_freed_memory
from ..models.prior_gate import GATE_SUFFIX
from ..io.readers import LazyImage, object_token, open_image
from .cache import EmbeddingCache
from .click_update import ClickFix, check_click_update, fix_clicked_pixels, local_click_update
from .disk_cache import PERSISTENT_SOURCES, image_identity, model_digest, resolve_disk_cache
from .crops import Crop, CropPolicy, group_by_crop, logits_to_native_batch, mask_region, native_logits, plan_crops, read_crop
from .decoder import ENGINE_BACKENDS, Sam2Features, BoxDecoder, RegionBoxDecoder, build_steps, is_sam2_model, region_margin
from .intensity import DEFAULT_INTENSITY, ChannelScaling, IntensityOptions, compute_scaling
from .labels import ObjectMask, ObjectRecord, SparseLabels, _check_policy, paste_object
from .prompts import ObjectPrompts, check_prompts

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    return dev


def resolve_backend(backend: str, device: torch.device, allow_bf16: bool = True, model: nn.Module | None = None) -> str:
    """The engine backend for ``backend`` ("auto": ``hrmedseg.models.runtime.select_backend``,
    which on a CPU times ``model``'s encoder the first time on a machine)."""
    from ..models.runtime import select_backend

    if backend == "auto":
        try:
            backend = select_backend(device, allow_bf16=allow_bf16, model=model)
        except ValueError as err:  # a bad HRMEDSEG_BACKEND
            raise InputError(str(err)) from err
    elif backend not in ENGINE_BACKENDS:
        raise InputError(f"unknown backend {backend!r} (use auto, {', '.join(ENGINE_BACKENDS)})")
    if backend == "onnxruntime" and device.type != "cpu":
        raise InputError(f"backend 'onnxruntime' runs on the CPU only, not on {device}; use device='cpu'")
    return backend


_SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder", "pixel_mean", "pixel_std")


def resolve_model(model: str | nn.Module | LoadedModel) -> LoadedModel:
    """A box-prompt model (SAM-like, or a sam2 ``SAM2Base``) and its metadata, from a module, a registry name or a weights path.

    A module given as is has empty metadata (no provenance, box prior "none", ``kind`` "").
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, ModelMetadata(kind="", source=type(model).__name__))
    from ..models.loading import load_model_with_metadata

    loaded = load_model_with_metadata(model)
    if is_sam2_model(loaded.module):
        return loaded
    missing = [a for a in _SAM_PARTS if not hasattr(loaded.module, a)]
    if missing:
        raise HRMedSegError(
            f"model {model!r} is a {type(loaded.module).__name__}, not a box-prompt model (it has no "
            f"{', '.join(missing)}); BoxPredictor needs HRMedSegSAM, HRMedSegSAM2, SAM or SAM2 weights"
        )
    return loaded


def model_click_fix(metadata: ModelMetadata) -> ClickFix:
    """The click fix chosen for a model's weights (``metadata.click_fix``), else the defaults."""
    if metadata.click_fix is None:
        return ClickFix()
    return ClickFix.from_record(metadata.click_fix, metadata.click_fix_source or metadata.source)


def default_policy(input_size: int, metadata: ModelMetadata) -> CropPolicy:
    """The engine's crop policy for a model: its input size, and its own enlargement if it records one."""
    if metadata.max_upscale:
        return CropPolicy(input_size=input_size, max_upscale=metadata.max_upscale)
    return CropPolicy(input_size=input_size)


class BoxPredictor:
    """Segment the object in each box of an image of any size, at the image's native resolution.

    Each box is encoded in a crop of its own neighbourhood (see :mod:`hrmedseg.engine.crops`):
    small objects are enlarged, huge ones read from a pyramid level; boxes sharing a crop are
    encoded once and decoded in batches; mask logits are thresholded at native resolution inside
    each box's region only. Embeddings are cached (LRU, ``cache_bytes``) by image source, crop,
    intensity map, model and backend; nothing is hashed from pixels.

    Args:
        model: a segment_anything ``Sam``-like module (image_encoder, prompt_encoder,
            mask_decoder, pixel_mean, pixel_std), a sam2 ``SAM2Base`` (HRMedSegSAM2: see
            :class:`~hrmedseg.engine.decoder.Sam2ImageEncoder` for its preprocessing), or a
            name/path for ``hrmedseg.models.load_model``, or a ``LoadedModel`` (module and metadata:
            its ``box_prior`` is added to the decoder's logits); ``self.metadata`` keeps the metadata.
        device: "auto" (CUDA, then MPS, then CPU), or any torch device string.
        cache_bytes: bound of the embedding cache (0: no cache).
        policy: crop planning (scale limits, margins).
        intensity: how non-uint8 pixels are scaled to 0..255.
        decoder: replaces the decoder step (same call as :class:`SamBoxDecoder`, or as
            :class:`~hrmedseg.engine.decoder.Sam2BoxDecoder` for SAM2 models).
        backend: "auto" (default: per device, ``hrmedseg.models.runtime.select_backend``, which
            the ``HRMEDSEG_BACKEND`` environment variable overrides: the region-limited decoder
            with the bfloat16 encoder on GPUs (replayed as a CUDA graph); on CPUs the backend
            measured fastest on the machine, once, among those whose masks agree with float32's:
            :mod:`hrmedseg.models.calibration`), "fast", "fast-bf16", "onnxruntime" (CPU only: the
            encoder exported once per weights into the user cache and run in ONNX Runtime) or
            "reference" (the plain PyTorch modules). All but "fast-bf16" give the reference's
            masks up to rounding; ``self.backend`` says which one runs (always "reference" for
            SAM2 models, which have no fast path).
        allow_bf16: for "auto": False keeps exact float32 on every device.
        decode_batch: boxes per decoder call (memory vs. speed); None: 64 on CUDA, 8 elsewhere
            (the fastest measured, docs/benchmarks.md).
        disk_cache: a second cache level on disk (:mod:`hrmedseg.engine.disk_cache`): None or
            False (default) off, True the user cache, a folder, or a ``DiskEmbeddingCache``.
        prior: what a boxed object's mask is (:func:`~hrmedseg.models.box_prior.apply_prior_rule`):
            "model" the model's mask, "ellipse" the ellipse inscribed in the box, "auto" the
            ellipse where its IoU with the model's mask is at least the model's predicted IoU,
            "gate" the one of the two the model's fitted gate (``metadata.prior_gate``) expects to
            have the higher Dice. None (default): "gate" (held-out figures in docs/benchmarks.md).
            A model without a gate runs "model" (``self.prior`` is then "model"; a warning when
            "gate" was asked for by name).
        click_update: how an object with clicks and its previous logits (``mask_inputs``) is
            recomputed (:mod:`hrmedseg.engine.click_update`): "local" takes the new
            mask only in the part the newest click is about and keeps the previous one
            elsewhere; "pixel" (default) keeps a boxed object's box logits and sets each click's pixel
            on the native mask (``click_fix``: :func:`~hrmedseg.engine.click_update.fix_clicked_pixels`);
            "sam" takes the whole new mask, as ``SamPredictor`` does.
        click_mask_prompt: whether the decoder is given the previous logits as SAM's mask prompt
            when there are clicks (always with "sam"). Off by default: box-trained models
            (ours, MedSAM, LiteMedSAM) draw worse masks with it (docs/benchmarks.md, clicks).
        aot: True compiles the fast CPU encoder ahead of time, in the background, once per machine
            (:mod:`hrmedseg.models.aot_cache`), False never uses a compiled one, "reuse" uses a
            package compiled earlier on this machine and compiles none (batch workers); None: as
            ``HRMEDSEG_AOT`` says (default off: loading a package costs about 1.2 s). Long
            sessions pass ``aot_enabled(default=True)`` (the napari annotator does).
        click_fix: the disc (or fade) and margin of the "pixel" update's native fix; None (default):
            the model's own (``metadata.click_fix``, chosen for its weights), else ``ClickFix()``.
    """

    def __init__(
        self,
        model: str | nn.Module | LoadedModel,
        device: str | torch.device = "auto",
        cache_bytes: int = 256 * 2**20,
        policy: CropPolicy | None = None,
        intensity: IntensityOptions | None = None,
        decoder: BoxDecoder | None = None,
        decode_batch: int | None = None,
        mask_threshold: float = 0.0,
        backend: str = "auto",
        allow_bf16: bool = True,
        disk_cache: Any = None,
        prior: str | None = None,
        click_update: str = "pixel",
        click_mask_prompt: bool = False,
        aot: bool | str | None = None,
        click_fix: ClickFix | None = None,
    ) -> None:
        self.click_update, self.click_mask_prompt = check_click_update(click_update), bool(click_mask_prompt)
        asked_for_prior = prior is not None
        prior = DEFAULT_PRIOR_RULE if prior is None else prior
        if prior not in PRIOR_RULES:
            raise InputError(f"unknown prior {prior!r} (use {', '.join(PRIOR_RULES)})")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # fewer page faults per decoder call (hrmedseg.models.malloc_tuning)
        module, self.metadata = resolve_model(model)
        self.click_fix = click_fix or model_click_fix(self.metadata)
        if prior == "gate" and self.metadata.prior_gate is None:
            # Only a gate asked for by name deserves a warning: by default, models without one
            # (user-trained, SAM2, random test weights) simply keep their own masks.
            (log.warning if asked_for_prior else log.debug)("prior 'gate': %s has no fitted prior gate (config['prior_gate'] or a %s file beside it); "
                        "using the model's masks (prior 'model')", self.metadata.source or type(module).__name__, GATE_SUFFIX)
            prior = "model"
        self.prior = prior
        self.backend = resolve_backend(backend, self.device, allow_bf16, module)
        self.model = module.eval().to(self.device)
        self.encoder, default_decoder = build_steps(self.model, self.backend, aot=aot)
        if is_sam2_model(self.model):
            self.backend = "reference"  # its plain modules run under every backend
        self.decoder = decoder or default_decoder
        # A fast decoder keeps per-crop state between prepare and predict: one call at a time.
        self._decode_lock = threading.Lock()
        self.policy = policy or default_policy(self.encoder.input_size, self.metadata)
        if self.policy.input_size != self.encoder.input_size:
            raise ValueError(f"policy input size {self.policy.input_size} != model input size {self.encoder.input_size}")
        self.intensity = intensity or DEFAULT_INTENSITY
        self.cache = EmbeddingCache(cache_bytes)
        self.disk_cache = resolve_disk_cache(disk_cache)
        # Disk keys name the weights by content (a process's object token means nothing on disk).
        self._model_digest = model_digest(self.model) if self.disk_cache is not None else None
        self.decode_batch = max(1, int(decode_batch or (64 if self.device.type == "cuda" else 8)))
        self.mask_threshold = mask_threshold
        self._model_token = object_token(self.model)
        self._scalings: dict[tuple, ChannelScaling] = {}
        self.encoder_calls = 0
        self.decoder_calls = 0

    # -- pieces ---------------------------------------------------------------------------
    def scaling(self, image: LazyImage) -> ChannelScaling:
        """The intensity map of ``image`` (computed once per image source and options)."""
        key = (image.source_key, image.channels, self.intensity)
        if key not in self._scalings:
            self._scalings[key] = compute_scaling(image, self.intensity)
        return self._scalings[key]

    def _cache_key(self, image: LazyImage, crop: Crop, scaling: ChannelScaling) -> tuple:
        return (image.source_key, image.channels, crop.scale, crop.y0, crop.x0, crop.size, scaling.key, self._model_token, self.backend)

    def embedding(self, image: LazyImage, crop: Crop) -> tuple[Any, int]:
        """(the encoder's output on the device, pyramid level read) for a crop, cached.

        The output is the (1, 256, S/16, S/16) embedding for SAM models, and ``Sam2Features``
        (the embedding plus the 1/4 and 1/8 maps) for SAM2 models; the cache counts every tensor.
        """
        scaling = self.scaling(image)
        key = self._cache_key(image, crop, scaling)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        pixels = disk_key = None
        if self.disk_cache is not None:
            if not image.source_key.startswith(PERSISTENT_SOURCES):  # arrays are keyed by their pixels
                pixels, level = read_crop(image, crop, scaling.apply)
            disk_key = (image_identity(image.source_key, pixels), image.channels, crop.scale, crop.y0, crop.x0, crop.size, scaling.key, self._model_digest, self.backend)
            hit = self.disk_cache.get(disk_key, self.device)
            if hit is not None:
                self.cache.put(key, hit)
                return hit
        if pixels is None:
            pixels, level = read_crop(image, crop, scaling.apply)
        emb = self.encoder(pixels)
        self.encoder_calls += 1
        self.cache.put(key, (emb, level))
        if disk_key is not None:
            self.disk_cache.put(disk_key, emb, level)
        return emb, level

    def _decode(self, emb: Any, prompts: ObjectPrompts, batch: list[int], crop: Crop, shape_yx, click_update: str,
                policy: CropPolicy) -> tuple:
        """One decoder call for objects ``batch`` of one crop (equal :meth:`ObjectPrompts.signature`).

        Prompts go in the crop's input frame; a decoder is given clicks and mask prompts only
        when there are some (a box-only decoder keeps working). A :class:`RegionBoxDecoder`
        computes only the cells ``mask_region`` reads around each object's extent.
        """
        n_points, has_box, has_mask = prompts.signature(batch[0])
        input_boxes = torch.from_numpy(crop.box_to_input(prompts.boxes[batch])) if has_box else None
        if click_update == "pixel" and has_box and n_points:
            # A boxed object's logits are its box's alone; its clicks act on the native mask
            # (predict_boxes: fix_clicked_pixels), so box + clicks re-run exactly.
            n_points, has_mask = 0, False
        extra: dict[str, Any] = {}
        if n_points:
            xy = np.stack([prompts.points[i] for i in batch])  # (N, P, 2)
            extra["points"] = torch.from_numpy((xy - [crop.x0, crop.y0]) * crop.scale)
            extra["point_labels"] = torch.from_numpy(np.stack([prompts.point_labels[i] for i in batch]))
        previous = None
        if has_mask:
            previous = torch.stack([prompts.mask_inputs[i] for i in batch])  # (N, 1, h, w)
            side = 4 * int((emb.image_embed if isinstance(emb, Sam2Features) else emb).shape[-1])
            if tuple(previous.shape[-2:]) != (side, side):
                raise InputError(f"mask inputs of objects {batch} are {tuple(previous.shape[-2:])}; this model's low-res logits are ({side}, {side})")
            if click_update == "sam" or self.click_mask_prompt or not n_points:  # else: only the local update reads it
                extra["mask_inputs"] = previous
        extents = prompts.extents[batch]
        with self._decode_lock:
            if isinstance(self.decoder, RegionBoxDecoder):
                margin = region_margin(extents, crop, policy, shape_yx, self.decoder.low_res_size(emb))
                extra["extent"] = torch.from_numpy(crop.box_to_input(extents))
                logits, scores = self.decoder(emb, input_boxes, margin=margin, **extra)
            else:
                logits, scores = self.decoder(emb, input_boxes, **extra)
        # Models trained with a shape prior (models/box_prior.py) predict only its correction.
        if has_box:
            size = (crop.input_size, crop.input_size)
            # The prior rule may replace box-only masks; clicks and mask prompts are the user's correction.
            rule = self.prior if not n_points and not has_mask else "model"
            ellipse = None  # computed once for the model's prior and the rule
            if self.metadata.box_prior == "ellipse" or rule != "model":
                ellipse = ellipse_prior_logits(input_boxes.to(logits.device), logits.shape[-2:], size)
            logits = add_box_prior(logits, input_boxes, size, self.metadata.box_prior, ellipse)
            logits = apply_prior_rule(logits, scores, input_boxes, size, rule, self.metadata.prior_gate, ellipse)
        if n_points and has_mask and click_update in ("local", "pixel"):  # "pixel" here: an object of clicks alone
            logits = self._local_update(logits, prompts, batch, crop, input_boxes, previous)
        return logits, scores

    def _local_update(self, logits, prompts: ObjectPrompts, batch: list[int], crop: Crop, input_boxes, previous) -> Any:
        """The "local" click update (:mod:`hrmedseg.engine.click_update`) of ``batch``'s new logits."""
        to_grid = logits.shape[-1] / crop.input_size  # input px -> low-res grid px
        newest = np.stack([prompts.points[i][-1] for i in batch])  # (N, 2) native xy
        clicks = (newest - [crop.x0, crop.y0]) * crop.scale * to_grid
        positive = np.array([prompts.point_labels[i][-1] == 1 for i in batch])
        boxes = None if input_boxes is None else input_boxes.cpu().numpy() * to_grid
        return local_click_update(logits, previous, clicks, positive, boxes, self.mask_threshold)

    def _fix_clicks(self, logits: torch.Tensor, crop: Crop, region, mask: np.ndarray, prompts: ObjectPrompts, i: int) -> np.ndarray:
        """Object ``i``'s native ``mask`` with :func:`~hrmedseg.engine.click_update.fix_clicked_pixels`
        applied to its clicks (unchanged without clicks); logits: its (1, h, w) low-res logits."""
        if not len(prompts.points[i]):
            return mask
        x0, y0, x1, y1 = prompts.extents[i]
        relative = lambda window: native_logits(logits, crop, window) - self.mask_threshold  # noqa: E731  (the mask: > 0)
        return fix_clicked_pixels(mask, region, relative, prompts.points[i], prompts.point_labels[i],
                                  max(x1 - x0, y1 - y0), self.click_fix)

    def clear_cache(self) -> None:
        """Forget embeddings (needed after editing an in-memory array in place)."""
        self.cache.clear()
        self._scalings.clear()

    # -- public API -----------------------------------------------------------------------
    def predict_box(self, image: Any, box: Sequence[float]) -> ObjectMask:
        """One box (x0, y0, x1, y1, native pixels) -> its :class:`ObjectMask`."""
        return next(iter(self.predict_boxes(image, np.asarray(box, np.float64).reshape(1, 4))))

    def predict_boxes(
        self,
        image: Any,
        boxes: Any,
        progress: Callable[[int, int], Any] | None = None,
        cancel: Any = None,
        *,
        points: Sequence[Any] | None = None,
        point_labels: Sequence[Any] | None = None,
        mask_inputs: Sequence[Any] | None = None,
        crops: Sequence[Crop | None] | None = None,
        object_size: float | None = None,
        click_update: str | None = None,
        policy: CropPolicy | None = None,
    ) -> Iterator[ObjectMask]:
        """Yield an :class:`ObjectMask` per object, in input order.

        Objects are prompted by ``boxes`` (N, 4) native xyxy and/or clicks (see
        :mod:`hrmedseg.engine.prompts`): ``points`` one (P_i, 2) native xy list per object,
        ``point_labels`` (P_i,) 1 positive / 0 negative (default positive); a box row of NaN, or
        ``boxes`` None, means clicks alone (the crop then sits around the clicks at the scale of
        an ``object_size`` px object: default the median box side). ``mask_inputs``: per object
        None or an earlier result's ``low_res_logits`` (SAM's mask prompt), which needs that
        result's crop in ``crops`` (per object None or a :class:`Crop` to use; the object's
        embedding is then the cached one of that crop). Objects sharing a crop are encoded once
        and decoded ``decode_batch`` at a time (objects with as many clicks together).
        ``click_update``: this call's "local" or "sam" update of objects with clicks and
        ``mask_inputs`` (None: ``self.click_update``); "sam" where the mask input is not this
        object's own earlier mask (propagation's neighbour slice). ``policy``: this call's crop
        planning (None: ``self.policy``; the annotator passes
        :func:`~hrmedseg.engine.crops.interactive_policy` of it), same input size.

        ``progress(done, total)`` is called after each yielded object; when ``cancel.is_set()``
        becomes true the generator stops before the next decoder call. Every prompt is checked
        before any work starts (InputError naming the object; overhanging boxes are clipped with
        a warning).
        """
        image = open_image(image)
        click_update = check_click_update(click_update or self.click_update)
        prompts = check_prompts(boxes, image.shape_yx, points, point_labels, mask_inputs, object_size)
        total = len(prompts)
        policy = self._check_policy(policy)
        given = self._check_crops(crops, prompts)
        planned = plan_crops(prompts.extents, image.shape_yx, policy, lambda c: self._cache_key(image, c, self.scaling(image)) in self.cache)
        plan = [g or c for g, c in zip(given, planned)]
        ready: dict[int, ObjectMask] = {}
        next_out = 0
        for crop, members in group_by_crop(plan).items():
            if cancel is not None and cancel.is_set():
                return
            emb, level = self.embedding(image, crop)
            groups: dict[tuple, list[int]] = {}
            for i in members:
                groups.setdefault(prompts.signature(i), []).append(i)
            for group in groups.values():
                for start in range(0, len(group), self.decode_batch):
                    if cancel is not None and cancel.is_set():
                        return
                    batch = group[start : start + self.decode_batch]
                    logits, scores = self._decode(emb, prompts, batch, crop, image.shape_yx, click_update, policy)
                    self.decoder_calls += 1
                    regions = [mask_region(prompts.extents[i], crop, policy, image.shape_yx) for i in batch]
                    masks = logits_to_native_batch(logits, crop, regions, self.mask_threshold)
                    if click_update == "pixel":
                        masks = [self._fix_clicks(logits[j], crop, region, mask, prompts, i)
                                 for j, (i, region, mask) in enumerate(zip(batch, regions, masks))]
                    kept = logits.detach().float().cpu()
                    for j, (i, region, mask) in enumerate(zip(batch, regions, masks)):
                        ready[i] = ObjectMask(
                            tuple(float(v) for v in prompts.extents[i]), region, mask, float(scores[j]), i, crop, level,
                            has_box=prompts.has_box(i), points=prompts.points[i], point_labels=prompts.point_labels[i],
                            low_res_logits=kept[j],
                        )
                    while next_out in ready:
                        yield ready.pop(next_out)
                        next_out += 1
                        if progress is not None:
                            progress(next_out, total)

    def _check_policy(self, policy: CropPolicy | None) -> CropPolicy:
        """A call's crop policy: ``self.policy`` unless one is given, which must be for the model's input size."""
        if policy is None:
            return self.policy
        if policy.input_size != self.policy.input_size:
            raise InputError(f"crop policy for a {policy.input_size} px input, but the model takes {self.policy.input_size}")
        return policy

    def _check_crops(self, crops: Sequence[Crop | None] | None, prompts: ObjectPrompts) -> list[Crop | None]:
        """Per-object crops to use (None: plan one); a mask prompt must come with its crop."""
        given = [None] * len(prompts) if crops is None else list(crops)
        if len(given) != len(prompts):
            raise InputError(f"crops has {len(given)} entries, but there are {len(prompts)} objects")
        for i, crop in enumerate(given):
            if prompts.mask_inputs[i] is not None and crop is None:
                raise InputError(f"object {i} has a mask input but no crop: pass the earlier result's crop in crops")
            if crop is not None and crop.input_size != self.policy.input_size:
                raise InputError(f"crop of object {i} is for a {crop.input_size} px input, but the model takes {self.policy.input_size}")
        return given

    def segment(
        self,
        image: Any,
        boxes: Any,
        labels: Any = None,
        first_id: int = 1,
        overlap: str = "new_wins",
        progress: Callable[[int, int], Any] | None = None,
        cancel: Any = None,
        **prompts: Any,
    ) -> tuple[Any, list[ObjectRecord]]:
        """Segment every box into a label image; returns (labels, per-object records).

        Box ``i`` gets label ``first_id + i``. ``labels``: None (a new int32 (H, W) array), any
        (H, W) array-like to write into (numpy, memmap, zarr; only each object's region is
        touched), or a :class:`SparseLabels`. ``overlap``: "new_wins" or "keep_existing" (see
        :mod:`hrmedseg.engine.labels`). Empty masks are kept in the records (``empty=True``,
        area 0) and logged. If cancelled, records cover the boxes done so far. ``prompts``:
        :meth:`predict_boxes`'s keywords (``points``, ``point_labels``, ``mask_inputs``,
        ``crops``, ``object_size``); ``boxes`` may then be None or hold NaN rows.
        """
        image = open_image(image)
        objects = self.predict_boxes(image, boxes, progress=progress, cancel=cancel, **prompts)
        return paste_objects(objects, image.shape_yx, labels, first_id, overlap)

    def segment_auto(self, image: Any, proposer: Any = "nuclei", labels: Any = None, options: Any = None, **kwargs: Any) -> tuple[Any, list[ObjectRecord]]:
        """Segment every object without boxes (see :func:`hrmedseg.engine.auto.segment_auto`).

        ``proposer``: "nuclei" (the bundled prompt-free nuclei model), "grid" (SAM's automatic
        mask generator's point grid on this model), a prompt-free model name/path or a
        ``SemanticPredictor``; ``options``: an :class:`~hrmedseg.engine.auto.AutoOptions`.
        """
        from .auto import segment_auto

        return segment_auto(self, image, proposer, labels=labels, options=options, **kwargs)


def paste_objects(
    objects: Iterable[ObjectMask], shape_yx: tuple[int, int], labels: Any = None, first_id: int = 1, overlap: str = "new_wins"
) -> tuple[Any, list[ObjectRecord]]:
    """Paste each object's mask as label ``first_id + box_index``; returns (labels, per-object records).

    ``labels``: None (a new int32 (H, W) array), an (H, W) array-like or a :class:`SparseLabels`,
    as in :meth:`BoxPredictor.segment` (whose pasting this is).
    """
    _check_policy(overlap)
    if labels is None:
        labels = np.zeros(shape_yx, np.int32)
    shape = tuple(labels.shape_yx if isinstance(labels, SparseLabels) else labels.shape)
    if shape != tuple(shape_yx):
        raise InputError(f"labels have shape {shape}, but the image is {tuple(shape_yx)} (H, W)")
    records: list[ObjectRecord] = []
    for obj in objects:
        oid = first_id + obj.box_index
        if isinstance(labels, SparseLabels):
            labels.add(obj, oid)
        else:
            paste_object(labels, obj, oid, overlap)
        note = "empty mask" if obj.empty else ""
        if obj.empty:
            log.warning("%s gave an empty mask (id %d not in the label image)", box_label(obj.box_index, obj.box, "boxes"), oid)
        records.append(ObjectRecord(oid, obj.box_index, obj.box, obj.region, 0, obj.score, obj.empty, note))
    if isinstance(labels, SparseLabels):
        areas = labels.areas()
        for r in records:
            r.area = areas.get(r.id, 0)
    else:
        for r in records:
            if not r.empty:
                y0, y1, x0, x1 = r.region
                r.area = int((np.asarray(labels[y0:y1, x0:x1]) == r.id).sum())
    for r in records:
        if not r.empty and r.area == 0:
            r.note = "covered by later objects" if overlap == "new_wins" else "all pixels already labelled"
    return labels, records
