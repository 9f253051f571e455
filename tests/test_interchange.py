"""Interchange on real annotated images: store -> QuPath GeoJSON / COCO / label TIFF -> store.

Files are checked by the formats' own libraries (shapely for GeoJSON geometry, pycocotools for
COCO, tifffile for TIFF, bioimageio.spec / bioimageio.core for model packages), not only by ours.
Images are held-out ones (scripts/prepare_device_payload.py's split), read from ../shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely.geometry
import tifffile
from PIL import Image

from hrmedseg.cli import main
from hrmedseg.interchange import export_annotations, import_annotations
from hrmedseg.store import AnnotationStore, ImageAnnotation, objects_from_labels

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NUCLEI, FUNDUS = SHARED / "nuclei_dsb2018", SHARED / "fundus_drishtigs"
sys.path.insert(0, str(REPO / "scripts"))
from prepare_device_payload import is_val  # noqa: E402  the split lives in one place

pytestmark = pytest.mark.skipif(not NUCLEI.exists() or not FUNDUS.exists(), reason="real data not available")


def held_out(folder: Path, n: int, min_objects: int = 0) -> list[dict]:
    items = json.loads((folder / "manifest.json").read_text())["items"]
    return [it for it in items if is_val(it["name"]) and it.get("n_instances", min_objects) >= min_objects][:n]


@pytest.fixture
def store(tmp_path) -> AnnotationStore:
    """Two held-out DSB images (instances; every other nucleus of class 'nucleus') and one Drishti-GS
    photograph (object 1 the disc rim, a ring around object 2 the cup)."""
    store = AnnotationStore.create(tmp_path / "project")
    store.add_class("nucleus")
    store.add_class("rim", (0, 200, 0))
    store.add_class("cup", (255, 255, 0))
    for item in held_out(NUCLEI, 2, min_objects=20):
        labels = np.asarray(Image.open(NUCLEI / item["mask"]))
        objects = objects_from_labels(labels)
        for obj in objects[::2]:
            obj.class_name = "nucleus"
        objects[0].score, objects[0].model, objects[0].edited = 0.93, {"name": "hrmedseg_sam_default"}, False
        store.save(ImageAnnotation(item["name"], str(NUCLEI / item["image"]), labels, objects))
    item = held_out(FUNDUS, 1)[0]
    labels = np.asarray(Image.open(FUNDUS / item["mask"])).astype(np.uint16)
    objects = objects_from_labels(labels)
    objects[0].class_name, objects[1].class_name = "rim", "cup"
    store.save(ImageAnnotation(item["name"], str(FUNDUS / item["image"]), labels, objects))
    return store


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_geojson_is_qupath_shaped_and_valid(store):
    files = export_annotations(store, "geojson")
    assert [f.name for f in files] == [f"{k}.geojson" for k in store.image_keys()]
    for key, path in zip(store.image_keys(), files):
        annotation = store.load(key)
        data = json.loads(path.read_text())
        assert data["type"] == "FeatureCollection"
        assert len(data["features"]) == len(np.unique(annotation.labels)) - 1
        for feature in data["features"]:
            geometry = shapely.geometry.shape(feature["geometry"])
            assert geometry.is_valid and geometry.geom_type in ("Polygon", "MultiPolygon")
            props = feature["properties"]
            assert props["objectType"] == "annotation"
            record = annotation.object(props["object_id"])
            assert (props["score"], props["edited"]) == (record.score, record.edited)
            assert geometry.area == (annotation.labels == record.id).sum()  # outline on the pixel grid
            if record.class_name:
                assert props["classification"] == {"name": record.class_name,
                                                   "color": list(store.get_class(record.class_name).color)}
            else:
                assert "classification" not in props
    rim = next(f for f in json.loads(files[-1].read_text())["features"] if f["properties"]["object_id"] == 1)
    assert len(shapely.geometry.shape(rim["geometry"]).interiors) >= 1  # the rim's hole (the cup) is kept


def test_geojson_round_trip_keeps_every_object(store, tmp_path):
    copy = AnnotationStore.create(tmp_path / "copy")
    for key, path in zip(store.image_keys(), export_annotations(store, "geojson", tmp_path / "out")):
        original = store.load(key)
        assert import_annotations(copy, path, image_source=original.image_source) == [key]
        back = copy.load(key)
        ids = set(np.unique(original.labels)) - {0}
        assert set(np.unique(back.labels)) - {0} == ids  # none lost, ids kept
        for i in ids:
            assert dice(back.labels == i, original.labels == i) >= 0.99
        assert [(o.id, o.class_name) for o in back.objects] == [(o.id, o.class_name) for o in original.objects]
    assert copy.classes() == store.classes()


def test_split_object_is_one_multipolygon_feature(store, tmp_path):
    """A nucleus cut in two (one object, two pieces) is one Feature with a MultiPolygon, and comes back whole."""
    key = store.image_keys()[0]
    annotation = store.load(key)
    labels = annotation.labels.copy()
    sizes = np.bincount(labels.ravel())
    big = int(np.argmax(sizes[1:]) + 1)
    column = labels[:, int(np.median(np.nonzero(labels == big)[1]))]  # a view: the cut goes into labels
    column[column == big] = 0
    from scipy.ndimage import label as components

    assert components(labels == big)[1] >= 2  # the cut really splits it
    annotation.labels = labels
    store.save(annotation)

    (path,) = export_annotations(store, "geojson", tmp_path / "split.geojson", [key])
    features = [f for f in json.loads(path.read_text())["features"] if f["properties"]["object_id"] == big]
    assert len(features) == 1
    geometry = shapely.geometry.shape(features[0]["geometry"])
    assert geometry.geom_type == "MultiPolygon" and len(geometry.geoms) >= 2
    assert geometry.area == (labels == big).sum()
    copy = AnnotationStore.create(tmp_path / "copy")
    import_annotations(copy, path, image_key=key, image_source=annotation.image_source)
    assert np.array_equal(copy.load(key).labels, labels)


def test_coco_loads_in_pycocotools_and_round_trips_pixel_exact(store, tmp_path):
    from pycocotools.coco import COCO

    (path,) = export_annotations(store, "coco", tmp_path / "all.json")
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["nucleus", "rim", "cup", "object"]
    for info in coco.loadImgs(coco.getImgIds()):
        labels = store.load(info["image_key"]).labels
        assert (info["height"], info["width"]) == labels.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        assert len(anns) == len(np.unique(labels)) - 1
        for ann in anns:
            mask = labels == ann["hrmedseg"]["object_id"]
            assert (coco.annToMask(ann) == mask).all() and ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]

    copy = AnnotationStore.create(tmp_path / "copy")
    assert import_annotations(copy, path) == store.image_keys()
    for key in store.image_keys():
        original, back = store.load(key), copy.load(key)
        assert np.array_equal(back.labels, original.labels)
        assert back.image_source == original.image_source
        assert [(o.id, o.class_name, o.score, o.edited) for o in back.objects] == \
               [(o.id, o.class_name, o.score, o.edited) for o in original.objects]


def test_label_tiff_round_trip(store, tmp_path):
    key = store.image_keys()[-1]
    (path,) = export_annotations(store, "tiff", tmp_path / "labels.tif", [key])
    assert np.array_equal(tifffile.imread(path), store.load(key).labels)
    copy = AnnotationStore.create(tmp_path / "copy")
    import_annotations(copy, path, image_key=key, image_source=store.load(key).image_source)
    assert np.array_equal(copy.load(key).labels, store.load(key).labels)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_export_is_an_ngff_labels_group(store, tmp_path, version):
    """Read back by zarr, ome-zarr-py's reader and napari-ome-zarr: pyramid, class colours, properties."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Reader

    from hrmedseg.interchange.label_image import write_ngff_labels

    key = store.image_keys()[-1]  # the fundus photograph: rim and cup classified
    annotation = store.load(key)
    out = tmp_path / f"{key}.ome.zarr"
    write_ngff_labels(out, [annotation], store.classes(), version=version)

    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == (3 if version == "0.5" else 2)
    meta = (lambda g: dict(g.attrs)["ome"] if version == "0.5" else dict(g.attrs))
    assert meta(root)["labels"] == ["annotations"]
    image = root["annotations"]
    ms = meta(image)["multiscales"][0]
    levels = [np.asarray(image[d["path"]][:]) for d in ms["datasets"]]
    assert np.array_equal(levels[0], annotation.labels) and len(levels) >= 2
    assert np.array_equal(levels[1], annotation.labels[::2, ::2])  # nearest neighbour: labels stay labels
    image_label = meta(image)["image-label"]
    colours = {c["label-value"]: c["rgba"] for c in image_label["colors"]}
    classes = {c.name: [*c.color, 255] for c in store.classes()}
    assert colours == {o.id: classes[o.class_name] if o.class_name else [128, 128, 128, 255] for o in annotation.objects}
    assert [(p["label-value"], p["class"]) for p in image_label["properties"]] == \
           [(o.id, o.class_name) for o in annotation.objects]

    nodes = list(Reader(parse_url(str(out)))())
    assert isinstance(nodes[0].specs[0], Labels)
    (label_node,) = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert np.array_equal(np.asarray(label_node.data[0]), annotation.labels)
    assert {k: [round(255 * c) for c in v] for k, v in label_node.metadata["color"].items()} == colours

    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    (layer,) = napari_ome_zarr.napari_get_reader(str(out))(str(out))
    data, layer_meta, kind = layer
    assert kind == "labels" and np.array_equal(np.asarray(data[0]), annotation.labels)
    assert layer_meta["properties"]["class"] == [o.class_name for o in annotation.objects]


