"""Screenshot of clicks in the annotator: boxes, then positive and negative clicks, real model.

    xvfb-run -a -s '-screen 0 1600x1000x24' .venv/bin/python bench/screenshot_clicks.py [--model hrmedseg_sam_default]

Boxes around the largest bright blobs of the bundled nuclei sample (make_screenshots.blob_boxes),
then one positive click on a blob a box left out and one Alt-style negative click in a box.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch._dynamo  # noqa: F401  (triton before napari's OpenGL context; see napari_hrmedseg._model)
from make_screenshots import blob_boxes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="hrmedseg_sam_default")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots/annotator_clicks.png"))
    args = parser.parse_args(argv)

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_hrmedseg._sample_data import _layer
    from napari_hrmedseg._state import rectangle_from_box
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = napari.Viewer(show=True, title="HRMedSeg annotator: clicks")
    viewer.window._qt_window.resize(1500, 950)
    data, meta, _ = _layer("nuclei_fluorescence")[0]
    viewer.add_image(data, **meta)
    widget = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HRMedSeg annotator", area="right")
    widget.device_combo.setCurrentText("cpu")
    widget.set_model(args.model)
    ann = widget.annotator

    def pump(until):
        while not until():
            QApplication.instance().processEvents()

    pump(lambda: ann.predictor is not None or widget.missing_box.isVisible())
    if ann.predictor is None:
        print(f"model not loaded: {widget.status_label.text()}", file=sys.stderr)
        return 2
    boxes = blob_boxes(data, 9)
    for box in boxes[:6]:
        ann.boxes_layer.add_rectangles([rectangle_from_box(box)])
        pump(lambda: ann.pending == 0)
    ann.next_object()
    ann.start_clicks()
    for (x0, y0, x1, y1), negative in ((boxes[7], False), (boxes[0], True)):
        ann.clicks_layer.feature_defaults = {"object_id": 0, "label": 0 if negative else 1}  # as a press (Alt) sets them
        ann.clicks_layer.add(np.array([(y0 + y1) / 2 if not negative else y0 + 3, (x0 + x1) / 2 if not negative else x0 + 3]))
        pump(lambda: ann.pending == 0)
        ann.next_object()
        ann.start_clicks()
    viewer.reset_view()
    QApplication.instance().processEvents()
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.out, optimize=True)
    print(f"wrote {args.out}; objects: {sorted(ann.state.objects)}; clicks: {[o.clicks for o in ann.state.objects.values() if o.clicks]}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
