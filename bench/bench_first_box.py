"""First box on a new region: median of 5 (fresh caches, different boxes), with the step breakdown.

Prints one JSON line naming the hrmedseg sources it ran, so old and new sources can be run
alternately in one session (docs/benchmarks.md, issue 20):

    for src in /tmp/base/src src; do PYTHONPATH=$src:bench .venv/bin/python bench/bench_first_box.py; done
"""
import sys, json
import numpy as np, torch
import os
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
import hrmedseg
from bench_engine import nucleus_boxes, test_image, build_ours, first_box_breakdown
from hrmedseg.engine import BoxPredictor, CropPolicy
boxes = nucleus_boxes(200, 2048); image = test_image(2048, boxes)
p = BoxPredictor(build_ours(False), device="cpu", policy=CropPolicy(max_upscale=2.0))
p.predict_box(np.zeros((300, 300), np.uint16), [10, 10, 40, 40])
runs = [first_box_breakdown(p, image, boxes[i * 11], torch.device("cpu")) for i in range(5)]
med = {k: round(float(np.median([r[k] for r in runs])), 4) for k in runs[0]}
print(json.dumps({"src": hrmedseg.__file__, "backend": p.backend, "median": med}))