def test_ome_zarr_cli_export_and_import_round_trip(store, tmp_path, capsys):
    out = tmp_path / "zarrs"
    assert main(["export", str(store.path), "--format", "ome-zarr", "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out / f"{k}.ome.zarr") for k in store.image_keys()]
    copy = AnnotationStore.create(tmp_path / "copy")
    for key, path in zip(store.image_keys(), written):
        original = store.load(key)
        assert import_annotations(copy, path, image_source=original.image_source) == [key]
        assert np.array_equal(copy.load(key).labels, original.labels)
    assert main(["import", str(copy.path), str(tmp_path / "missing.ome.zarr")]) == 2
    assert "file to import not found" in capsys.readouterr().err
    (tmp_path / "empty.ome.zarr").mkdir()
    assert main(["import", str(copy.path), str(tmp_path / "empty.ome.zarr"), "--image", key]) == 2
    assert "empty.ome.zarr" in capsys.readouterr().err



@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_round_trip_keeps_classes_and_provenance(store, tmp_path, version):
    """Our OME-Zarr says each object's class, score, model and edited flag (image-label.properties):
    importing it back must keep them, as GeoJSON and COCO do, not only the pixels."""
    from hrmedseg.interchange.label_image import write_ngff_labels

    copy = AnnotationStore.create(tmp_path / "copy")
    for key in store.image_keys():
        original = store.load(key)
        out = tmp_path / f"{key}.ome.zarr"
        write_ngff_labels(out, [original], store.classes(), version=version)
        import_annotations(copy, out, image_source=original.image_source)
        got = copy.load(key)
        assert np.array_equal(got.labels, original.labels)
        fields = lambda objects: [(o.id, o.class_name, o.score, o.model.get("name"), o.edited) for o in objects]  # noqa: E731
        assert fields(got.objects) == fields(original.objects)
    assert {c.name: c.color for c in copy.classes()} == {c.name: c.color for c in store.classes()}

def test_cli_imports_a_plain_png_label_image(tmp_path, capsys):
    """A dataset's own mask PNG (DSB 2018 instance labels) becomes a project, ids kept."""
    item = held_out(NUCLEI, 1)[0]
    project = tmp_path / "p"
    assert main(["import", str(project), str(NUCLEI / item["mask"]), "--source", str(NUCLEI / item["image"])]) == 0
    key = item["name"]
    assert capsys.readouterr().out.strip() == f"{key}: {item['n_instances']} objects"
    assert np.array_equal(AnnotationStore.open(project).load(key).labels, np.asarray(Image.open(NUCLEI / item["mask"])))


def test_import_qupath_drawn_polygons(tmp_path):
    """Free-hand outlines as QuPath writes them (a bare list of features, float vertices)."""
    item = held_out(NUCLEI, 1)[0]
    square = [[10.0, 10.0], [40.0, 10.0], [40.0, 40.0], [10.0, 40.0], [10.0, 10.0]]
    hole = [[20.0, 20.0], [30.0, 20.0], [30.0, 30.0], [20.0, 30.0], [20.0, 20.0]]
    circle = shapely.geometry.Point(100.3, 80.7).buffer(12.2)
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.geometry.MultiPolygon([circle, circle.buffer(-9)
                                                                                                .buffer(0)])),
         "properties": {"objectType": "detection"}},
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(features))
    store = AnnotationStore.create(tmp_path / "p")
    (key,) = import_annotations(store, path, image_source=NUCLEI / item["image"])
    annotation = store.load(key)
    assert annotation.labels.shape == (item["height"], item["width"])
    assert (annotation.labels == 1).sum() == 30 * 30 - 10 * 10
    assert abs((annotation.labels == 2).sum() - circle.area) < circle.length  # within a pixel of the outline
    assert [(o.id, o.class_name, o.edited) for o in annotation.objects] == [(1, "Tumor", True), (2, None, True)]
    assert store.get_class("Tumor").color == (200, 0, 0)


