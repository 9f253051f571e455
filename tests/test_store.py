"""The annotation store: round trip, errors that name the path, and saves interrupted at every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hrmedseg import store as store_module
from hrmedseg.errors import InputError
from hrmedseg.store import AnnotationStore, ImageAnnotation, ObjectRecord, image_key_for, objects_from_labels


def _annotation(seed: int, key: str = "img", shape=(64, 80)) -> ImageAnnotation:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    objects = []
    for i in range(1, 4):
        y0, x0 = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 10)
        labels[y0 : y0 + 8, x0 : x0 + 9] = i
        objects.append(
            ObjectRecord(
                id=i,
                box_xyxy=(float(x0), float(y0), float(x0 + 9), float(y0 + 8)),
                prompt={"type": "box", "box_xyxy": [float(x0), float(y0), float(x0 + 9), float(y0 + 8)]},
                model={"name": "test-model", "sha256": "ab" * 32},
                score=float(rng.random()),
            )
        )
    # the last object may have been overwritten by an earlier one's pixels: keep the records honest
    return ImageAnnotation(key, f"/data/{key}.tif", labels, objects_from_labels(labels, objects), layer_name="masks")


def _same(a: ImageAnnotation, b: ImageAnnotation) -> bool:
    return (
        a.image_key == b.image_key
        and a.image_source == b.image_source
        and np.array_equal(a.labels, b.labels)
        and [o.to_dict() for o in a.objects] == [o.to_dict() for o in b.objects]
    )


def test_round_trip_and_layout(tmp_path):
    store = AnnotationStore.create(tmp_path / "proj")
    first, second = _annotation(0, "a"), _annotation(1, "b")
    store.save(first)
    store.save(second)
    reopened = AnnotationStore.open(tmp_path / "proj")
    assert reopened.image_keys() == ["a", "b"]
    assert _same(reopened.load("a"), first) and _same(reopened.load("b"), second)
    assert reopened.load("a").labels.dtype == np.uint32

    project = json.loads((tmp_path / "proj" / "project.json").read_text())
    assert project["format"] == "hrmedseg-annotations" and project["version"] == 1
    meta = json.loads((tmp_path / "proj" / "annotations" / "a.json").read_text())
    assert meta["objects"][0]["prompt"]["type"] == "box"
    assert meta["objects"][0]["model"]["name"] == "test-model"
    assert (tmp_path / "proj" / "labels" / "a.tif").is_file()
    assert not list((tmp_path / "proj").rglob("*.prev.*")) and not list((tmp_path / "proj").rglob("*.tmp"))

    # replacing an image keeps one entry and bumps its revision
    newer = _annotation(2, "a")
    reopened.save(newer)
    again = AnnotationStore.open(tmp_path / "proj")
    assert again.image_keys() == ["a", "b"] and _same(again.load("a"), newer)
    assert json.loads((tmp_path / "proj" / "project.json").read_text())["images"][0]["revision"] == 2


def test_errors_name_the_path_and_key(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path / "nothing")):
        AnnotationStore.open(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "project.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not an hrmedseg annotation store"):
        AnnotationStore.open(tmp_path / "other")
    store = AnnotationStore.create(tmp_path / "p")
    with pytest.raises(InputError, match="'missing'"):
        store.load("missing")
    with pytest.raises(InputError, match="invalid image key"):
        store.save(ImageAnnotation("../evil", "x", np.zeros((4, 4), np.uint8)))
    with pytest.raises(InputError, match="must be integers"):
        store.save(ImageAnnotation("f", "x", np.zeros((4, 4), np.float32)))


def test_tampered_file_is_reported(tmp_path):
    store = AnnotationStore.create(tmp_path / "p")
    store.save(_annotation(0, "a"))
    (tmp_path / "p" / "labels" / "a.tif").write_bytes(b"garbage")
    with pytest.raises(InputError, match="labels/a.tif"):
        AnnotationStore.open(tmp_path / "p").load("a")


def test_image_key_for():
    assert image_key_for("/x/y/slide 01.ome.tiff") == "slide_01"
    assert image_key_for("s3://bucket/img.zarr/") == "img"
    assert image_key_for("C:/data/eye.jpg") == "eye"


class _Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


@pytest.mark.parametrize("crash_at", range(5))
def test_save_interrupted_at_every_rename_keeps_a_consistent_state(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "p"
    old = _annotation(0, "a")
    AnnotationStore.create(path).save(old)
    new = _annotation(5, "a")

    real_replace = os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        if calls["n"] == crash_at:
            raise _Killed()
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", dying_replace)
    with pytest.raises(_Killed):
        AnnotationStore.open(path).save(new)
    monkeypatch.setattr(store_module.os, "replace", real_replace)

    loaded = AnnotationStore.open(path).load("a")
    # Renames: labels aside, labels in, json aside, json in, project.json (4). Up to and including
    # that last one the old state is what the store says it holds.
    assert _same(loaded, old)

    # ... and the next save after the crash works and wins, even after several crashes.
    AnnotationStore.open(path).save(new)
    assert _same(AnnotationStore.open(path).load("a"), new)


def test_crash_while_writing_the_tiff_leaves_old_state(tmp_path, monkeypatch):
    import tifffile

    path = tmp_path / "p"
    old = _annotation(0, "a")
    AnnotationStore.create(path).save(old)

    def half_write(file, data, **kwargs):
        Path(file).write_bytes(b"II*\x00half")
        raise _Killed()

    monkeypatch.setattr(tifffile, "imwrite", half_write)
    with pytest.raises(_Killed):
        AnnotationStore.open(path).save(_annotation(9, "a"))
    monkeypatch.undo()
    assert _same(AnnotationStore.open(path).load("a"), old)


_SAVER = r"""
import sys, numpy as np
from hrmedseg.store import AnnotationStore, ImageAnnotation, ObjectRecord
store = AnnotationStore.open(sys.argv[1])
value = 1
while True:
    value = value % 250 + 1
    labels = np.full((1500, 1500), value, np.uint16)
    labels[::7, ::3] = 0
    store.save(ImageAnnotation("big", "src", labels, [ObjectRecord(id=value)]))
    print(value, flush=True)
"""


def test_saves_killed_by_sigkill_never_damage_the_store(tmp_path):
    """A real process killed (SIGKILL) at arbitrary points mid-save: the store always loads a complete state."""
    path = tmp_path / "p"
    store = AnnotationStore.create(path)
    store.save(ImageAnnotation("big", "src", np.zeros((1500, 1500), np.uint16), []))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for delay in (0.35, 0.6, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = AnnotationStore.open(path).load("big")
        ids = [o.id for o in loaded.objects]
        # labels and records come from the same save: one value everywhere but the zero grid
        values = set(np.unique(loaded.labels).tolist()) - {0}
        assert values == set(ids) or (values == set() and ids == [])
