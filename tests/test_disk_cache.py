"""Crop embeddings on disk (hrmedseg.engine.disk_cache): reuse, eviction, corrupt/foreign entries, two writers."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import tifffile
import torch
from test_engine_predictor import tiny_sam

from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.disk_cache import DiskEmbeddingCache, resolve_disk_cache

BOX = (40.0, 50.0, 90.0, 110.0)


@pytest.fixture()
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, rng.integers(0, 255, (300, 400), dtype=np.uint8))
    return path


def predictor(root, **kw):
    return BoxPredictor(tiny_sam(), device="cpu", disk_cache=DiskEmbeddingCache(root, **kw))


def test_second_predictor_reuses_embeddings_without_the_encoder(tmp_path, image_file):
    first = predictor(tmp_path / "c")
    a = first.predict_box(str(image_file), BOX)
    assert first.encoder_calls == 1 and len(first.disk_cache.entries()) == 1
    second = predictor(tmp_path / "c")  # a new process would see the same: nothing in memory
    b = second.predict_box(str(image_file), BOX)
    assert second.encoder_calls == 0 and second.disk_cache.hits == 1
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.score == pytest.approx(b.score)


def test_arrays_are_keyed_by_their_pixels(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (200, 200), dtype=np.uint8)
    predictor(tmp_path).predict_box(img, BOX)
    again = predictor(tmp_path)
    again.predict_box(img.copy(), BOX)  # another array object, same pixels
    assert again.encoder_calls == 0
    changed = img.copy()
    changed[60:70, 60:70] = 0
    again.predict_box(changed, BOX)
    assert again.encoder_calls == 1


def test_other_weights_do_not_share_entries(tmp_path, image_file):
    predictor(tmp_path).predict_box(str(image_file), BOX)
    other = BoxPredictor(tiny_sam(seed=1), device="cpu", disk_cache=DiskEmbeddingCache(tmp_path))
    other.predict_box(str(image_file), BOX)
    assert other.encoder_calls == 1


def test_least_recently_used_entries_are_evicted(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, max_bytes=int(2.5 * 4 * 2**20))  # room for two 4 MiB embeddings
    value = torch.ones(1, 256, 64, 64)  # (zarr does not store chunks of zeros: keep the bytes real)
    cache.put(("a",), value)
    cache.put(("b",), value + 1)
    assert cache.get(("a",)) is not None  # a is now more recent than b
    cache.put(("c",), value + 2)
    assert cache.evictions == 1
    assert cache.get(("b",)) is None
    assert float(cache.get(("a",))[0].max()) == 1 and float(cache.get(("c",))[0].max()) == 3
    assert cache.info()["bytes"] <= cache.max_bytes
    assert cache.clear() == 2 and cache.entries() == []


def test_corrupt_entry_is_recomputed_not_trusted(tmp_path, image_file):
    first = predictor(tmp_path)
    good = first.predict_box(str(image_file), BOX)
    (entry,) = first.disk_cache.entries()
    chunk = next(p for p in (entry / "t0").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64 * [0x7F])
    chunk.write_bytes(bytes(data))
    second = predictor(tmp_path)
    again = second.predict_box(str(image_file), BOX)
    assert second.disk_cache.rejected == 1 and second.encoder_calls == 1
    np.testing.assert_array_equal(good.mask, again.mask)
    third = predictor(tmp_path)  # the recomputed entry replaced the corrupt one
    third.predict_box(str(image_file), BOX)
    assert third.encoder_calls == 0 and third.disk_cache.rejected == 0


def test_foreign_entry_is_not_used(tmp_path):
    cache = DiskEmbeddingCache(tmp_path)
    cache.put(("mine",), torch.ones(2, 3))
    # An entry written for another key, placed under this key's name (a copied or stale folder).
    cache.path(("mine",)).rename(cache.path(("theirs",)).parent.mkdir(parents=True, exist_ok=True) or cache.path(("theirs",)))
    assert cache.get(("theirs",)) is None and cache.rejected == 1
    assert not cache.path(("theirs",)).exists()


def test_entry_of_another_format_is_recomputed(tmp_path):
    import zarr

    cache = DiskEmbeddingCache(tmp_path)
    cache.put(("k",), torch.ones(2, 3))
    assert cache.get(("k",)) is not None
    zarr.open_group(str(cache.path(("k",))), mode="r+").attrs["format"] = 1  # format 1 kept SHA-256s
    assert cache.get(("k",)) is None and cache.rejected == 1
    assert not cache.path(("k",)).exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entries_read_straight_from_disk_equal_zarrs_reading(tmp_path, dtype, monkeypatch):
    import zarr

    cache = DiskEmbeddingCache(tmp_path)
    value = torch.randn(1, 8, 5, 7).to(dtype)
    cache.put(("k",), value)
    with monkeypatch.context() as m:  # what put wrote is read without zarr's reader
        for name in ("open_group", "open_array", "open"):
            m.setattr(zarr, name, lambda *a, **k: pytest.fail("zarr's reader was used"))
        got, _ = cache.get(("k",))
    assert got.dtype == dtype and torch.equal(got, value)
    by_zarr = zarr.open_group(str(cache.path(("k",))), mode="r")["t0"][...]
    np.testing.assert_array_equal(value.view(torch.int16).numpy() if dtype == torch.bfloat16 else value.numpy(), by_zarr)


def test_entries_zarr_writes_otherwise_are_read_through_zarr(tmp_path):
    """An entry whose array is compressed and split in chunks (not what put writes) still reads."""
    import zarr

    from hrmedseg.engine.disk_cache import FORMAT, _checksum

    cache = DiskEmbeddingCache(tmp_path)
    value = np.arange(2 * 6 * 10, dtype=np.float32).reshape(2, 6, 10)
    path = cache.path(("k",))
    group = zarr.open_group(str(path), mode="w")
    group.create_array("t0", data=value, chunks=(1, 3, 5))  # zarr's default compressor
    group.attrs.update(format=FORMAT, key=repr(("k",)), kind="tensor", level=0, dtypes=["float32"], checksums=[_checksum(value)])
    got, _ = cache.get(("k",))
    np.testing.assert_array_equal(got.numpy(), value)


def test_entry_of_zeros_reads_back(tmp_path):
    """zarr writes no chunk for fill values; the entry still reads."""
    cache = DiskEmbeddingCache(tmp_path)
    cache.put(("k",), torch.zeros(3, 4))
    got, _ = cache.get(("k",))
    assert torch.equal(got, torch.zeros(3, 4)) and cache.rejected == 0


def test_truncated_chunk_is_recomputed_not_trusted(tmp_path):
    cache = DiskEmbeddingCache(tmp_path)
    cache.put(("k",), torch.ones(4, 16))
    chunk = next(p for p in (cache.path(("k",)) / "t0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-4])
    assert cache.get(("k",)) is None and cache.rejected == 1


def _write_many(root: str, start, n: int) -> None:
    cache = DiskEmbeddingCache(root, max_bytes=6 * 2**20)
    start.wait()
    for i in range(n):
        cache.put((f"k{i % 5}",), torch.full((1, 256, 32, 32), float(i % 5 + 1)))
        got = cache.get((f"k{(i + 2) % 5}",))
        assert got is None or float(got[0][0, 0, 0, 0]) == (i + 2) % 5 + 1


def test_two_processes_writing_at_once_leave_only_whole_entries(tmp_path):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), start, 30)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = DiskEmbeddingCache(tmp_path, max_bytes=6 * 2**20)
    for entry_key in [(f"k{i}",) for i in range(5)]:
        got = cache.get(entry_key)
        assert got is None or float(got[0].mean()) == int(entry_key[0][1:]) + 1
    assert cache.rejected == 0
    assert not list(tmp_path.glob("??/.*"))  # no temporary or half-deleted folders left


def test_default_cache_is_off_for_tests_and_on_when_asked(tmp_path):
    assert resolve_disk_cache(True) is None  # tests/conftest.py sets HRMEDSEG_DISK_CACHE=0
    assert resolve_disk_cache(tmp_path).root == tmp_path
    assert BoxPredictor(tiny_sam(), device="cpu").disk_cache is None
