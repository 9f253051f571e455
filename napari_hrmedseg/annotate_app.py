"""``hrmedseg-annotate``: napari with an image (a bundled sample by default) and the annotator dock.

    hrmedseg-annotate                                   # fluorescent nuclei sample
    hrmedseg-annotate --sample fundus --project ~/eye-annotations
    hrmedseg-annotate --image slide.ome.tif --project ./proj --model hrmedseg-sam-nuclei

Large TIFF / OME-TIFF files open lazily as a multiscale layer (only the tiles on screen and
under each box are read); zarr folders and other formats go through napari's readers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

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
    parser.add_argument("--model", help="weights to load at start: a registry name or a file")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import napari

        from napari_hrmedseg._sample_data import _layer
        from napari_hrmedseg._widget import AnnotatorWidget

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
        if args.model:
            widget.set_model(args.model)
        napari.run()
    except HRMedSegError as err:
        print(f"hrmedseg-annotate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
