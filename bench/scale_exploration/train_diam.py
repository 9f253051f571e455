"""Typical nucleus size of the DSB training masks (non is_val): equivalent diameter sqrt(4A/pi)."""
import os
import sys, json
import numpy as np
from PIL import Image
sys.path.insert(0, "bench")
from eval_default_models import SHARED, val_items
from eval_auto import modality
items = val_items("nuclei_dsb2018", val=False)
per_obj, per_img, kinds = [], [], []
for it in items:
    m = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / it["mask"]))
    a = np.bincount(m.ravel())[1:]; a = a[a > 0]
    d = np.sqrt(4 * a / np.pi)
    per_obj.extend(d); per_img.append(np.median(d))
    kinds.append(modality(np.asarray(Image.open(SHARED / "nuclei_dsb2018" / it["image"]).convert("RGB"))))
per_img = np.array(per_img); kinds = np.array(kinds)
print(len(items), "training images", len(per_obj), "objects")
print("median per object", np.median(per_obj), "median of per-image medians", np.median(per_img))
for k in ("dark", "light"):
    p = per_img[kinds == k]; print(k, len(p), "per-image median diam: quartiles", np.percentile(p, [10, 25, 50, 75, 90]).round(1))
json.dump({"names": [it["name"] for it in items], "kinds": kinds.tolist(), "diam": per_img.tolist()}, open(os.environ.get("SCALE_CACHE", "/tmp/hscale") + "/train_diam.json", "w"))