def test_cli_export_import_and_errors(store, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(store.path), "--format", "coco", "--out", str(out)]) == 0
    assert (out / "annotations.json").is_file()
    assert main(["import", str(tmp_path / "new"), str(out / "annotations.json")]) == 0
    assert AnnotationStore.open(tmp_path / "new").image_keys() == store.image_keys()
    capsys.readouterr()

    assert main(["export", str(store.path), "--format", "geojson", "--image", "nope"]) == 2
    assert "error: image 'nope' is not in the annotation store" in capsys.readouterr().err
    bad = tmp_path / "points.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}]}))
    key = store.image_keys()[0]
    before = store.load(key).labels.copy()
    assert main(["import", str(store.path), str(bad), "--image", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "feature 1: geometry Point is not a Polygon" in err  # counted from 1
    assert np.array_equal(AnnotationStore.open(store.path).load(key).labels, before)  # nothing changed
    assert main(["import", str(store.path), str(out / "annotations.json"), "--image", "missing"]) == 2
    assert "has no image with key 'missing'" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "never"), str(bad), "--source", store.load(key).image_source]) == 2
    assert not (tmp_path / "never").exists()  # a failed import leaves no empty project behind

    # a COCO file whose image size disagrees with the store: refused before anything is written
    coco = json.loads((out / "annotations.json").read_text())
    coco["images"][-1]["height"] += 1
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != coco["images"][-1]["id"]]
    (tmp_path / "wrong.json").write_text(json.dumps(coco))
    revisions = json.loads((store.path / "project.json").read_text())["images"]
    assert main(["import", str(store.path), str(tmp_path / "wrong.json")]) == 2
    assert "in the store" in capsys.readouterr().err
    assert json.loads((store.path / "project.json").read_text())["images"] == revisions


