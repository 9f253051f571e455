"""The npe2 manifest, the Plugins menu, sample data, start-up cost, lazy reads and missing weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
# triton (imported by torch._dynamo) must load before napari creates an OpenGL context, or it
# segfaults under Mesa; napari_hrmedseg guards real sessions (see test_model_loads_inside_a_running_napari)
import torch._dynamo  # noqa: F401, E402

REPO = Path(__file__).resolve().parents[1]


def test_manifest_validates_and_is_the_root_file():
    from npe2 import PluginManifest

    link = REPO / "napari_hrmedseg" / "napari.yaml"
    assert link.is_symlink() and os.readlink(link) == "../napari.yaml"
    manifest = PluginManifest.from_file(REPO / "napari.yaml")
    manifest.validate_imports  # noqa: B018 (exists in this npe2)
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands["napari-hrmedseg.annotator"] == "napari_hrmedseg.annotator_widget:AnnotatorWidget"
    assert commands["napari-hrmedseg.train"] == "napari_hrmedseg.train_widget:TrainWidget"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Annotator", "Train"}
    assert {s.key for s in manifest.contributions.sample_data} == {"fundus", "nuclei_fluorescence", "nuclei_stained"}
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", str(REPO / "napari.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_plugin_is_discovered():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-hrmedseg")
    assert Path(manifest.package_metadata and manifest.package_metadata.name or "napari-hrmedseg")
    assert any(w.command == "napari-hrmedseg.annotator" for w in manifest.contributions.widgets)


def test_plugin_modules_do_not_import_torch():
    """napari imports the manifest's modules lazily; even the dock itself must not pull in torch."""
    code = (
        "import sys, napari_hrmedseg, napari_hrmedseg._sample_data, napari_hrmedseg.annotator_widget, napari_hrmedseg.train_widget\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:3]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, QT_API="pyqt6"))
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.gui
def test_widgets_in_plugins_menu_and_samples_open(make_napari_viewer):
    viewer = make_napari_viewer()
    # the Plugins menu lists our dock widgets (napari builds it from the manifests)
    from napari._app_model import get_app_model

    titles = {str(getattr(item.command, "title", "")) for menu in get_app_model().menus for item in []}
    menu_items = get_app_model().menus.get_menu("napari/plugins")
    texts = []
    for item in menu_items:
        sub = getattr(item, "submenu", None)
        if sub is not None:
            texts += [str(getattr(s, "command", s).title) for s in get_app_model().menus.get_menu(sub) if hasattr(s, "command")]
        elif hasattr(item, "command"):
            texts.append(str(item.command.title))
    assert any("Annotator" in t for t in texts), texts
    assert any("Train" in t for t in texts), texts
    del titles

    for key, shape in (("fundus", (1411, 1411, 3)), ("nuclei_fluorescence", (520, 696)), ("nuclei_stained", (256, 320, 3))):
        layers = viewer.open_sample("napari-hrmedseg", key)
        assert layers[-1].data.shape == shape
        assert Path(layers[-1].metadata["hrmedseg_source"]).is_file()


@pytest.mark.gui
def test_dock_opens_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrmedseg", "nuclei_stained")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-hrmedseg", "Annotator")
    assert widget.annotator.image_layer is viewer.layers["nuclei stained"]
    assert "nuclei stained masks" in [lyr.name for lyr in viewer.layers]


