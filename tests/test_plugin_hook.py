"""The public hook: the Train dock finds the viewer's annotator dock and hands it trained weights."""

from __future__ import annotations

import numpy as np
import pytest
# triton (imported by torch._dynamo) must load before napari creates an OpenGL context, or it
# segfaults under Mesa; napari_hrmedseg guards real sessions (see test_model_loads_inside_a_running_napari)
import torch._dynamo  # noqa: F401, E402

pytestmark = pytest.mark.gui


@pytest.fixture
def trained_weights(tmp_path):
    """A small HRMedSegSAM bundle, standing in for what a Train run writes."""
    import torch

    from hrmedseg.models import EncoderConfig, build_encoder, build_hrmedseg_sam, save_hrmedseg_sam

    torch.manual_seed(0)
    model = build_hrmedseg_sam(encoder=build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))))
    return save_hrmedseg_sam(model, tmp_path / "trained.pt", provenance={"source": "test"})


def test_annotator_widget_for_finds_the_dock_of_each_viewer(make_napari_viewer):
    from napari_hrmedseg import annotator_widget_for
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer, other = make_napari_viewer(), make_napari_viewer()
    assert annotator_widget_for(viewer) is None
    widget, other_widget = AnnotatorWidget(viewer), AnnotatorWidget(other)
    viewer.window.add_dock_widget(widget)
    assert annotator_widget_for(viewer) is widget and annotator_widget_for(other) is other_widget
    widget.close()
    assert annotator_widget_for(viewer) is None and annotator_widget_for(other) is other_widget
    other_widget.close()


def test_train_dock_sets_the_annotators_model_and_its_model_box(make_napari_viewer, qtbot, trained_weights):
    from napari_hrmedseg.annotator_widget import AnnotatorWidget
    from napari_hrmedseg.train_widget import TrainWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    annotator = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(annotator)
    annotator.device_combo.setCurrentText("cpu")
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    train.result_path = str(trained_weights)  # what a finished run leaves
    train.use_button.setEnabled(True)
    train.use_button.click()
    assert annotator.model_combo.currentText() == str(trained_weights)
    assert f"The annotator now uses {trained_weights}" == train.status.text()
    ann = annotator.annotator
    qtbot.waitUntil(lambda: ann.predictor is not None, timeout=120_000)
    assert ann.state.model.path == str(trained_weights.resolve()) and ann.state.model.name == "trained.pt"
    assert str(ann.predictor.device) == "cpu"  # the dock's device choice
    annotator.close()


def test_train_dock_without_an_annotator_says_what_to_do(make_napari_viewer, qtbot, tmp_path):
    from napari_hrmedseg.train_widget import TrainWidget

    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    train.result_path = str(tmp_path / "trained.pt")
    train.use_button.setEnabled(True)
    train.use_button.click()
    assert train.status.text() == "Open the HRMedSeg annotator and choose this file: " + str(tmp_path / "trained.pt")