def test_store_written_before_classes_still_loads(store):
    """Stores of version 1 without 'classes' / 'class' (made before classes existed) open as unclassified."""
    project_file = store.path / "project.json"
    project = json.loads(project_file.read_text())
    del project["classes"]
    project_file.write_text(json.dumps(project))
    old = AnnotationStore.open(store.path)
    assert old.classes() == []
    assert old.load(store.image_keys()[0]).objects[1].class_name is None  # odd objects were unclassified
    with pytest.raises(ValueError, match="class 'nucleus' is not in the store"):
        old.save(store.load(store.image_keys()[0]))


@pytest.mark.slow
def test_bioimageio_package_passes_its_own_test(tmp_path):
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    rdf = tmp_path / "nuclei" / "rdf.yaml"
    assert main(["export-model", "hrmedseg_nuclei", "--format", "bioimageio", "--out", str(rdf.parent)]) == 0
    description = load_description(rdf)
    assert description.validation_summary.status == "valid-format", description.validation_summary
    assert {"pytorch_state_dict", "torchscript"} <= set(description.weights.model_dump(exclude_none=True))
    assert (tmp_path / "nuclei.zip").is_file()
    summary = test_model(rdf)  # runs each weights format on the test input against the test output
    assert summary.status == "passed", summary.display() or summary
    reproduced = [d.name for d in summary.details if d.name.startswith("Reproduce test outputs")]
    assert len(reproduced) == 2 and all(d.status == "passed" for d in summary.details)


