"""Batch segmentation of many images on a Dask cluster (``hrmedseg batch``).

    from distributed import Client
    from hrmedseg.batch import BatchConfig, expand_inputs, model_digest, run_batch
    jobs = expand_inputs(["slides/"], boxes="boxes/")
    cfg = BatchConfig("boxes", "hrmedseg_sam_default", model_sha256=model_digest("hrmedseg_sam_default")["sha256"])
    manifest = run_batch(Client("tcp://scheduler:8786"), jobs, "results/", cfg)
"""

from .inputs import ImageJob, expand_inputs
from .manifest import Manifest
from .run import model_digest, run_batch
from .tasks import MODES, OUTPUT_FORMATS, BatchConfig, plan_box_regions, plan_tiles
from .worker_cache import WorkerSetup

__all__ = [
    "MODES",
    "OUTPUT_FORMATS",
    "BatchConfig",
    "ImageJob",
    "Manifest",
    "WorkerSetup",
    "expand_inputs",
    "model_digest",
    "plan_box_regions",
    "plan_tiles",
    "run_batch",
]
