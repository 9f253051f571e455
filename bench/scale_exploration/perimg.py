import os
import sys
import numpy as np
from pathlib import Path
from PIL import Image
sys.path.insert(0, "bench")
from eval_default_models import SHARED, val_items
from hrmedseg.engine.auto import AutoOptions, proposal_instances
from hrmedseg.training.metrics import match_instances
items = {it["name"]: it for it in val_items("nuclei_dsb2018", val=False)}
o = AutoOptions()
for f in sorted(Path(os.environ.get("SCALE_CACHE", "/tmp/hscale") + "/cache").glob("*.npz")):
    d = dict(np.load(f)); gt = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / items[f.stem]["mask"]))
    r0 = match_instances(proposal_instances(d["p0"] > .5, o), gt); rs = match_instances(proposal_instances(d["ps"] > .5, o), gt)
    fg0 = ((d["p0"] > .5) == (gt > 0)).mean(); fgs = ((d["ps"] > .5) == (gt > 0)).mean()
    print(f"{f.stem[-8:]} {str(d['kind']):5s} est {float(d['est']):5.1f} scale {float(d['scale']):.2f}  F1 {r0['f1']:.2f} -> {rs['f1']:.2f}  npred {r0['n_pred']}->{rs['n_pred']} ngt {r0['n_gt']} fgacc {fg0:.3f}->{fgs:.3f}")
