"""bench/propagation_data.py: the MNI152 reader on a tiny fake nilearn wheel (NIfTI files written by nibabel)."""

from __future__ import annotations

import gzip
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from propagation_data import MNI_PREFIX, every_nth_slice, mni_labels, read_mni152_wheel  # noqa: E402

#: (X, Y, Z) of the fake volumes in RAS: all three axes differ, so a wrong transpose shows in the shape
SHAPE = (6, 5, 4)


def nifti_gz(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """The gzipped bytes of a NIfTI-1 file holding ``volume`` (X, Y, Z) with ``affine``."""
    return gzip.compress(nib.Nifti1Image(volume, affine).to_bytes())


def fake_volumes() -> dict[str, np.ndarray]:
    """t1 (a distinct value per voxel), gm and wm (uint8 0-255) in RAS, (X, Y, Z) = SHAPE.

    wm is 200 on the x < 3 half of slab z = 1, gm 200 on all of slab z = 2, and gm 128 / wm 127
    at voxel (4, 0, 1), where gm + wm >= 0.5 but neither is the white matter.
    """
    t1 = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)
    gm, wm = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    wm[:3, :, 1] = 200
    gm[:, :, 2] = 200
    gm[4, 0, 1], wm[4, 0, 1] = 128, 127
    return {"t1": t1, "gm": gm, "wm": wm}


def write_wheel(path: Path, volumes: dict[str, np.ndarray], affine: np.ndarray) -> Path:
    with zipfile.ZipFile(path, "w") as whl:
        for kind, volume in volumes.items():
            whl.writestr(MNI_PREFIX.format(kind), nifti_gz(volume, affine))
        whl.writestr("nilearn/__init__.py", "")
    return path


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return write_wheel(tmp_path / "nilearn-0.0-py3-none-any.whl", fake_volumes(), np.eye(4))


def test_axes_give_slices_in_display_orientation(wheel: Path) -> None:
    t1 = fake_volumes()["t1"].astype(np.float32)
    axial, _ = read_mni152_wheel(str(wheel), "axial")
    coronal, _ = read_mni152_wheel(str(wheel), "coronal")
    sagittal, _ = read_mni152_wheel(str(wheel), "sagittal")
    assert axial.shape == (4, 5, 6) and coronal.shape == (5, 4, 6) and sagittal.shape == (6, 4, 5)
    assert axial.dtype == np.float32
    # axial slice z: row 0 is the front (largest y), column 0 the left (x = 0)
    np.testing.assert_array_equal(axial[2], t1[:, ::-1, 2].T)
    # coronal slice y: row 0 is the head (largest z); sagittal slice x: row 0 the head, columns back to front
    np.testing.assert_array_equal(coronal[3], t1[:, 3, ::-1].T)
    np.testing.assert_array_equal(sagittal[1], t1[1, :, ::-1].T)


def test_hemispheres_split_the_brain_at_the_middle_column(wheel: Path) -> None:
    _, labels = read_mni152_wheel(str(wheel), "axial")  # (Z, Y, X): columns are x
    brain = fake_volumes()
    brain_mask = (brain["gm"].astype(int) + brain["wm"]) >= 128
    assert labels.dtype == np.uint32
    np.testing.assert_array_equal(labels > 0, brain_mask.transpose(2, 1, 0)[:, ::-1, :])
    assert set(np.unique(labels[:, :, :3])) <= {0, 1} and set(np.unique(labels[:, :, 3:])) <= {0, 2}
    assert (labels == 1).sum() == 3 * 5 + 3 * 5 and (labels == 2).sum() == 3 * 5 + 1  # slab z=1 left half, slab z=2, voxel (4, 0, 1)


def test_tissue_objects_do_not_overlap_and_follow_the_thresholds() -> None:
    volumes = fake_volumes()
    labels = mni_labels(volumes["gm"], volumes["wm"], "tissue")  # (X, Y, Z)
    assert (labels[:3, :, 1] == 1).all() and (labels[:, :, 2] == 2).all()
    assert labels[4, 0, 1] == 2  # gm 128/255 >= 0.5 and above wm
    assert (labels == 1).sum() == 15 and (labels == 2).sum() == 31
    # the same maps as probabilities in [0, 1] give the same labels
    as_float = mni_labels(volumes["gm"] / 255.0, volumes["wm"] / 255.0, "tissue")
    np.testing.assert_array_equal(as_float, labels)
    brain = mni_labels(volumes["gm"], volumes["wm"], "brain")
    np.testing.assert_array_equal(brain, (labels > 0).astype(np.uint32))
    with pytest.raises(ValueError):
        mni_labels(volumes["gm"], volumes["wm"], "csf")


def test_a_flipped_affine_is_read_back_in_ras(tmp_path: Path) -> None:
    volumes = fake_volumes()
    las = np.diag([-1.0, 1.0, 1.0, 1.0])  # x stored right to left
    flipped = {kind: volume[::-1].copy() for kind, volume in volumes.items()}
    reference, ref_labels = read_mni152_wheel(str(write_wheel(tmp_path / "ras.whl", volumes, np.eye(4))))
    image, labels = read_mni152_wheel(str(write_wheel(tmp_path / "las.whl", flipped, las)))
    np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(labels, ref_labels)


def test_every_nth_slice_keeps_slices_step_apart(wheel: Path) -> None:
    image, labels = read_mni152_wheel(str(wheel), "coronal")
    thin_image, thin_labels = every_nth_slice(image, labels, 2)
    assert thin_image.shape == (3, 4, 6)
    np.testing.assert_array_equal(thin_image[1], image[2])
    np.testing.assert_array_equal(thin_labels[2], labels[4])
    with pytest.raises(ValueError):
        every_nth_slice(image, labels, 0)
