"""Add fixed-scale probabilities (model scale 1.0 / 1.4 / 2.8; 2.0 is the trained one) and the v+h flip to the cache."""
import os
import sys, copy
import numpy as np
from pathlib import Path
from PIL import Image
sys.path.insert(0, "bench")
import torch
torch.set_num_threads(2)
from eval_default_models import SHARED, val_items
from hrmedseg.engine.auto import resolve_proposer
from hrmedseg.engine.semantic import InputGeometry
items = {it["name"]: it for it in val_items("nuclei_dsb2018", val=False)}
sem = resolve_proposer("nuclei", "cpu")
def probs(img, scale):
    s = copy.copy(sem); s.geometry = InputGeometry("crop", 1024, scale)
    return (1 / (1 + np.exp(-np.clip(s.predict_logits(img)[0], -50, 50)))).astype(np.float16)
for f in sorted(Path(os.environ.get("SCALE_CACHE", "/tmp/hscale") + "/cache").glob("*.npz")):
    d = dict(np.load(f))
    if "phv" in d: continue
    img = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / items[f.stem]["image"]).convert("RGB"))
    for s in ((1.0, 1.4, 2.8) if str(d["kind"]) == "light" else ()):
        d[f"f{s}"] = probs(img, s)
    d["phv"] = probs(np.ascontiguousarray(img[::-1, ::-1]), 2.0)[::-1, ::-1].copy()
    np.savez_compressed(f, **d)
    print(f.stem, flush=True)
