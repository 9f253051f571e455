"""Proposals-alone pooled F1 @ 0.5 by modality for variants, from the cached training probabilities."""
import sys, json
import numpy as np
from dataclasses import replace
from pathlib import Path
from PIL import Image
sys.path.insert(0, "bench")
from eval_default_models import SHARED, val_items
from hrmedseg.engine.auto import AutoOptions, proposal_instances
from hrmedseg.training.metrics import match_instances
TRAIN_DIAM = 16.4
items = {it["name"]: it for it in val_items("nuclei_dsb2018", val=False)}
import os; files = sorted(Path(os.environ.get("CACHE", os.environ.get("SCALE_CACHE", "/tmp/hscale") + "/cache")).glob("*.npz"))
need = sys.argv[1] if len(sys.argv) > 1 else "p0"
data = []
for f in files:
    d = dict(np.load(f))
    if need not in d: continue
    d["gt"] = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / items[f.stem]["mask"]))
    data.append(d)
print(len(data), "images", sum(str(d["kind"]) == "light" for d in data), "light")
base = AutoOptions()

def sdist(est, k=1.0):
    return int(np.clip(round(6 * (est / TRAIN_DIAM) ** k), 3, 24))

def ratio_far(est, r):
    return abs(np.log(est / TRAIN_DIAM)) > np.log(r)

V = {
    "baseline p0": lambda d: (d["p0"], base),
    "flip h": lambda d: ((d["p0"].astype(np.float32) + d["ph"]) / 2, base),
    "flip h+v": lambda d: ((d["p0"].astype(np.float32) + d["ph"] + d["pv"]) / 3, base),
    "rescale always": lambda d: (d["ps"], base),
    "rescale if x1.25": lambda d: (d["ps"] if ratio_far(float(d["est"]), 1.25) else d["p0"], base),
    "rescale if x1.5": lambda d: (d["ps"] if ratio_far(float(d["est"]), 1.5) else d["p0"], base),
    "rescale if x2": lambda d: (d["ps"] if ratio_far(float(d["est"]), 2.0) else d["p0"], base),
    "split ~ size": lambda d: (d["p0"], replace(base, split_distance=sdist(float(d["est"])))),
    "split ~ sqrt size": lambda d: (d["p0"], replace(base, split_distance=sdist(float(d["est"]), 0.5))),
    "split ~ size, holes ~ size^2": lambda d: (d["p0"], replace(base, split_distance=sdist(float(d["est"])), max_hole_area=int(1024 * max(1, float(d["est"]) / TRAIN_DIAM) ** 2))),
}
if all("phv" in d for d in data):
    V["flip h+v+hv"] = lambda d: ((d["p0"].astype(np.float32) + d["ph"] + d["pv"] + d["phv"]) / 4, base)
    for s in ("1.0", "1.4", "2.8"):
        V[f"fixed scale {s} (light; dark p0)"] = lambda d, s=s: (d[f"f{s}"] if str(d["kind"]) == "light" else d["p0"], base)
    V["multi-scale mean 1.4/2/2.8"] = lambda d: ((d["p0"].astype(np.float32) + d["f1.4"] + d["f2.8"]) / 3 if str(d["kind"]) == "light" else d["p0"], base)
    V["multi-scale mean 1.4/2"] = lambda d: ((d["p0"].astype(np.float32) + d["f1.4"]) / 2 if str(d["kind"]) == "light" else d["p0"], base)
V["enlarge only if est < d/1.25"] = lambda d: (d["ps"] if float(d["est"]) < TRAIN_DIAM / 1.25 else d["p0"], base)
V["enlarge only if est < d/1.5"] = lambda d: (d["ps"] if float(d["est"]) < TRAIN_DIAM / 1.5 else d["p0"], base)
V["flip h + enlarge<d/1.25"] = lambda d: (((d["ps"].astype(np.float32)) if float(d["est"]) < TRAIN_DIAM / 1.25 else (d["p0"].astype(np.float32) + d["ph"]) / 2), base)
V["flip h, thr 0.4"] = lambda d: ((d["p0"].astype(np.float32) + d["ph"]) / 2, replace(base, threshold=0.4))
V["flip h+v, thr 0.4"] = lambda d: ((d["p0"].astype(np.float32) + d["ph"] + d["pv"]) / 3, replace(base, threshold=0.4))
V["flip h, split 5"] = lambda d: ((d["p0"].astype(np.float32) + d["ph"]) / 2, replace(base, split_distance=5))
V["flip h, split 7"] = lambda d: ((d["p0"].astype(np.float32) + d["ph"]) / 2, replace(base, split_distance=7))
V["flip h, split ~ size"] = lambda d: ((d["p0"].astype(np.float32) + d["ph"]) / 2, replace(base, split_distance=sdist(float(d["est"]))))
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
for name, fn in V.items():
    if only and not any(o in name for o in only): continue
    tot = {"dark": [0, 0], "light": [0, 0]}
    try:
        [fn(d) for d in data[:0]] ; fn(data[0]) if data else None
    except KeyError:
        continue
    for d in data:
        p, opt = fn(d)
        r = match_instances(proposal_instances(p > opt.threshold, opt), d["gt"])
        t = tot[str(d["kind"])]; t[0] += r["tp"]; t[1] += r["n_pred"] + r["n_gt"]
    f = {k: 2 * v[0] / max(v[1], 1) for k, v in tot.items()}
    allf = 2 * (tot["dark"][0] + tot["light"][0]) / max(tot["dark"][1] + tot["light"][1], 1)
    print(f"{name:32s} dark {f['dark']:.3f} light {f['light']:.3f} all {allf:.3f}", flush=True)
