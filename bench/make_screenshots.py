"""Screenshots of the annotator dock on the bundled samples, taken in a real window (Xvfb is fine).

    xvfb-run -a -s '-screen 0 1600x1000x24' .venv/bin/python bench/make_screenshots.py
    xvfb-run -a -s '-screen 0 1600x1000x24' .venv/bin/python bench/make_screenshots.py --model hrmedseg-sam-nuclei

Boxes are placed on bright blobs found by Otsu thresholding (no annotation is read). Without
--model, a randomly initialised HRMedSegSAM makes the masks: such screenshots show the layout
only, and the dock's red banner says so; captions must say "random weights".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch._dynamo  # noqa: F401  (triton before napari's OpenGL context; see napari_hrmedseg._model)


def blob_boxes(image: np.ndarray, n: int, min_area: int = 150) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) around the ``n`` largest bright blobs, padded by 4 px."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    grey = image.mean(-1) if image.ndim == 3 else image
    regions = [r for r in regionprops(label(grey > threshold_otsu(grey))) if r.area >= min_area]
    regions.sort(key=lambda r: -r.area)
    out = []
    for r in regions[:n]:
        y0, x0, y1, x1 = r.bbox
        out.append((float(x0 - 4), float(y0 - 4), float(x1 + 4), float(y1 + 4)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="weights (registry name or file); default: untrained random weights")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_hrmedseg._model import UNTRAINED_CHOICE
    from napari_hrmedseg._sample_data import _layer
    from napari_hrmedseg._state import rectangle_from_box
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    torch.manual_seed(0)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    app = None

    def pump(seconds: float = 0.0, until=None, limit: float = 900.0):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit:
            app.processEvents()
            if until is not None and until() and time.perf_counter() - t0 >= seconds:
                return
            if until is None and time.perf_counter() - t0 >= seconds:
                return
            time.sleep(0.01)

    for sample, n_boxes, name in (("nuclei_fluorescence", 8, "annotator_nuclei"), ("fundus", 1, "annotator_fundus")):
        viewer = napari.Viewer(show=True, title="HRMedSeg annotator")
        app = QApplication.instance()
        viewer.window._qt_window.resize(1500, 950)
        data, meta, _ = _layer(sample)[0]
        viewer.add_image(data, **meta)
        widget = AnnotatorWidget(viewer)
        viewer.window.add_dock_widget(widget, name="HRMedSeg annotator", area="right")
        widget.device_combo.setCurrentText("cpu")
        widget.set_model(args.model or UNTRAINED_CHOICE)
        pump(until=lambda: widget.annotator.predictor is not None or widget.missing_box.isVisible())
        if widget.annotator.predictor is None:
            print(f"model not loaded: {widget.status_label.text()}", file=sys.stderr)
            return 2
        if sample == "fundus":
            from skimage.filters import gaussian

            # the optic disc is the brightest region of this photograph: box it
            smooth = gaussian(data.mean(-1), sigma=25)
            cy, cx = np.unravel_index(np.argmax(smooth), smooth.shape)
            boxes = [(float(cx - 140), float(cy - 140), float(cx + 140), float(cy + 140))]
        else:
            boxes = blob_boxes(data, n_boxes)
        ann = widget.annotator
        for box in boxes:
            ann.boxes_layer.add_rectangles([rectangle_from_box(box)])
            pump(until=lambda: ann.pending == 0)
        widget.project_edit.setText("~/hrmedseg-project")
        viewer.layers.selection.active = ann.boxes_layer
        viewer.reset_view()
        pump(1.0)
        shot = viewer.screenshot(canvas_only=False, flash=False)
        from PIL import Image

        Image.fromarray(shot).save(args.out / f"{name}.png", optimize=True)
        if sample == "nuclei_fluorescence":
            from qtpy.QtCore import QRect

            height = min(widget.height(), widget.sizeHint().height() + 8)  # leave out the empty stretch
            widget.grab(QRect(0, 0, widget.width(), height)).save(str(args.out / "dock.png"))
        print(f"wrote {args.out / (name + '.png')} ({shot.shape[1]} x {shot.shape[0]})")
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