def test_prompt_free_training_takes_store_classes_as_class_index(store):
    from hrmedseg.training.data import class_channels, discover_samples, split_samples, store_class_rules

    samples = discover_samples(store.path).samples
    train, val = split_samples(samples, 0.34)
    rules = store_class_rules(train, val)
    assert [r.name for r in rules] == ["nucleus", "rim", "cup"]
    for sample in samples:
        annotation = store.load(sample.name)
        _, labels = sample.load()
        channels = class_channels(labels, rules)
        for k, cls in enumerate(store.classes()):
            wanted = np.isin(annotation.labels, [o.id for o in annotation.objects if o.class_name == cls.name])
            assert np.array_equal(channels[k], wanted)
        assert not channels.any(0)[np.isin(annotation.labels, [o.id for o in annotation.objects if o.class_name is None])].any()


def test_prompt_free_finetune_on_a_project_trains_one_channel_per_store_class(store, tmp_path):
    """End to end (tiny model, CPU): the bundle's classes are the store's, in the store's order."""
    from hrmedseg.models.hrmedseg_model import load_hrmedseg
    from hrmedseg.training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(data=str(store.path), out=str(tmp_path / "model.pt"), encoder_preset="tiny",
                         img_size=64, batch_size=2, epochs=1, num_workers=0, device="cpu", val_fraction=0.34)
    finetune(cfg)
    model = load_hrmedseg(cfg.out)
    assert model.num_classes == 3 and model.class_names == ("nucleus", "rim", "cup")

    # and it leaves as a bioimage.io package whose model card is made from the bundle's provenance
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    rdf = tmp_path / "package" / "rdf.yaml"
    assert main(["export-model", cfg.out, "--out", str(rdf.parent)]) == 0
    description = load_description(rdf)
    assert description.validation_summary.status == "valid-format", description.validation_summary
    assert [a.id for a in description.outputs[0].axes][1] == "channel"
    assert [str(n) for n in description.outputs[0].axes[1].channel_names] == ["nucleus", "rim", "cup"]
    card = (rdf.parent / "README.md").read_text()
    assert "nucleus, rim, cup" in card and f"| data | {store.path} |" in card and "| val_dice |" in card
    assert test_model(rdf).status == "passed"


def test_store_without_classes_keeps_foreground_training(tmp_path):
    from hrmedseg.training.data import discover_samples, store_class_rules

    item = held_out(NUCLEI, 1)[0]
    store = AnnotationStore.create(tmp_path / "p")
    labels = np.asarray(Image.open(NUCLEI / item["mask"]))
    store.save(ImageAnnotation(item["name"], str(NUCLEI / item["image"]), labels, objects_from_labels(labels)))
    samples = discover_samples(store.path).samples
    assert store_class_rules(samples) is None
    assert np.array_equal(samples[0].load()[1], labels)  # instance labels, untouched


def test_bioimageio_export_takes_store_class_names_that_are_not_identifiers(tmp_path):
    """A store's classes are free text ('disc rim', as QuPath names them); bioimage.io channel
    names must be identifiers: the package gets identifiers, its description the names."""
    import torch
    from bioimageio.spec import load_description

    from hrmedseg.interchange.bioimageio import export_bioimageio
    from hrmedseg.models import EncoderConfig
    from hrmedseg.models.hrmedseg_model import build_hrmedseg, save_hrmedseg

    torch.manual_seed(0)
    small = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6), img_size=256)
    names = ["disc rim", "CD3+", "class", "3 cells", "disc-rim"]
    bundle = save_hrmedseg(build_hrmedseg(len(names), small, class_names=names).eval(), tmp_path / "m.pt")
    rdf = export_bioimageio(str(bundle), tmp_path / "package")
    description = load_description(rdf)
    assert description.validation_summary.status == "valid-format", description.validation_summary
    channels = [str(n) for n in description.outputs[0].axes[1].channel_names]
    assert channels == ["disc_rim", "CD3_", "class_", "c3_cells", "disc_rim_2"]
    assert "disc rim, CD3+, class, 3 cells, disc-rim" in description.outputs[0].description
