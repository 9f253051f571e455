"""The fault matrix (issue 18): what a new user does wrong, kills and full disks, one test a row.

Every user-caused failure must end in one clear message naming the file and the cause (CLI:
one ``error:`` line, exit 2), before any model work where it can be known then, and nothing saved
may be lost or half-written. Kills are real (``SIGKILL`` of a subprocess at a chosen step); the
full disk is a mocked write that raises ENOSPC. No network; the whole file runs in well under two
minutes on two cores.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrmedseg import atomic
from hrmedseg.cli import main
from hrmedseg.engine import BoxPredictor
from hrmedseg.errors import HRMedSegError, InputError, OutputError, WeightsError
from hrmedseg.io import check_boxes, open_image, read_boxes, write_label_tiff
from hrmedseg.store import AnnotationStore, ImageAnnotation, ObjectRecord
from test_training_data import disks, write_pair

REAL_NUCLEI = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei_dsb2018" / "images"
TEMP_GLOB = ".*.tmp"


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam

    torch.manual_seed(0)
    model = build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))))
    return save_hrmedseg_sam(model, tmp_path_factory.mktemp("w") / "tiny_sam.pt")


@pytest.fixture
def image_file(tmp_path) -> Path:
    """A real DSB 2018 nuclei image as a tiled TIFF (the data set itself is never copied into the repo)."""
    from PIL import Image

    source = sorted(REAL_NUCLEI.glob("*.png"))[0]
    path = tmp_path / "nuclei.tif"
    tifffile.imwrite(path, np.asarray(Image.open(source).convert("L")), tile=(64, 64), compression="zlib")
    return path


@pytest.fixture
def box_file(tmp_path) -> Path:
    path = tmp_path / "boxes.csv"
    path.write_text("x0,y0,x1,y1\n10,10,60,50\n100,100,140,150\n")
    return path


def segment(*args: str) -> list[str]:
    return ["segment", *map(str, args), "--device", "cpu", "--no-progress"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def one_error(capsys, *words: str) -> str:
    """The single ``error:`` line of a failed command, checked for ``words`` and no traceback."""
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert str(w) in lines[0], lines[0]
    return lines[0]


def no_predictor(monkeypatch) -> None:
    """Make the CLI's model loading fail loudly: the error must come before any model work."""
    def refuse(args):
        raise AssertionError("the model was loaded although the input was already known to be bad")

    monkeypatch.setattr("hrmedseg.cli.segment.load_predictor", refuse)


def temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(TEMP_GLOB))


