"""Cache prompt-free probabilities on a modality-balanced TRAINING sample (non is_val) for offline variant tests."""
import os
import sys, json, copy, time
import numpy as np
from pathlib import Path
from PIL import Image
sys.path.insert(0, "bench")
import torch
torch.set_num_threads(2)
from eval_default_models import SHARED, val_items
from hrmedseg.engine.auto import AutoOptions, proposal_instances, resolve_proposer
from hrmedseg.engine.semantic import InputGeometry

TRAIN_DIAM = 16.4
info = json.load(open(os.environ.get("SCALE_CACHE", "/tmp/hscale") + "/train_diam.json"))
items = val_items("nuclei_dsb2018", val=False)
kinds = info["kinds"]
light = [i for i, k in enumerate(kinds) if k == "light"][::2]
dark = [i for i, k in enumerate(kinds) if k == "dark"][::19]
order = [x for pair in zip(light, dark) for x in pair] + light[len(dark):] + dark[len(light):]
print(len(light), "light", len(dark), "dark", flush=True)
sem = resolve_proposer("nuclei", "cpu")

def probs(img, scale, flip):
    s = copy.copy(sem); s.geometry = InputGeometry("crop", 1024, scale)
    x = img
    if flip == "h": x = img[:, ::-1]
    if flip == "v": x = img[::-1]
    x = np.ascontiguousarray(x)
    p = 1 / (1 + np.exp(-s.predict_logits(x)[0]))
    if flip == "h": p = p[:, ::-1]
    if flip == "v": p = p[::-1]
    return p.astype(np.float16)

def median_diam(inst):
    a = np.bincount(inst.ravel())[1:]; a = a[a > 0]
    return float(np.median(np.sqrt(4 * a / np.pi))) if len(a) else TRAIN_DIAM

for i in order:
    it = items[i]
    out = Path(os.environ.get("SCALE_CACHE", "/tmp/hscale") + "/cache") / (it["name"] + ".npz")
    if out.exists(): continue
    img = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / it["image"]).convert("RGB"))
    t0 = time.perf_counter()
    d = {"p0": probs(img, 2.0, None)}
    t1 = time.perf_counter()
    d["ph"] = probs(img, 2.0, "h"); d["pv"] = probs(img, 2.0, "v")
    est = median_diam(proposal_instances(d["p0"] > 0.5, AutoOptions()))
    scale = float(np.clip(2.0 * TRAIN_DIAM / est, 0.5, 4.0))
    d["ps"] = probs(img, scale, None)
    np.savez_compressed(out, **d, est=est, scale=scale, kind=kinds[i], t_call=t1 - t0)
    print(it["name"], kinds[i], img.shape, f"est {est:.1f} true {info['diam'][i]:.1f} scale {scale:.2f} call {t1-t0:.1f}s", flush=True)
