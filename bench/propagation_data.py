"""The stacks bench/bench_propagation.py runs on, read straight from the wheels that ship them.

- ``stardist``: the 3D nuclei stack (31 x 61 x 57, uint16) and its instance labels in the
  ``stardist`` wheel (BSD-3; ``stardist/data/images/img3d.tif`` and ``mask3d.tif``; stardist's
  docstring calls them "synthetic nuclei").
- ``mni152``: the MNI ICBM152 2009a nonlinear symmetric template (T1, 1 mm, 197 x 233 x 189, the
  average of 152 real scans after nonlinear registration: real MRI contrast, smoother than one
  scan) and its grey- and white-matter probability maps, in the ``nilearn`` wheel (nilearn is
  BSD-3; the template carries the MNI/ICBM notice: "Copyright (C) 1993-2004 Louis Collins,
  McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University", use,
  copying and distribution permitted with the notice; Fonov et al., NeuroImage 2009 and 2011).
  Nilearn stores them as uint8 (probabilities scaled to 0-255). Read with nibabel from the
  zip's bytes; nilearn itself is not needed.

Both readers return ``(image, labels)``: image (Z, H, W) float32 or the TIFF's dtype, labels
(Z, H, W) uint32 with one label id per voxel (0: background), Z the axis slices are taken along.
"""

from __future__ import annotations

import gzip
import io
import zipfile

import numpy as np

STARDIST_IMAGE, STARDIST_MASK = "stardist/data/images/img3d.tif", "stardist/data/images/mask3d.tif"
MNI_PREFIX = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
#: the MNI object sets (``--objects``), one label id per voxel. "hemispheres" (default): the brain
#: (gm + wm >= 0.5) split at the midline (x = 0 mm, column 98 of 197 in this symmetric template,
#: which goes to the right side): two touching objects whose tight boxes do not contain each other.
#: "tissue": white matter and grey matter; the grey-matter ribbon's tight box holds the white
#: matter, and a box model's mask for it is the filled brain, which covers the white matter's label.
#: "brain": one object.
MNI_OBJECTS = {
    "hemispheres": {1: "left hemisphere (gm + wm >= 0.5, x < 0 mm)", 2: "right hemisphere (gm + wm >= 0.5, x >= 0 mm)"},
    "tissue": {1: "white matter (wm >= 0.5)", 2: "grey matter (gm >= 0.5 and gm > wm)"},
    "brain": {1: "brain (gm + wm >= 0.5)"},
}
AXES = ("axial", "coronal", "sagittal")


def read_stardist_wheel(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(image (Z, H, W) uint16, instance labels (Z, H, W)) from the stardist wheel."""
    import tifffile

    with zipfile.ZipFile(path) as whl:
        image, labels = (tifffile.imread(io.BytesIO(whl.read(name))) for name in (STARDIST_IMAGE, STARDIST_MASK))
    return image, labels


def read_nifti_bytes(data: bytes) -> tuple[np.ndarray, tuple[str, str, str]]:
    """(voxel array (X, Y, Z) as stored, its axis codes, e.g. ('R', 'A', 'S')) of a .nii or .nii.gz file's bytes."""
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    image = nib.Nifti1Image.from_bytes(data)
    return np.asanyarray(image.dataobj), nib.aff2axcodes(image.affine)


def to_ras(volume: np.ndarray, codes: tuple[str, str, str]) -> np.ndarray:
    """``volume`` (3D, axes as ``codes`` say) reordered to (R, A, S): x left to right, y back to front, z foot to head."""
    import nibabel as nib

    orientation = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(codes), nib.orientations.axcodes2ornt("RAS"))
    return nib.orientations.apply_orientation(volume, orientation)


def slice_along(ras: np.ndarray, axis: str) -> np.ndarray:
    """(Z, H, W) view of an (R, A, S) volume, slices along ``axis``, each slice as a radiologist displays it.

    axial: (S, A, R) with front at the top; coronal: (A, S, R) with head at the top; sagittal:
    (R, S, A) with head at the top. Rows are flipped so that row 0 is the front (axial) or the head.
    """
    if axis == "axial":
        return ras.transpose(2, 1, 0)[:, ::-1, :]
    if axis == "coronal":
        return ras.transpose(1, 2, 0)[:, ::-1, :]
    if axis == "sagittal":
        return ras.transpose(0, 2, 1)[:, ::-1, :]
    raise ValueError(f"axis must be one of {AXES}, not {axis!r}")


def mni_labels(grey: np.ndarray, white: np.ndarray, objects: str = "hemispheres") -> np.ndarray:
    """Labels (same (R, A, S) shape, uint32) from the grey- and white-matter probability maps (uint8 0-255 or float 0-1).

    ``objects`` (see :data:`MNI_OBJECTS`) "hemispheres": 1 brain (gm + wm >= 0.5) left of the middle
    column (x index < X // 2), 2 right of it; "tissue": 1 white matter (wm >= 0.5), 2 grey matter
    (gm >= 0.5 and gm > wm), so no voxel has two labels (the bench's Dice is per label id);
    "brain": 1 where gm + wm >= 0.5.
    """
    if objects not in MNI_OBJECTS:
        raise ValueError(f"objects must be one of {sorted(MNI_OBJECTS)}, not {objects!r}")
    scale = 255.0 if grey.dtype == np.uint8 else 1.0
    gm, wm = grey.astype(np.float32) / scale, white.astype(np.float32) / scale
    labels = np.zeros(gm.shape, np.uint32)
    brain = gm + wm >= 0.5
    if objects == "tissue":
        labels[wm >= 0.5] = 1
        labels[(gm >= 0.5) & (gm > wm) & (labels == 0)] = 2
    elif objects == "brain":
        labels[brain] = 1
    else:
        right = np.arange(gm.shape[0]) >= gm.shape[0] // 2
        labels[brain] = 1
        labels[brain & right[:, None, None]] = 2
    return labels


def read_mni152_wheel(path: str, axis: str = "axial", objects: str = "hemispheres") -> tuple[np.ndarray, np.ndarray]:
    """(T1 (Z, H, W) float32, labels (Z, H, W) uint32) from the nilearn wheel, Z along ``axis``.

    197 x 233 x 189 voxels in (R, A, S); axial gives (189, 233, 197). Labels: :func:`mni_labels`.
    """
    with zipfile.ZipFile(path) as whl:
        volumes = {kind: to_ras(*read_nifti_bytes(whl.read(MNI_PREFIX.format(kind)))) for kind in ("t1", "gm", "wm")}
    labels = mni_labels(volumes["gm"], volumes["wm"], objects)
    image = slice_along(volumes["t1"], axis).astype(np.float32)
    return np.ascontiguousarray(image), np.ascontiguousarray(slice_along(labels, axis))


def every_nth_slice(image: np.ndarray, labels: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``step``-th slice (from 0) of both (Z, H, W) stacks: a thinner stack, slices ``step`` apart."""
    if step < 1:
        raise ValueError(f"step must be >= 1, not {step}")
    return np.ascontiguousarray(image[::step]), np.ascontiguousarray(labels[::step])
