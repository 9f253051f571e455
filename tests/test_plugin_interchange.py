"""The annotator dock's class combo and Export button in a real napari viewer (xvfb-run)."""

from __future__ import annotations

import json

import pytest
import shapely.geometry
from test_plugin_annotator import _drag, _wait, annotator, predictor  # noqa: F401  (fixtures)

from hrmedseg.store import AnnotationStore

pytestmark = pytest.mark.gui


def test_class_chosen_before_drawing_and_changed_afterwards(annotator, qtbot, tmp_path):
    ann, widget = annotator, annotator.widget
    row = widget.class_row
    row.add_class("nucleus")
    row.add_class("debris")
    assert [row.combo.itemText(i) for i in range(row.combo.count())] == ["(no class)", "nucleus", "debris"]
    assert row.combo.currentText() == "debris"
    _drag(ann.boxes_layer, (20, 30), (80, 100))  # drawn as debris
    row.choose("nucleus")
    _drag(ann.boxes_layer, (100, 140), (170, 230))  # drawn as nucleus
    _wait(qtbot, ann)
    assert {i: o.class_name for i, o in ann.state.objects.items()} == {1: "debris", 2: "nucleus"}

    ann.boxes_layer.mode = "select"
    ann.boxes_layer.selected_data = {0}  # object 1's box, re-classified afterwards
    row.combo.setCurrentIndex(1)
    row.combo.activated.emit(1)
    assert ann.state.objects[1].class_name == "nucleus" and row.combo.currentText() == "nucleus"

    widget.project_edit.setText(str(tmp_path / "project"))
    widget.commit()
    _wait(qtbot, ann)
    store = AnnotationStore.open(tmp_path / "project")
    assert [c.name for c in store.classes()] == ["nucleus", "debris"]
    saved = store.load(ann.image_key())
    assert [(o.id, o.class_name) for o in saved.objects if o.id in (1, 2)] == [(1, "nucleus"), (2, "nucleus")]


def test_export_button_writes_the_chosen_format(annotator, qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    ann, widget = annotator, annotator.widget
    widget.class_row.add_class("nucleus")
    _drag(ann.boxes_layer, (20, 30), (80, 100))
    _wait(qtbot, ann)
    out = tmp_path / "nuclei.geojson"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    widget.export_row.format_combo.setCurrentText("geojson")
    widget.export_row.export_button.click()
    qtbot.waitUntil(out.exists, timeout=60_000)
    _wait(qtbot, ann)
    (feature,) = json.loads(out.read_text())["features"]
    assert feature["properties"]["classification"]["name"] == "nucleus"
    assert shapely.geometry.shape(feature["geometry"]).area == (ann.labels_layer.data == 1).sum()
    assert (ann.labels_layer.data == 1).any()


def test_export_button_offers_ome_zarr(annotator, qtbot, tmp_path, monkeypatch):
    import zarr
    from qtpy.QtWidgets import QFileDialog

    ann, widget = annotator, annotator.widget
    combo = widget.export_row.format_combo
    assert [combo.itemText(i) for i in range(combo.count())] == ["geojson", "coco", "tiff", "ome-zarr"]
    widget.class_row.add_class("nucleus")
    _drag(ann.boxes_layer, (20, 30), (80, 100))
    _wait(qtbot, ann)
    out = tmp_path / "nuclei.ome.zarr"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    combo.setCurrentText("ome-zarr")
    widget.export_row.export_button.click()
    qtbot.waitUntil(out.exists, timeout=60_000)
    _wait(qtbot, ann)
    label_image = zarr.open_group(str(out / "annotations"), mode="r")
    assert (label_image["0"][:] == ann.labels_layer.data).all()
    (colour,) = label_image.attrs["ome"]["image-label"]["colors"]
    assert colour == {"label-value": 1, "rgba": [*ann.state.classes[0].color, 255]}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_annotator_segments_an_ngff_image_opened_by_napari_ome_zarr(make_napari_viewer, predictor, qtbot, tmp_path, version):
    """napari's reader plugin opens the OME-Zarr pyramid lazily; the dock annotates its full resolution."""
    pytest.importorskip("napari_ome_zarr")
    from test_ngff_reading import write_ngff_image

    from napari_hrmedseg._state import ModelInfo
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    path = tmp_path / "nuclei.ome.zarr"
    rgb = write_ngff_image(path, version)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-ome-zarr")
    layer = layers[0]
    assert layer.multiscale and [tuple(a.shape[-2:]) for a in layer.data][0] == rgb.shape[:2]
    widget = AnnotatorWidget(viewer)
    ann = widget.annotator
    ann.use_predictor(predictor, ModelInfo(name="random-test", untrained=True))
    ann.set_image_layer(layer)
    assert ann.labels_layer.data.shape == rgb.shape[:2]
    _drag(ann.boxes_layer, (20, 30), (120, 150))
    _wait(qtbot, ann)
    assert list(ann.boxes_layer.features["object_id"]) == [1]
    assert ann.state.objects[1].box is not None
    widget.close()
