"""``hrmedseg export`` / ``import`` / ``export-model``: annotations and models to and from other tools.

- ``export PROJECT --format geojson|coco|tiff|ome-zarr [--image KEY] [--out PATH]``: QuPath GeoJSON
  (one file per image), COCO instance JSON (one file), label TIFF or OME-Zarr labels group (one per image).
- ``import PROJECT FILE [--image KEY] [--source IMAGE]``: a GeoJSON, COCO or label image file
  replaces the annotation of its image (``--source``: the image file, for an image the project
  does not have yet).
- ``export-model NAME --format bioimageio --out DIR``: a prompt-free model as a bioimage.io package.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..interchange import EXPORT_FORMATS, export_annotations, import_annotations
from ..store import AnnotationStore


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="write a project's annotations as QuPath GeoJSON, COCO JSON, label TIFF or OME-Zarr",
                        description=__doc__.splitlines()[0])
    ex.add_argument("project", type=Path, metavar="PROJECT", help="annotation store folder")
    ex.add_argument("--format", required=True, choices=list(EXPORT_FORMATS),
                    help="; ".join(f"{f.name}: {f.description}" for f in EXPORT_FORMATS.values()))
    ex.add_argument("--image", action="append", metavar="KEY", help="only this image (repeatable; default: all)")
    ex.add_argument("--out", type=Path, metavar="PATH",
                    help="file (ending in the format's suffix) or folder; default PROJECT/exports/")
    ex.set_defaults(func=run_export)

    im = sub.add_parser("import", help="read a GeoJSON, COCO or label image file into a project",
                        description=__doc__.splitlines()[0])
    im.add_argument("project", type=Path, metavar="PROJECT", help="annotation store folder (created if missing)")
    im.add_argument("file", type=Path, metavar="FILE", help=".geojson, COCO .json, or .tif/.png/.ome.zarr label image")
    im.add_argument("--image", metavar="KEY", help="store image key (default: from the file)")
    im.add_argument("--source", type=Path, metavar="IMAGE", help="the image file (needed for a new image)")
    im.set_defaults(func=run_import)

    em = sub.add_parser("export-model", help="write a prompt-free model as a bioimage.io model package",
                        description=__doc__.splitlines()[0])
    em.add_argument("name", metavar="NAME", help="registry name (e.g. hrmedseg_nuclei) or an hrmedseg bundle file")
    em.add_argument("--format", choices=("bioimageio",), default="bioimageio")
    em.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the package (and DIR.zip)")
    em.set_defaults(func=run_export_model)


def run_export(args: argparse.Namespace) -> int:
    for path in export_annotations(AnnotationStore.open(args.project), args.format, args.out, args.image):
        print(path)
    return 0


def run_import(args: argparse.Namespace) -> int:
    new_folder = not args.project.exists()
    store = AnnotationStore.create(args.project)
    try:
        keys = import_annotations(store, args.file, args.image, args.source)
    except BaseException:
        if new_folder:  # leave no empty project behind a failed import
            shutil.rmtree(args.project, ignore_errors=True)
        raise
    for key in keys:
        print(f"{key}: {len(store.load(key).objects)} objects")
    return 0


def run_export_model(args: argparse.Namespace) -> int:
    from ..interchange.bioimageio import export_bioimageio

    print(export_bioimageio(args.name, args.out))
    return 0
