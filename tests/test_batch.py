"""``hrmedseg batch`` on a 2-process Dask LocalCluster: three modes, resume, faults, region tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from hrmedseg.batch import BatchConfig, expand_inputs, plan_box_regions, run_batch
from hrmedseg.cli import main
from hrmedseg.errors import InputError
from hrmedseg.models.hrmedseg_model import build_hrmedseg, save_hrmedseg
from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam

distributed = pytest.importorskip("distributed")

KEYS = ("a", "b", "c")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    box = save_hrmedseg_sam(build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))), folder / "box.pt")
    torch.manual_seed(0)
    small = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6), img_size=64)
    model = build_hrmedseg(1, small).eval()
    nuclei = save_hrmedseg(model, folder / "nuclei.pt", provenance={"input_mode": "crop", "scale": 1.0, "img_size": 64, "classes": None})
    return {"box": str(box), "nuclei": str(nuclei)}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    boxes = tmp_path / "boxes"
    folder.mkdir()
    boxes.mkdir()
    for i, key in enumerate(KEYS):
        tifffile.imwrite(folder / f"{key}.tif", rng.integers(0, 255, (96 + 16 * i, 128), dtype=np.uint8))
        (boxes / f"{key}.boxes.csv").write_text("x0,y0,x1,y1\n5,5,40,30\n60,40,120,90\n")
    return folder, boxes


def _labels(out: Path, key: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out / key / "labels.ome.zarr"), mode="r")["0"][:])


def _napari_labels(out: Path, key: str) -> np.ndarray:
    """The image's labels as napari opens them (napari-ome-zarr's reader): one labels layer."""
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    path = str(out / key / "labels.ome.zarr")
    ((data, _meta, kind),) = napari_ome_zarr.napari_get_reader(path)(path)
    assert kind == "labels"
    return np.asarray(data[0])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _cli(args, address):
    return main(["batch", *map(str, args), "--scheduler", address, "--device", "cpu", "--no-progress"])


def test_inputs_folders_globs_and_csv(tmp_path, images):
    folder, boxes = images
    listing = tmp_path / "list.csv"
    listing.write_text("image,boxes\nimages/a.tif,boxes/a.boxes.csv\nimages/b.tif,\n")
    jobs = expand_inputs([folder, str(folder / "c*.tif"), listing], boxes=boxes)
    assert [j.key for j in jobs] == ["a", "b", "c", "c_2", "a_2", "b_2"]
    assert jobs[0].boxes == str(boxes / "a.boxes.csv") and jobs[4].boxes == str(tmp_path / "boxes" / "a.boxes.csv")
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "none*.tif")])
    with pytest.raises(InputError, match="no 'image'"):
        (tmp_path / "bad.csv").write_text("file\nx.tif\n")
        expand_inputs([tmp_path / "bad.csv"])


def test_three_modes_on_two_workers_resume_and_model_loaded_once(tmp_path, images, models, client):
    folder, boxes = images
    address = client.scheduler.address
    for args, mode in (
        (["--boxes", boxes, "--model", models["box"]], "boxes"),
        (["--semantic", models["nuclei"]], "semantic"),
        (["--auto", "--model", models["box"], "--proposer", models["nuclei"]], "auto"),
    ):
        out = tmp_path / mode
        assert _cli([folder, "--out", out, *args], address) == 0
        manifest = _manifest(out)
        assert manifest["mode"] == mode and len(manifest["model"]["sha256"]) == 64
        entries = manifest["images"]
        assert sorted(entries) == list(KEYS) and {e["status"] for e in entries.values()} == {"done"}
        assert all(e["model_loads"] == 1 for e in entries.values())  # once per worker, not per image
        for key in KEYS:
            labels = _labels(out, key)
            assert np.array_equal(_napari_labels(out, key), labels)
            ann = json.loads((out / key / "annotations.json").read_text())
            assert labels.shape == tifffile.imread(folder / f"{key}.tif").shape
            ids = sorted(int(v) for v in np.unique(labels) if v)
            if mode == "boxes":
                assert set(ids) <= {1, 2} and [o["prompt"]["type"] for o in ann["objects"]] == ["box", "box"]
            elif mode == "auto":
                assert ids and set(ids) <= {o["id"] for o in ann["objects"]}
                assert {o["prompt"]["type"] for o in ann["objects"]} == {"auto"} and all(o["box_xyxy"] for o in ann["objects"])
                assert ann["objects"][0]["model"]["proposer_sha256"] == manifest["model"]["proposer_sha256"]
            else:
                assert [o["id"] for o in ann["objects"]] == ids
        # resume: a complete image is not redone, a missing one is
        (out / "manifest.json").write_text(json.dumps({**manifest, "images": {k: v for k, v in entries.items() if k != "b"}}))
        before = {k: (out / k / "annotations.json").stat().st_mtime_ns for k in ("a", "c")}
        assert _cli([folder, "--out", out, *args], address) == 0
        assert {k: (out / k / "annotations.json").stat().st_mtime_ns for k in ("a", "c")} == before
        assert _manifest(out)["images"]["b"]["status"] == "done"



def test_relative_paths_with_scheduler_are_the_users_not_the_workers(tmp_path, images, models, client, monkeypatch):
    """A remote cluster's workers run in their own working folder: `hrmedseg batch images --boxes
    boxes --out results --scheduler ...` typed in tmp_path must still read and write in tmp_path."""
    elsewhere = tmp_path / "worker_cwd"
    elsewhere.mkdir()
    before = client.run(os.getcwd)
    client.run(os.chdir, str(elsewhere))
    try:
        monkeypatch.chdir(tmp_path)
        box_model = os.path.relpath(models["box"], tmp_path)
        assert _cli(["images", "--out", "results", "--boxes", "boxes", "--model", box_model], client.scheduler.address) == 0
    finally:
        for worker, cwd in before.items():
            client.run(os.chdir, cwd, workers=[worker])
    entries = _manifest(tmp_path / "results")["images"]
    assert {e["status"] for e in entries.values()} == {"done"}, entries
    assert all(os.path.isabs(e["image"]) for e in entries.values())
    assert all(_labels(tmp_path / "results", key).shape for key in KEYS) and list(elsewhere.iterdir()) == []


def test_only_a_model_file_is_made_absolute_never_a_registry_name(tmp_path, monkeypatch):
    from hrmedseg.batch.inputs import absolute_model_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft.pt").write_bytes(b"weights")
    assert absolute_model_spec("ft.pt") == str(tmp_path / "ft.pt")
    assert absolute_model_spec("hrmedseg_sam_default") == "hrmedseg_sam_default"


def test_corrupt_image_is_recorded_and_others_finish(tmp_path, images, models, client, capsys):
    folder, boxes = images
    (folder / "broken.tif").write_bytes(b"II*\x00" + os.urandom(200))
    (boxes / "broken.boxes.csv").write_text("x0,y0,x1,y1\n5,5,40,30\n")
    out = tmp_path / "out"
    assert _cli([folder, "--out", out, "--boxes", boxes, "--model", models["box"]], client.scheduler.address) == 1
    entries = _manifest(out)["images"]
    assert entries["broken"]["status"] == "failed" and "broken.tif" in entries["broken"]["error"]
    assert all(entries[k]["status"] == "done" for k in KEYS)
    assert not (out / "broken").exists()
    assert "broken.tif" in capsys.readouterr().err


class KillFirstTask(distributed.WorkerPlugin):
    """Kills (SIGKILL) the worker that starts the first segmentation task, once."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "hrmedseg-" in str(key) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(key))
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_tasks_are_retried(tmp_path, images, models, client):
    folder, boxes = images
    marker = tmp_path / "killed"
    client.register_plugin(KillFirstTask(str(marker)), name="kill-first")
    try:
        out = tmp_path / "out"
        cfg = BatchConfig("boxes", models["box"], model_sha256="x", device="cpu")
        manifest = run_batch(client, expand_inputs([folder], boxes=boxes), out, cfg, progress=False)
    finally:
        client.unregister_worker_plugin("kill-first")
    assert marker.exists()  # a worker really died mid-task
    assert {e["status"] for e in manifest.images.values()} == {"done"}
    assert all((out / k / "labels.ome.zarr").is_dir() for k in KEYS)


def test_region_tasks_merge_without_seams(tmp_path, models, client):
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "slide.tif", rng.integers(0, 255, (600, 700), dtype=np.uint8), tile=(256, 256))
    boxes = np.array([[10, 10, 90, 70], [240, 230, 300, 290], [250, 240, 330, 320], [500, 400, 690, 590], [5, 450, 120, 590]])
    (tmp_path / "slide.boxes.csv").write_text("x0,y0,x1,y1\n" + "\n".join(",".join(map(str, b)) for b in boxes))
    assert len(plan_box_regions(boxes.astype(float), 256)) > 1
    jobs = expand_inputs([tmp_path / "slide.tif"], boxes=tmp_path / "slide.boxes.csv")
    # The reference backend: the fast CPU kernels (oneDNN post-ops) may round differently between
    # processes, which flips a few threshold pixels; this test is about where regions meet.
    whole = run_batch(client, jobs, tmp_path / "whole", BatchConfig("boxes", models["box"], device="cpu", region_size=8192, backend="reference"), progress=False)
    split = run_batch(client, jobs, tmp_path / "split", BatchConfig("boxes", models["box"], device="cpu", region_size=256, backend="reference"), progress=False)
    assert whole.images["slide"]["regions"] == 1 and split.images["slide"]["regions"] > 1
    np.testing.assert_array_equal(_labels(tmp_path / "whole", "slide"), _labels(tmp_path / "split", "slide"))
    assert _labels(tmp_path / "split", "slide").any()


def test_embedded_cluster_listens_on_localhost_and_tiff_output(tmp_path, images, models):
    folder, boxes = images
    out = tmp_path / "out"
    # A process of its own, as a user runs it: its logging is the CLI's, not pytest's.
    run = subprocess.run([sys.executable, "-m", "hrmedseg.cli", "batch", str(folder / "a.tif"), "--out", str(out),
                          "--boxes", str(boxes), "--model", models["box"], "--workers", "1", "--format", "tiff",
                          "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # The dashboard link and the summary, not Dask's INFO log of every worker's start and stop.
    assert "Dask dashboard at http://127.0.0.1:" in run.stderr and "1 image(s) done" in run.stdout
    assert "Register worker" not in run.stderr and "Nanny" not in run.stderr, run.stderr
    manifest = _manifest(out)
    assert manifest["images"]["a"]["worker"].startswith("tcp://127.0.0.1:")
    assert tifffile.imread(out / "a" / "labels.tif").shape == (96, 128)


def _task_thread_state() -> dict:
    """In the thread that runs tasks: torch's thread count, and the minor page faults of 50 x
    allocating and freeing a 2 MiB array (about 0 when glibc reuses freed memory; 512 each when
    every allocation is a fresh mmap, as under Dask's MALLOC_TRIM_THRESHOLD_=65536)."""
    import resource

    np.ones(1 << 18)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(50):
        a = np.ones(1 << 18)
        del a
    return {"torch_threads": torch.get_num_threads(), "faults": resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before}


def test_local_cluster_sets_each_workers_torch_threads_and_malloc_before_tasks(monkeypatch):
    import hrmedseg.batch.cluster as cluster

    monkeypatch.setattr(cluster, "machine_cores", lambda: 6)  # sizing differs from Dask's 1 thread on any CI machine
    local, threads = cluster.local_cluster(2)
    assert threads == 3
    with local, distributed.Client(local) as c:
        c.wait_for_workers(2)
        workers = list(c.scheduler_info()["workers"])
        states = c.gather([c.submit(_task_thread_state, workers=[w], allow_other_workers=False, pure=False) for w in workers])
    assert len(workers) == 2 and [s["torch_threads"] for s in states] == [3, 3]
    assert all(s["faults"] < 50 * 512 // 4 for s in states), states


def test_worker_setup_threads_and_one_release_per_task(monkeypatch):
    from hrmedseg.batch import WorkerSetup, worker_cache

    assert WorkerSetup(4).threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a `dask worker` started as docs/batch.md says
    assert WorkerSetup(None).threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert WorkerSetup(None).threads() is None
    calls = []
    monkeypatch.setattr(worker_cache, "release_memory", lambda: calls.append(1))
    inner = worker_cache.releases_memory(lambda: None)
    outer = worker_cache.releases_memory(lambda: [inner(), inner()])
    outer()
    assert calls == [1]  # segment_image runs two decorated steps: one gc + trim, not three
    with pytest.raises(ZeroDivisionError):
        worker_cache.releases_memory(lambda: 1 / 0)()
    assert calls == [1, 1]


def test_bad_arguments_fail_cleanly(tmp_path, images, models, capsys, monkeypatch):
    folder, boxes = images
    import hrmedseg.batch.cluster as cluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["batch", str(folder), "--out", str(tmp_path / "o"), "--boxes", str(boxes), "--model", models["box"], "--gpus", "all"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["batch", str(folder), "--out", str(tmp_path / "o"), "--model", models["box"]]) == 2
    assert "needs --boxes" in capsys.readouterr().err
    with pytest.raises(InputError, match="TLS file not found"):
        cluster.security_from(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"))
    ca, cert = tmp_path / "ca.pem", tmp_path / "cert.pem"
    ca.write_text("x")
    cert.write_text("y")
    security = cluster.security_from(str(ca), str(cert))
    assert security.require_encryption and security.tls_ca_file == str(ca) and security.tls_client_cert == str(cert)
    with pytest.raises(InputError, match="uses TLS"):
        cluster.security_from(address="tls://10.0.0.1:8786")


def test_merge_adds_packed_masks_as_add_does():
    from hrmedseg.engine import ObjectMask, SparseLabels

    rng = np.random.default_rng(3)
    by_mask, by_bits = SparseLabels((300, 400)), SparseLabels((300, 400))
    for i, region in enumerate([(10, 90, 20, 157), (50, 300, 100, 399), (0, 7, 0, 5)]):
        mask = rng.random((region[1] - region[0], region[3] - region[2])) < 0.5
        by_mask.add(ObjectMask((0, 0, 1, 1), region, mask, 1.0), i + 1)
        by_bits.add_packed(region, np.packbits(mask, axis=None), i + 1)
    np.testing.assert_array_equal(by_mask.read(0, 300, 0, 400), by_bits.read(0, 300, 0, 400))
    with pytest.raises(ValueError, match="packed bytes"):
        by_bits.add_packed((0, 10, 0, 10), np.zeros(3, np.uint8), 9)


def test_model_loading_skips_torchvision_until_segment_anything_names_are_used(models):
    import subprocess
    import sys

    code = (
        "import sys; from hrmedseg.batch.tasks import box_predictor; from hrmedseg.batch import BatchConfig\n"
        f"box_predictor(BatchConfig('boxes', {models['box']!r}, device='cpu'))\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported'\n"
        "import segment_anything; assert 'vit_b' in segment_anything.sam_model_registry\n"
        "from segment_anything import SamPredictor; assert 'torchvision' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _smooth_image(shape, seed):
    from scipy import ndimage

    img = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 6)
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


def test_plan_tiles_covers_the_image_once():
    from hrmedseg.batch import plan_tiles

    assert plan_tiles((300, 256), 300) == [None]
    cells = plan_tiles((300, 400), 128)
    cover = np.zeros((300, 400), np.int32)
    for y0, y1, x0, x1 in cells:
        cover[y0:y1, x0:x1] += 1
    assert len(cells) == 12 and (cover == 1).all()


def test_semantic_tile_tasks_merge_without_seams(tmp_path, models, client):
    tifffile.imwrite(tmp_path / "slide.tif", _smooth_image((300, 400), 2), tile=(128, 128))
    jobs = expand_inputs([tmp_path / "slide.tif"])
    whole = run_batch(client, jobs, tmp_path / "whole", BatchConfig("semantic", models["nuclei"], device="cpu", region_size=8192), progress=False)
    split = run_batch(client, jobs, tmp_path / "split", BatchConfig("semantic", models["nuclei"], device="cpu", region_size=128), progress=False)
    assert whole.images["slide"]["regions"] == 1 and split.images["slide"]["regions"] == 12
    one, tiled = _labels(tmp_path / "whole", "slide"), _labels(tmp_path / "split", "slide")
    np.testing.assert_array_equal(one, tiled)
    # Objects cut by a cell border are one object, not one per cell.
    crossing = set(np.unique(tiled[127])) & set(np.unique(tiled[128])) - {0}
    crossing |= set(np.unique(tiled[:, 255])) & set(np.unique(tiled[:, 256])) - {0}
    assert tiled.max() > 3 and crossing
    ann = json.loads((tmp_path / "split" / "slide" / "annotations.json").read_text())
    assert [o["id"] for o in ann["objects"]] == sorted(int(v) for v in np.unique(tiled) if v)
    assert split.images["slide"]["objects"] == whole.images["slide"]["objects"]


def _blob_slide(shape, spacing, seed):
    """Bright discs of radius 9-12 on a dark noisy background, on a jittered lattice (some touch)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(30, 6, shape)
    for cy in range(spacing // 2, shape[0], spacing):
        for cx in range(spacing // 2, shape[1], spacing):
            dy, dx = rng.integers(-6, 7, 2)
            img[(yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= rng.integers(9, 13) ** 2] = 200
    return np.clip(img, 0, 255).astype(np.uint8)


def test_auto_cell_tasks_give_segment_auto_labels(tmp_path, models, client):
    """--auto on a slide split into cell tasks: the labels of one BoxPredictor.segment_auto call."""
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.engine.auto import AutoOptions, resolve_proposer

    tifffile.imwrite(tmp_path / "slide.tif", _blob_slide((300, 400), 30, 3), tile=(128, 128))
    options = AutoOptions(tile=96, halo=40)
    predictor = BoxPredictor(models["box"], device="cpu")
    expected, records = predictor.segment_auto(str(tmp_path / "slide.tif"), proposer=resolve_proposer(models["nuclei"], "cpu"), options=options)
    jobs = expand_inputs([tmp_path / "slide.tif"])
    cfg = BatchConfig("auto", models["box"], device="cpu", proposer=models["nuclei"], auto_options=options, region_size=128)
    split = run_batch(client, jobs, tmp_path / "split", cfg, progress=False)
    assert split.images["slide"]["regions"] == 12 and split.images["slide"]["status"] == "done"
    tiled = _labels(tmp_path / "split", "slide")
    assert len(records) > 20  # the lattice's discs, proposed by tiles of every cell
    # Objects cut by a cell border (x = 128, 256; y = 128, 256) are one object, as in one call.
    crossing = set(np.unique(tiled[127])) & set(np.unique(tiled[128])) - {0}
    assert crossing
    np.testing.assert_array_equal(tiled, expected)


def test_ctrl_c_stops_cleanly_and_rerun_resumes(tmp_path, models):
    """SIGINT after the first image completes: exit 130, one line, only complete images, no workers left."""
    import subprocess
    import sys
    import time

    import psutil

    folder = tmp_path / "images"
    folder.mkdir()
    keys = [f"img{i}" for i in range(6)]
    for i, key in enumerate(keys):
        tifffile.imwrite(folder / f"{key}.tif", _smooth_image((320, 320), i))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hrmedseg.cli", "batch", str(folder), "--out", str(out), "--semantic", models["nuclei"],
           "--workers", "1", "--device", "cpu", "--no-progress"]
    # SIGINT's default action in the child, as in a terminal: a test run started in the background
    # of a non-interactive shell (`make test &`) inherits SIGINT ignored, and Python keeps it so.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not ((out / "manifest.json").exists() and "done" in {e["status"] for e in _manifest(out)["images"].values()}):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "hrmedseg batch: interrupted"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [" ".join(c.cmdline()[-3:]) for c in alive]
    done = {k for k, e in _manifest(out)["images"].items() if e["status"] == "done"}
    assert done and done < set(keys)
    # Every image folder is complete (one may be complete but not yet in the manifest: it is redone);
    # no temporary (partial) folder is left.
    folders = {p.name for p in out.iterdir() if p.name != "manifest.json"}
    assert done <= folders <= set(keys)
    for key in folders:
        assert _labels(out, key).shape == (320, 320) and (out / key / "annotations.json").is_file()
    # re-running finishes the rest and leaves the done images as they were
    before = {k: (out / k / "annotations.json").stat().st_mtime_ns for k in done}
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=600).returncode == 0
    assert {k: (out / k / "annotations.json").stat().st_mtime_ns for k in done} == before
    assert {e["status"] for e in _manifest(out)["images"].values()} == {"done"}
