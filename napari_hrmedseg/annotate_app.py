"""``hrmedseg-annotate``: napari with an image (a bundled sample by default) and the annotator dock.

    hrmedseg-annotate                                   # fluorescent nuclei sample, its boxes, default model
    hrmedseg-annotate --sample fundus --project ~/eye-annotations
    hrmedseg-annotate --image slide.ome.tif --project ./proj --model hrmedseg_sam_default

Large TIFF / OME-TIFF files open lazily as a multiscale layer (only the tiles on screen and
under each box are read); zarr folders and other formats go through napari's readers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from hrmedseg.defaults import DEFAULT_BOX_MODEL
from hrmedseg.errors import HRMedSegError, InputError


def open_lazy_tiff(path: Path) -> tuple[Any, bool, bool]:
    """(data, multiscale, rgb) for napari from a TIFF: its pyramid levels as lazy zarr arrays."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        n_levels = len(series.levels)
    store = tifffile.imread(path, aszarr=True)
    node = zarr.open(store, mode="r")
    if n_levels > 1 and hasattr(node, "array_keys"):
        keys = sorted(node.array_keys(), key=lambda k: -int(node[k].size))
        data: Any = [node[k] for k in keys]
        multiscale = True
    else:
        data = node[next(iter(node.array_keys()))] if hasattr(node, "array_keys") else node
        multiscale = False
    rgb = axes.endswith("S") or (axes.endswith("C") and (data[0] if multiscale else data).shape[-1] in (3, 4))
    return data, multiscale, rgb


def add_image(viewer: Any, path: Path) -> Any:
    """Add ``path`` to ``viewer`` as one image layer that remembers its source file."""
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    name = path.name.split(".")[0]
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        try:
            data, multiscale, rgb = open_lazy_tiff(path)
        except Exception:  # not readable lazily (e.g. odd layout): let napari read it
            pass
        else:
            return viewer.add_image(
                data, name=name, multiscale=multiscale, rgb=rgb, metadata={"hrmedseg_source": str(path.resolve())}
            )
    layers = viewer.open(str(path), layer_type="image")
    layer = layers[0]
    layer.metadata["hrmedseg_source"] = str(path.resolve())
    return layer


def build_parser() -> argparse.ArgumentParser:
    from hrmedseg.data import SAMPLES

    parser = argparse.ArgumentParser(prog="hrmedseg-annotate", description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, help="image file or zarr folder to annotate (default: a bundled sample)")
    parser.add_argument("--sample", choices=list(SAMPLES), default="nuclei_fluorescence", help="bundled sample to open")
    parser.add_argument("--project", type=Path, help="annotation store folder: reopened if it has this image, created on commit")
    parser.add_argument("--model", default=DEFAULT_BOX_MODEL,
                        help=f"weights to load at start: a registry name or a file (default {DEFAULT_BOX_MODEL}, shipped)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--boxes", help="box file to segment at start (CSV/JSON/GeoJSON/napari CSV); "
                        "default: the sample's own boxes when a sample is opened; 'none' for no boxes")
    parser.add_argument("--screenshot", type=Path, help="once every box is segmented, save a screenshot "
                        "of the window here (PNG) and quit (for checks without a person at the screen)")
    return parser


def initial_boxes(args: argparse.Namespace) -> Any:
    """(N, 4) xyxy boxes to draw at start, or None."""
    from hrmedseg.data import sample_boxes
    from hrmedseg.io.boxes import read_boxes

    if args.boxes == "none":
        return None
    path = args.boxes or (sample_boxes(args.sample) if args.image is None else None)
    return None if path is None else read_boxes(path)


def draw_boxes(boxes_layer: Any, boxes: Any) -> None:
    """Add xyxy boxes to a Shapes layer as rectangles (napari corners are (row, col))."""
    boxes_layer.add_rectangles([[[y0, x0], [y1, x1]] for x0, y0, x1, y1 in boxes])


def screenshot_when_done(viewer: Any, annotator: Any, path: Path) -> None:
    """Poll until the model is loaded and every box is segmented; then save and close."""
    from qtpy.QtCore import QTimer

    viewer.window._qt_window.resize(1500, 900)  # room for the canvas beside the dock
    timer = QTimer(viewer.window._qt_window)
    annotator.status.connect(lambda message: print(message, flush=True))

    def check() -> None:
        if annotator.predictor is not None and annotator.pending == 0:
            timer.stop()
            path.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(path), canvas_only=False)
            print(f"screenshot: {path}")
            viewer.close()

    timer.timeout.connect(check)
    timer.start(500)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import napari

        from ._sample_data import _layer
        from .annotator_widget import AnnotatorWidget

        viewer = napari.Viewer(title="HRMedSeg annotator")
        if args.image is not None:
            layer = add_image(viewer, args.image)
        else:
            data, meta, _ = _layer(args.sample)[0]
            layer = viewer.add_image(data, **meta)
        widget = AnnotatorWidget(viewer)
        viewer.window.add_dock_widget(widget, name="HRMedSeg annotator", area="right")
        widget.set_image_layer(layer)
        widget.device_combo.setCurrentText(args.device)
        if args.project is not None:
            widget.project_edit.setText(str(args.project))
            if (args.project / "project.json").is_file():
                widget.open_project()
        boxes = initial_boxes(args)
        if boxes is not None:
            draw_boxes(widget.annotator.boxes_layer, boxes)
            widget.show_box_hint()
        if args.model:
            widget.set_model(args.model)
        if args.screenshot is not None:
            screenshot_when_done(viewer, widget.annotator, args.screenshot)
        napari.run()
    except HRMedSegError as err:
        print(f"hrmedseg-annotate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
