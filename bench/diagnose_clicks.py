"""Is the engine's click path wrong, or the models? A diagnostic for issue #13.

For the default model and LiteMedSAM, on the first 2 held-out nuclei images (4 objects each): Dice
after the box and 1..3 clicks of bench_clicks.py's annotator, how many positive / negative clicks
raised the Dice, and the range of the low-res logits fed back as mask prompt; with the mask prompt
on the reference backend (SAM's full logits), the fast backend (cells outside the object's region
at -1e4), the fast backend with the mask prompt clamped to +-20, and without the mask prompt.

Usage: cd bench && python diagnose_clicks.py
"""
import time
import numpy as np, torch
torch.set_num_threads(2)
from bench_clicks import next_click
from eval_default_models import dice_iou
from eval_zero_shot import paste, prompts
from hrmedseg.engine import BoxPredictor

def run(spec, backend, mask_prompt, clamp=None, n_img=2, n_obj=4):
    pred = BoxPredictor(spec, device="cpu", backend=backend)
    rows, helped, lr_range = [], [], []
    for _, image, objs in prompts("nuclei_dsb2018", n_obj, n_img):
        for gt, box in objs:
            first = next(pred.predict_boxes(image, box[None])); last = first
            d = [dice_iou(paste(first, gt.shape), gt)[0]]
            xy, lab = np.zeros((0, 2)), np.zeros(0, np.int64)
            for k in range(3):
                c = next_click(paste(last, gt.shape), gt)
                if c is None: d.append(d[-1]); continue
                xy, lab = np.r_[xy, c[0][None]], np.r_[lab, c[1]]
                lr = last.low_res_logits
                lr_range.append((float(lr.min()), float(lr.max())))
                if clamp is not None: lr = lr.clamp(-clamp, clamp)
                extra = dict(mask_inputs=[lr], crops=[last.crop]) if mask_prompt else dict(crops=[first.crop])
                last = next(pred.predict_boxes(image, box[None], points=[xy], point_labels=[lab], **extra))
                d.append(dice_iou(paste(last, gt.shape), gt)[0])
                helped.append((c[1], d[-1] > d[-2]))
            rows.append(d)
        pred.clear_cache()
    rows = np.array(rows)
    h = np.array(helped)
    pos = h[h[:, 0] == 1][:, 1] if len(h) else []
    print(spec, backend, "mask" if mask_prompt else "nomask", "clamp", clamp, "dice box/1/2/3:", np.round(rows.mean(0), 3),
          "pos clicks helped %d/%d" % (sum(pos), len(pos)), "neg helped %d/%d" % (h[h[:,0]==0][:,1].sum(), (h[:,0]==0).sum()),
          "lr min/max", np.round(np.min([a for a,_ in lr_range]),1), np.round(np.max([b for _,b in lr_range]),1), flush=True)

for spec in ("hrmedseg_sam_default", "litemedsam"):
    for backend, mp, cl in (("fast", True, None), ("reference", True, None), ("fast", True, 20.0), ("fast", False, None)):
        t = time.time(); run(spec, backend, mp, cl); print("  %.0fs" % (time.time() - t), flush=True)
