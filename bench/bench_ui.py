"""UI responsiveness of the annotator: the longest Qt event-loop stall while masks are computed.

A QTimer asks to fire every ``--tick-ms``; the gaps between its firings are what a user feels
(a stall of G ms = the window does not repaint or react for G ms). Three runs, same process:

1. idle       : nothing computes (the baseline: timer and X server jitter alone);
2. worker     : boxes drawn in the dock are segmented the plugin's way (napari thread worker);
3. ui-thread  : the same predictions called directly on the UI thread (what the plugin avoids).
4. with --hog : run 2 again while a busy-loop process runs on every core, with the worker at
   the plugin's nice value (0) and then at nice 10 (the old setting; a thread cannot be made
   nicer and then un-niced, so this order): the stall and boxes/s of each.

    xvfb-run -a -s '-screen 0 1600x1000x24' .venv/bin/python bench/bench_ui.py            # small model
    xvfb-run -a -s '-screen 0 1600x1000x24' .venv/bin/python bench/bench_ui.py --full     # paper-size LGViT
    xvfb-run -a -s '-screen 0 1600x1000x24' .venv/bin/python bench/bench_ui.py --hog      # + under load

Prints a markdown table and writes JSON to --out. Random weights: the masks are meaningless,
the timing is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from report import cpu_name
import torch._dynamo  # noqa: F401  (triton must load before napari's OpenGL context; see napari_hrmedseg._model)


def _ticker(app, tick_ms: int):
    from qtpy.QtCore import QTimer

    stamps: list[float] = []
    timer = QTimer()
    timer.setInterval(tick_ms)
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))
    return timer, stamps


def _gaps_ms(stamps: list[float]) -> np.ndarray:
    return np.diff(np.asarray(stamps)) * 1000.0 if len(stamps) > 1 else np.zeros(1)


def _summary(name: str, stamps: list[float], seconds: float, n_masks: int) -> dict:
    gaps = _gaps_ms(stamps)
    return {
        "run": name,
        "seconds": round(seconds, 3),
        "masks": n_masks,
        "ticks": len(stamps),
        "boxes_per_s": round(n_masks / seconds, 2) if n_masks else None,
        "longest_stall_ms": round(float(gaps.max()), 1),
        "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
        "median_gap_ms": round(float(np.median(gaps)), 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="paper-size LGViT (C=96, L=10) instead of a small one")
    parser.add_argument("--boxes", type=int, default=4, help="boxes per run")
    parser.add_argument("--tick-ms", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--hog", action="store_true", help="also measure under a busy-loop process on every core")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ui.json"))
    args = parser.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from hrmedseg.data import load_sample
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models import EncoderConfig, build_encoder, build_hrmedseg_sam
    from napari_hrmedseg._layer_image import layer_plane
    from napari_hrmedseg._state import ModelInfo, rectangle_from_box
    from napari_hrmedseg.annotator import jobs
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = EncoderConfig() if args.full else EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))
    predictor = BoxPredictor(build_hrmedseg_sam(encoder=build_encoder(config)).eval(), device="cpu", cache_bytes=0)

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    image = load_sample("nuclei_fluorescence")
    layer = viewer.add_image(image, name="nuclei")
    widget = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    ann = widget.annotator
    ann.use_predictor(predictor, ModelInfo(name="random-bench", untrained=True))
    rng = np.random.default_rng(0)

    def boxes(n):
        out = []
        for _ in range(n):
            y, x = rng.integers(20, 400), rng.integers(20, 560)
            out.append((float(x), float(y), float(x + rng.integers(40, 120)), float(y + rng.integers(40, 100))))
        return out

    def pump_until(cond, limit_s=600.0):
        t0 = time.perf_counter()
        while not cond() and time.perf_counter() - t0 < limit_s:
            app.processEvents()
            time.sleep(0.001)

    for _ in range(20):  # let the window settle
        app.processEvents()
        time.sleep(0.01)
    # warm-up (first torch call allocates, JIT-free but page faults)
    predictor.predict_box(layer_plane(layer, ()), (10, 10, 60, 60))

    results = []
    timer, stamps = _ticker(app, args.tick_ms)

    # 1. idle
    timer.start()
    t0 = time.perf_counter()
    pump_until(lambda: time.perf_counter() - t0 > args.idle_s)
    timer.stop()
    results.append(_summary("idle (baseline)", stamps, time.perf_counter() - t0, 0))

    # 2. the plugin's way: each box drawn -> thread worker
    def worker_run(name: str) -> None:
        stamps.clear()
        timer.start()
        t0 = time.perf_counter()
        for box in boxes(args.boxes):
            ann.boxes_layer.add_rectangles([rectangle_from_box(box)])
            pump_until(lambda: ann.pending == 0)
        timer.stop()
        results.append(_summary(name, stamps, time.perf_counter() - t0, args.boxes))

    worker_run(f"worker (plugin, nice {jobs.WORKER_NICENESS})")
    if args.hog:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        try:
            time.sleep(1.0)  # let the hogs reach full speed
            worker_run(f"worker under a hog on every core (plugin, nice {jobs.WORKER_NICENESS})")
            jobs.WORKER_NICENESS = 10
            worker_run("worker under a hog on every core (nice 10, before)")
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()

    # 2b. display cost alone: the same kind of mask writes with no model running (software GL
    # under Xvfb repaints the canvas on the UI thread; this is the floor for showing a mask)
    precomputed = [predictor.predict_box(layer_plane(layer, ()), box) for box in boxes(args.boxes)]
    stamps.clear()
    timer.start()
    t0 = time.perf_counter()
    for i, obj in enumerate(precomputed):
        ann.layers.write(1000 + i, obj.region, obj.mask)
        pump_until(lambda t=time.perf_counter(): time.perf_counter() - t > 0.3)
    timer.stop()
    results.append(_summary("mask writes only (no model)", stamps, time.perf_counter() - t0, args.boxes))

    # 3. the same work on the UI thread, timer still running
    stamps.clear()
    timer.start()
    t0 = time.perf_counter()
    for box in boxes(args.boxes):
        predictor.predict_box(layer_plane(layer, ()), box)
        app.processEvents()
    timer.stop()
    results.append(_summary("ui-thread (contrast)", stamps, time.perf_counter() - t0, args.boxes))

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Xvfb",
        "model": "LGViT C=96 L=10 (paper size)" if args.full else "LGViT C=48 depths (1,1) (small)",
        "image": f"nuclei_fluorescence sample {image.shape}",
        "command": "python " + " ".join(sys.argv),
    }
    lines = [
        "| run | masks | seconds | boxes/s | longest stall (ms) | p99 gap (ms) | median gap (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ] + [
        f"| {r['run']} | {r['masks']} | {r['seconds']} | {r['boxes_per_s'] or '-'} | {r['longest_stall_ms']} | {r['p99_gap_ms']} | {r['median_gap_ms']} |"
        for r in results
    ]
    print("\n".join(f"{k}: {v}" for k, v in meta.items()))
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