# -- 1. no raw tracebacks -------------------------------------------------------------------------
def test_text_file_as_model_cli(tmp_path, image_file, box_file, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not weights\n")
    assert main(segment(image_file, "--boxes", box_file, "--out", tmp_path / "l.tif", "--model", text)) == 2
    one_error(capsys, text, "text file")


def test_text_file_as_model_box_predictor(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    with pytest.raises(HRMedSegError, match=f"{text}.*text file"):
        BoxPredictor(str(text), device="cpu")


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_bad_checkpoints_name_the_file(tmp_path, model_file, kind, capsys, image_file, box_file):
    bad = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        bad.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    else:
        torch.save({"weights_of_something_else": torch.zeros(3)}, bad)
    with pytest.raises(HRMedSegError, match=str(bad)):
        BoxPredictor(str(bad), device="cpu")
    assert main(segment(image_file, "--boxes", box_file, "--out", tmp_path / "l.tif", "--model", bad)) == 2
    one_error(capsys, bad)


def test_full_disk_is_found_before_the_work(tmp_path, image_file, box_file, monkeypatch, capsys):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    no_predictor(monkeypatch)
    out = tmp_path / "labels.tif"
    assert main(segment(image_file, "--boxes", box_file, "--out", out)) == 2
    one_error(capsys, out, "not enough free space", "MiB")
    assert not out.exists()


def test_full_disk_during_the_final_write_keeps_the_old_file(tmp_path, image_file, box_file, model_file, monkeypatch, capsys):
    out = tmp_path / "labels.tif"
    out.write_bytes(b"yesterday's labels")
    real_imwrite = tifffile.imwrite

    def imwrite_until_full(path, *args, **kwargs):
        real_imwrite(path, *args, **kwargs)  # a real, complete temp file ...
        with open(path, "r+b") as f:  # ... cut short where the disk filled up
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(tifffile, "imwrite", imwrite_until_full)
    assert main(segment(image_file, "--boxes", box_file, "--out", out, "--model", model_file)) == 2
    one_error(capsys, out, "No space left on device", "unchanged")
    assert out.read_bytes() == b"yesterday's labels"
    assert temps(tmp_path) == []


def test_output_under_a_file_is_one_error_line(tmp_path, image_file, box_file, model_file, capsys):
    (tmp_path / "results").write_text("a file where the user meant a folder")
    out = tmp_path / "results" / "l.tif"
    assert main(segment(image_file, "--boxes", box_file, "--out", out, "--model", model_file)) == 2
    one_error(capsys, out, f"{tmp_path / 'results'} is a file, not a folder")


def test_unwritable_output_folder_is_one_error_line(tmp_path, image_file, box_file, model_file, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(segment(image_file, "--boxes", box_file, "--out", folder / "l.tif", "--model", model_file)) == 2
        one_error(capsys, folder / "l.tif", "Permission denied")
    finally:
        folder.chmod(0o755)


# -- 2. orphan temp files; the store's save at every step ---------------------------------------------
KILL_AT_CALL = """
import os, signal, sys
import numpy as np
target, count = sys.argv[1], int(sys.argv[2])
calls = 0
real = {name: getattr(os, name) for name in ("replace", "unlink")}

def killing(name):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*args, **kwargs)
    return call

for name in real:
    setattr(os, name, killing(name))
"""

STORE_SAVE = KILL_AT_CALL + """
from hrmedseg.store import AnnotationStore, ImageAnnotation, ObjectRecord
store = AnnotationStore.open(target)
labels = np.full((40, 50), 2, np.uint16)
store.save(ImageAnnotation("img", "img.tif", labels, [ObjectRecord(id=2, box_xyxy=(0, 0, 50, 40))]))
print("done")
"""


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_store_save_killed_at_every_step_stays_consistent(tmp_path):
    """SIGKILL at each rename/delete of a save: the store reads the old or the new state, never a mix."""
    old = ImageAnnotation("img", "img.tif", np.ones((40, 50), np.uint16), [ObjectRecord(id=1, box_xyxy=(1, 1, 9, 9))])
    for step in range(1, 30):
        root = tmp_path / f"kill{step}"
        AnnotationStore.create(root).save(old)
        result = run_script(STORE_SAVE, root, step)
        if result.returncode == 0:
            assert "done" in result.stdout
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        store = AnnotationStore.open(root)  # also removes the dead save's temp files
        assert temps(root) == []
        got = store.load("img")
        ids = {int(v) for v in np.unique(got.labels)}
        assert (ids, [o.id for o in got.objects]) in (({1}, [1]), ({2}, [2])), f"killed at step {step}: mixed state"
        new = ImageAnnotation("img", "img.tif", np.full((40, 50), 3, np.uint16), [ObjectRecord(id=3)])
        store.save(new)  # a later save works and leaves nothing behind
        assert AnnotationStore.open(root).load("img").objects[0].id == 3
        assert not list(root.rglob("*.prev.*")) and temps(root) == []
    else:
        pytest.fail("the save never completed")
    assert step > 4, "the save should pass several kill points (renames and deletions)"


WRITERS = {
    "label tiff": "from hrmedseg.io import write_label_tiff as w; w(target, np.ones((300, 300), np.uint16))",
    "bundle": "import torch; from hrmedseg.weights.bundle import save_bundle; save_bundle(target, 'x', {'w': torch.ones(3)})",
    "training state": "from hrmedseg.training.checkpointing import save_state; save_state(target, {'epoch': 2})",
    "object table": "from hrmedseg.io import write_object_table; write_object_table(target, [])",
}

KILL_BEFORE_RENAME = """
import os, signal, sys
import numpy as np
from hrmedseg import atomic
target = sys.argv[1]
print(os.getpid(), flush=True)

def killed(tmp):  # the temp file is complete; the rename never happens
    os.kill(os.getpid(), signal.SIGKILL)

atomic._finish = killed
"""


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_kill_9_of_every_writer_keeps_the_old_file_and_the_temp_goes(tmp_path, writer):
    target = tmp_path / "out.bin"
    target.write_bytes(b"the old, good file")
    result = run_script(KILL_BEFORE_RENAME + WRITERS[writer], target)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert target.read_bytes() == b"the old, good file"
    left = temps(tmp_path)
    assert len(left) == 1 and f"-{int(result.stdout)}." in left[0].name
    assert atomic.remove_stale_temps(tmp_path) == left  # the writer is dead: its temp is stale
    assert temps(tmp_path) == []


def test_stale_temp_goes_at_the_next_save_and_live_ones_stay(tmp_path):
    target = tmp_path / "labels.tif"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{target.name}.{atomic._host()}-{int(dead.stdout)}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".{target.name}.{atomic._host()}-{live_writer.pid}.def456.tmp"
        live.write_bytes(b"in progress")
        write_label_tiff(target, np.ones((20, 20), np.uint16))
        assert not stale.exists() and live.exists()
    finally:
        live_writer.kill()
        live_writer.wait()


def test_temp_files_carry_the_writers_pid(tmp_path):
    seen = []
    with atomic.atomic_path(tmp_path / "a.txt") as tmp:
        seen.append(tmp.name)
        tmp.write_text("x")
    assert f"-{os.getpid()}." in seen[0] and seen[0].startswith(".a.txt.")


# -- 3. permissions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_final_files_get_the_umasks_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        labels = write_label_tiff(tmp_path / "l.tif", np.ones((20, 20), np.uint16))
        store = AnnotationStore.create(tmp_path / "project")
        store.save(ImageAnnotation("img", "img.tif", np.ones((8, 8), np.uint16), [ObjectRecord(id=1)]))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (labels, store.path / "project.json", store.path / "labels" / "img.tif", store.path / "annotations" / "img.json"):
        assert stat.S_IMODE(path.stat().st_mode) == want, path



@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_final_folders_get_the_umasks_mode(tmp_path, umask):
    """An OME-Zarr export is a folder written by atomic_dir: mkdtemp's 0700 must not survive."""
    from hrmedseg.interchange.label_image import write_ngff_labels

    annotation = ImageAnnotation("img", "img.tif", np.ones((30, 40), np.uint16), [ObjectRecord(id=1)])
    old = os.umask(umask)
    try:
        write_ngff_labels(tmp_path / "img.ome.zarr", [annotation], [])
    finally:
        os.umask(old)
    out = tmp_path / "img.ome.zarr"
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


KILL_IN_FOLDER_WRITE = """
import os, signal, sys
from pathlib import Path
from hrmedseg.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (Path(tmp) / "half.bin").write_bytes(b"x" * 100000)
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_of_a_folder_writer_leaves_no_temp_folder_after_the_next_write(tmp_path):
    target = tmp_path / "img.ome.zarr"
    target.mkdir()
    (target / "zarr.json").write_text("old")
    result = run_script(KILL_IN_FOLDER_WRITE, target)
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = Path(result.stdout.strip())
    assert left.is_dir() and (target / "zarr.json").read_text() == "old"
    with atomic.atomic_dir(target) as tmp:  # the next write of the same folder
        (tmp / "zarr.json").write_text("new")
    assert not left.exists() and temps(tmp_path) == []
    assert (target / "zarr.json").read_text() == "new"

# -- 4. messages that mislead -----------------------------------------------------------------------------
def test_missing_weights_message_does_not_offer_segment_a_weights_dir(monkeypatch, tmp_path):
    from hrmedseg.weights import registry

    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HRMEDSEG_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError) as err:
        registry.resolve("sam_vit_b")
    msg = str(err.value)
    assert msg.count("--weights-dir") == msg.count("weights fetch --weights-dir"), msg
    assert "HRMEDSEG_WEIGHTS_DIR" in msg


def test_box_errors_count_rows_from_one_and_show_the_box(tmp_path, image_file, capsys, monkeypatch):
    no_predictor(monkeypatch)
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n10,10,60,50\n70,20,30,40\n")
    assert main(segment(image_file, "--boxes", boxes, "--out", tmp_path / "l.tif")) == 2
    one_error(capsys, f"row 2 of box file {boxes} (70, 20, 30, 40)", "zero or negative size")


def test_clipped_box_warning_counts_rows_from_one(image_file):
    shape = open_image(image_file).shape_yx
    with pytest.warns(UserWarning, match=rf"row 3 of mine \(-5, 1, 20, 30\)"):
        check_boxes([[1, 1, 5, 5], [2, 2, 6, 6], [-5, 1, 20, 30]], shape, source="mine")


# -- 5. late failures -------------------------------------------------------------------------------------
def test_truncated_real_tiff_fails_at_open_before_the_model(tmp_path, image_file, box_file, monkeypatch, capsys):
    data = image_file.read_bytes()
    image_file.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=f"{image_file}.*truncated"):
        open_image(image_file)
    no_predictor(monkeypatch)
    assert main(segment(image_file, "--boxes", box_file, "--out", tmp_path / "l.tif")) == 2
    one_error(capsys, image_file, "truncated")


@pytest.mark.parametrize("content", [b"just text, not an image\n", b""])
def test_not_a_tiff(tmp_path, content, box_file, monkeypatch, capsys):
    fake = tmp_path / "scan.tif"
    fake.write_bytes(content)
    no_predictor(monkeypatch)
    assert main(segment(fake, "--boxes", box_file, "--out", tmp_path / "l.tif")) == 2
    one_error(capsys, fake)


# -- 6. the annotator's worker ---------------------------------------------------------------------------
def test_annotator_worker_is_not_niced_and_leaves_a_core(monkeypatch):
    from napari_hrmedseg.annotator.jobs import prepare_worker_thread

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    torch.set_num_threads(4)
    seen = {}

    def worker():
        start = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        prepare_worker_thread()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - start
        seen["threads"] = torch.get_num_threads()

    try:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == {"nice": 0, "threads": 3}


# -- 7. small things ---------------------------------------------------------------------------------------
def test_fundus_sample_without_boxes_shows_a_hint(make_napari_viewer):
    from napari_hrmedseg._sample_data import fundus
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = make_napari_viewer()
    data, meta, _ = fundus()[0]
    layer = viewer.add_image(data, **meta)
    widget = AnnotatorWidget(viewer)
    widget.set_image_layer(layer)
    assert "optic disc" in widget.status_label.text() and "--boxes" in widget.status_label.text()
    widget.annotator.boxes_layer.add_rectangles([[[10, 10], [60, 80]]])
    widget.show_box_hint()
    assert "No boxes yet" not in widget.status_label.text()


FINETUNE = "from hrmedseg.training.cli import main; import sys; sys.exit(main(sys.argv[1:]))"


def finetune_args(root: Path, epochs: int) -> list[str]:
    return ["finetune", "--data", str(root / "data"), "--out", str(root / "model.pt"), "--encoder-preset", "tiny",
            "--img-size", "64", "--batch-size", "2", "--epochs", str(epochs), "--num-workers", "0", "--device", "cpu"]


def test_kill_9_of_finetuning_then_resume(tmp_path, capsys):
    from hrmedseg.training.checkpointing import load_state, state_path_for
    from hrmedseg.training.cli import main as train_main

    for i in range(4):
        write_pair(tmp_path / "data", f"im{i}", disks((80, 90), n=4, seed=i))
    state = state_path_for(tmp_path / "model.pt")
    run = subprocess.Popen([sys.executable, "-c", FINETUNE, *finetune_args(tmp_path, epochs=500)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not state.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert state.exists(), "no training state was written"
        time.sleep(0.5)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL
    done = load_state(state)["epoch"]  # the state survived the kill whole
    assert train_main(finetune_args(tmp_path, epochs=done + 1) + ["--resume"]) == 0
    assert f"resuming from epoch {done + 1} ({done} done" in capsys.readouterr().err
    assert load_state(state)["epoch"] == done + 1
    assert temps(tmp_path) == []


@pytest.mark.parametrize("case", ["mismatched", "empty"])
def test_bad_training_data_is_one_error_line(tmp_path, case, capsys):
    from hrmedseg.training.cli import main as train_main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir(parents=True)
    if case == "mismatched":
        write_pair(data, "a", disks((80, 90), n=3))
        from PIL import Image

        Image.fromarray(disks((40, 40), n=2).astype(np.uint8)).save(data / "masks" / "a.png")  # wrong size
    assert train_main(finetune_args(tmp_path, epochs=1)) == 2
    one_error(capsys, data)



def test_setup_installs_nothing_when_everything_is_installed(tmp_path):
    """`make annotate` runs scripts/setup.sh first: once set up it must not reinstall the package,
    only when pyproject.toml changed. The real script runs on a copy with stub tools (no apt, no
    network): dpkg says every system package is there, every import works, pip only logs."""
    import shutil

    repo_root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(repo_root / "scripts" / "setup.sh", repo / "scripts")
    shutil.copy(repo_root / "pyproject.toml", repo)
    venv_bin, stubs, log = repo / ".venv" / "bin", tmp_path / "stubs", tmp_path / "pip.log"
    venv_bin.mkdir(parents=True)
    stubs.mkdir()
    for path, text in ((stubs / "dpkg", "exit 0"), (venv_bin / "python", "exit 0"),
                       (venv_bin / "pip", f'echo "pip $*" >> "{log}"')):
        path.write_text(f"#!/bin/sh\n{text}\n")
        path.chmod(0o755)
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')

    def setup() -> str:
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
        done = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def pip_calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    assert "installing napari-hrmedseg" in setup() and len(pip_calls()) == 1  # first time: no stamp yet
    assert "up to date" in setup() and len(pip_calls()) == 1  # again: nothing installed
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# a changed dependency\n")
    assert "installing napari-hrmedseg" in setup() and len(pip_calls()) == 2

# -- 8. loading never runs code ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``touch <path>``: what a malicious checkpoint does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_with_a_payload_is_refused_and_never_executed(tmp_path, image_file, box_file, capsys):
    from hrmedseg.training.checkpointing import load_state
    from hrmedseg.weights.checkpoint import read_checkpoint

    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, evil)
    for load in (read_checkpoint, lambda p: BoxPredictor(str(p), device="cpu"), load_state):
        with pytest.raises(WeightsError, match=str(evil)):
            load(evil)
    assert main(segment(image_file, "--boxes", box_file, "--out", tmp_path / "l.tif", "--model", evil)) == 2
    one_error(capsys, evil, "refused")
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """grep-level guarantee: no torch.load in our code without weights_only=True."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("src", "training", "napari_hrmedseg", "scripts", "bench"):
        for path in (root / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith(("#", '"', "``")):
                    offenders.append(f"{path.relative_to(root)}:{n}")
    assert offenders == []


# -- 9. boxes: the rows that already worked, and properties ---------------------------------------------------
@pytest.mark.parametrize(
    "box, words",
    [
        ([np.nan, 1, 5, 5], ["row 1", "NaN"]),
        ([1, 1, np.inf, 5], ["row 1", "infinity"]),
        ([500, 500, 600, 600], ["row 1", "outside"]),
        ([5, 5, 5, 9], ["row 1", "zero or negative"]),
        ([9, 5, 5, 9], ["row 1", "zero or negative"]),
    ],
)
def test_bad_boxes(box, words):
    with pytest.raises(InputError) as err:
        check_boxes([box], (100, 100))
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("text", ["", "x0,y0,x1,y1\n", "[]", '{"boxes": []}'])
def test_empty_box_files(tmp_path, text):
    path = tmp_path / ("b.json" if text.startswith(("[", "{")) else "b.csv")
    path.write_text(text)
    with pytest.raises(InputError, match=str(path)):
        read_boxes(path)


coord = st.floats(min_value=-1e5, max_value=1e5, allow_nan=False, allow_infinity=False, width=32)
box_lists = st.lists(st.tuples(coord, coord, coord, coord), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boxes=box_lists, fmt=st.sampled_from(["csv", "csv-noheader", "json", "json-objects"]))
def test_box_files_read_back_what_was_written(tmp_path, boxes, fmt):
    path = tmp_path / f"b.{fmt.split('-')[0]}"
    if fmt == "csv":
        path.write_text("x0,y0,x1,y1\n" + "".join(",".join(repr(v) for v in b) + "\n" for b in boxes))
    elif fmt == "csv-noheader":
        path.write_text("".join(",".join(repr(v) for v in b) + "\n" for b in boxes))
    elif fmt == "json":
        path.write_text(json.dumps([list(b) for b in boxes]))
    else:
        path.write_text(json.dumps({"boxes": [dict(zip(("x0", "y0", "x1", "y1"), b)) for b in boxes]}))
    np.testing.assert_array_equal(read_boxes(path), np.asarray(boxes, np.float64))


@settings(max_examples=200, deadline=None)
@given(boxes=box_lists, h=st.integers(1, 5000), w=st.integers(1, 5000))
def test_check_boxes_accepts_exactly_the_boxes_that_touch_the_image(boxes, h, w):
    arr = np.asarray(boxes, np.float64)
    valid = (arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1]) & (arr[:, 2] > 0) & (arr[:, 3] > 0) & (arr[:, 0] < w) & (arr[:, 1] < h)
    if valid.all():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = check_boxes(arr, (h, w))
        assert out.shape == arr.shape
        assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all() and (out[:, 2] <= w).all() and (out[:, 3] <= h).all()
        assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
        inside = (arr[:, 0] >= 0) & (arr[:, 1] >= 0) & (arr[:, 2] <= w) & (arr[:, 3] <= h)
        np.testing.assert_array_equal(out[inside], arr[inside])  # boxes inside are kept as they are
    else:
        first = int(np.argmin(valid))
        with pytest.raises(InputError, match=rf"^row {first + 1} of boxes \("):
            check_boxes(arr, (h, w))


# --- Issue 18, point 8: serving. The batch runs through the CLI are in tests/test_batch.py; these
# rows keep the fault matrix in one file.


def test_embedded_dask_cluster_listens_on_localhost_only():
    import distributed

    from hrmedseg.batch.cluster import local_cluster

    cluster, _ = local_cluster(1)
    with cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(1)
        info = client.scheduler_info()
        addresses = [info["address"], *info["workers"]]
        dashboard = info.get("services", {}).get("dashboard")
    assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
    assert dashboard is None or cluster.dashboard_link.startswith("http://127.0.0.1:")


def test_tls_scheduler_without_certificates_is_one_error_line(tmp_path, capsys):
    from hrmedseg.cli import main

    (tmp_path / "a.png").write_bytes(b"")
    assert main(["batch", str(tmp_path / "a.png"), "--auto", "--out", str(tmp_path / "o"), "--scheduler", "tls://10.0.0.1:8786"]) == 2
    one_error(capsys, "tls://10.0.0.1:8786", "uses TLS", "--tls-ca-file")
