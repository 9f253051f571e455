"""The histogram percentiles of integer images equal numpy's sorted ones, so scalings (and masks) are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from hrmedseg.engine.intensity import IntensityOptions, compute_scaling, histogram_percentiles
from hrmedseg.io.readers import ArrayImage


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
@pytest.mark.parametrize("percentiles", [(1.0, 99.8), (0.0, 100.0), (0.5, 50.0), (33.3, 66.6)])
def test_histogram_percentiles_equal_numpy(dtype, n, percentiles):
    rng = np.random.default_rng(n)
    info = np.iinfo(dtype)
    sample = rng.normal(200, 150, (n, 2)).clip(max(info.min, -500), min(info.max, 60000)).astype(dtype)
    got = histogram_percentiles(sample, percentiles)
    for value, p in zip(got, percentiles):
        np.testing.assert_array_equal(value, np.percentile(sample.astype(np.float64), p, axis=0))


def test_wide_range_channel_falls_back_to_sorting():
    sample = np.array([[0], [2**30], [5], [7]], np.int64)
    (lo,) = histogram_percentiles(sample, (25.0,))
    assert lo[0] == np.percentile(sample.astype(np.float64), 25.0)


def test_integer_image_scaling_equals_float_path():
    rng = np.random.default_rng(0)
    raw = rng.normal(300, 40, (300, 200, 2)).clip(0, None).astype(np.uint16)
    raw[10:40, 10:40, 0] += 3000
    as_int = compute_scaling(ArrayImage(raw, axes="YXC", channel=[0, 1]), IntensityOptions())
    as_float = compute_scaling(ArrayImage(raw.astype(np.float32), axes="YXC", channel=[0, 1]), IntensityOptions())
    assert as_int == as_float
    assert as_int.lo[0] < 300 < 3000 < as_int.hi[0]