class _CountingArray:
    """An array that records every window read from it (a stand-in for a file-backed array)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.pixels_read = 0

    def __getitem__(self, key):
        out = self.array[key]
        self.pixels_read += int(np.asarray(out).size)
        return out


def test_layer_planes_read_only_crops():
    from napari_hrmedseg._layer_image import LayerImage

    big = np.arange(3 * 4000 * 5000, dtype=np.uint16).reshape(3, 4000, 5000) % 4093
    levels = [_CountingArray(big), _CountingArray(big[:, ::4, ::4]), _CountingArray(big[:, ::16, ::16])]
    plane = LayerImage(levels, rgb=False, slice_index=(2,), multiscale=True)
    assert plane.shape_yx == (4000, 5000) and plane.levels[2] == (250, 313)
    window = plane.read(1000, 1100, 2000, 2300)
    np.testing.assert_array_equal(window[..., 0], big[2, 1000:1100, 2000:2300])
    assert levels[0].pixels_read == 100 * 300 and levels[1].pixels_read == 0
    coarse = plane.read(10, 20, 10, 30, level=2)
    np.testing.assert_array_equal(coarse[..., 0], big[2, ::16, ::16][10:20, 10:30])


def test_engine_on_a_lazy_dask_pyramid_reads_a_small_part():
    """A real predictor on a 6000 x 6000 dask pyramid: only chunks near the box are computed."""
    import dask.array as da
    import torch

    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models import EncoderConfig, build_encoder, build_hrmedseg_sam
    from napari_hrmedseg._layer_image import LayerImage

    computed = {0: [], 1: []}

    def level(n):
        def block(block_info=None):
            loc = block_info[None]["array-location"]
            computed[n].append((loc[0][1] - loc[0][0]) * (loc[1][1] - loc[1][0]))
            return np.full(block_info[None]["chunk-shape"], 100, np.uint16)

        return block

    full = da.map_blocks(level(0), chunks=((512,) * 11 + (368,), (512,) * 11 + (368,)), dtype=np.uint16)
    coarse = da.map_blocks(level(1), chunks=((512, 238), (512, 238)), dtype=np.uint16)
    pyramid = [full, coarse]
    torch.manual_seed(0)
    model = build_hrmedseg_sam(encoder=build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))))
    predictor = BoxPredictor(model.eval(), device="cpu")
    obj = predictor.predict_box(LayerImage(pyramid, multiscale=True), (3000, 3000, 3100, 3080))
    assert obj.region[0] <= 3000 and obj.region[1] >= 3080
    total = 6000 * 6000
    # statistics may touch the coarse level; the full-resolution reads stay near the box
    assert sum(computed[0]) < 0.2 * total, f"read {sum(computed[0])} of {total} full-resolution pixels"


@pytest.mark.gui
def test_missing_weights_offer_download_or_file(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HRMEDSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    widget = AnnotatorWidget(viewer)
    widget.set_model("sam_vit_b")
    qtbot.waitUntil(lambda: not widget.annotator.is_busy, timeout=60_000)
    assert widget.missing_box.isVisibleTo(widget)
    assert "sam_vit_b_01ec64.pth" in widget.missing_box.title()
    assert "sam_vit_b_01ec64.pth" in widget.missing_label.text()
    assert widget.download_button.isVisibleTo(widget) and widget.choose_button.isVisibleTo(widget)
    assert widget.annotator.predictor is None  # nothing is segmented without the weights
    widget.close()


@pytest.mark.gui
def test_untrained_choice_shows_the_banner(make_napari_viewer, qtbot, monkeypatch):
    import torch

    from napari_hrmedseg._model import UNTRAINED_BANNER, UNTRAINED_CHOICE
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    # keep the untrained model small on CI
    from hrmedseg.models import EncoderConfig, build_encoder
    import hrmedseg.models

    real_build = hrmedseg.models.build_hrmedseg_sam
    monkeypatch.setattr(
        hrmedseg.models, "build_hrmedseg_sam",
        lambda: real_build(encoder=build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))),
    )
    torch.manual_seed(0)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    widget = AnnotatorWidget(viewer)
    widget.device_combo.setCurrentText("cpu")
    widget.set_model(UNTRAINED_CHOICE)
    qtbot.waitUntil(lambda: widget.annotator.predictor is not None, timeout=120_000)
    assert widget.banner.isVisibleTo(widget) and widget.banner.text() == UNTRAINED_BANNER.upper()
    assert widget.annotator.labels_layer.name == "img masks [UNTRAINED WEIGHTS]"
    # untrained bundles are told by their typed metadata (provenance "trained": False), not by words in "source"
    from hrmedseg.models.info import ModelMetadata

    assert ModelMetadata("hrmedseg_sam", provenance={"source": "finetune", "trained": False}).untrained
    widget.close()


_IN_NAPARI = r"""
import sys
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)          # an OpenGL canvas exists from here on
assert "torch" not in sys.modules
from napari_hrmedseg.annotator_widget import AnnotatorWidget
import numpy as np
viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
widget = AnnotatorWidget(viewer)
import hrmedseg.models
from hrmedseg.models import EncoderConfig, build_encoder
real = hrmedseg.models.build_hrmedseg_sam
hrmedseg.models.build_hrmedseg_sam = lambda: real(encoder=build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))))
widget.device_combo.setCurrentText("cpu")
from napari_hrmedseg._model import UNTRAINED_CHOICE
widget.set_model(UNTRAINED_CHOICE)
import time
t0 = time.time()
while widget.annotator.predictor is None and time.time() - t0 < 240:
    QApplication.processEvents()
    time.sleep(0.02)
assert widget.annotator.predictor is not None, widget.status_label.text()
print("LOADED", flush=True)
viewer.close()
"""


@pytest.mark.gui
def test_model_loads_inside_a_running_napari():
    """A fresh napari process (canvas first, torch later, as for users) loads a model without crashing."""
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (xvfb-run)")
    result = subprocess.run([sys.executable, "-c", _IN_NAPARI], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "LOADED" in result.stdout, result.stderr[-3000:]
