"""Ahead-of-time compiled encoders: used only under their own key, compiled once, reused next session."""

from __future__ import annotations

import json

import pytest
import torch

from hrmedseg.models import aot_cache, calibration
from hrmedseg.models.aot_cache import AotEncoder, aot_key, load_compiled, package_path
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder
from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
from hrmedseg.models.runtime import build_fast_encoder


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path))


def fake_package(key: dict) -> None:
    """A package file and its key, as compile_to_cache leaves them."""
    path = package_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"package")
    path.with_suffix(".json").write_text(json.dumps(key, sort_keys=True))


@pytest.fixture
def loads(monkeypatch):
    """aoti_load_package replaced by a recorder: which package files were loaded."""
    loaded: list[str] = []

    def load(path):
        loaded.append(path)
        return lambda x: x

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    return loaded


def test_package_is_loaded_under_its_own_key_only(loads, monkeypatch):
    key = aot_key("w" * 20, "fast", (1, 3, 64, 64))
    fake_package(key)
    assert load_compiled(key) is not None and loads == [str(package_path(key))]
    # other weights, another backend, another input size: no package
    for other in (aot_key("x" * 20, "fast", (1, 3, 64, 64)), aot_key("w" * 20, "fast-bf16", (1, 3, 64, 64)),
                  aot_key("w" * 20, "fast", (1, 3, 128, 128))):
        assert load_compiled(other) is None
    # the same cache seen from another CPU or torch version is never used
    monkeypatch.setattr(calibration, "cpu_model", lambda: "Another CPU")
    assert load_compiled(aot_key("w" * 20, "fast", (1, 3, 64, 64))) is None
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert load_compiled(aot_key("w" * 20, "fast", (1, 3, 64, 64))) is None
    assert len(loads) == 1


def test_package_whose_stored_key_differs_is_not_used(loads):
    """A package renamed or copied into another key's place is refused by the key stored beside it."""
    key = aot_key("w" * 20, "fast", (1, 3, 64, 64))
    fake_package(key)
    stored = dict(key, cpu="Another CPU")
    package_path(key).with_suffix(".json").write_text(json.dumps(stored))
    assert load_compiled(key) is None
    package_path(key).with_suffix(".json").write_text("{truncated")
    assert load_compiled(key) is None
    assert loads == []


def test_engine_encoder_compiles_only_when_asked(monkeypatch):
    """Unset, one-shot encoders stay eager and "reuse" compiles none; HRMEDSEG_AOT=1 / aot=True
    compile, =0 / aot=False never use a package."""
    reference = HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    monkeypatch.delenv("HRMEDSEG_AOT", raising=False)
    assert isinstance(build_fast_encoder(reference, "fast"), FastHRMedSegEncoder)
    reuse = build_fast_encoder(reference, "fast", aot="reuse")
    assert isinstance(reuse, AotEncoder) and not reuse.compile_missing
    assert build_fast_encoder(reference, "fast", aot=True).compile_missing
    assert isinstance(build_fast_encoder(reference, "fast", aot=False), FastHRMedSegEncoder)  # calibration's
    monkeypatch.setenv("HRMEDSEG_AOT", "1")
    encoder = build_fast_encoder(reference, "fast-bf16")
    assert isinstance(encoder, AotEncoder) and encoder.bf16 and encoder.variant == "fast-bf16" and encoder.compile_missing
    assert build_fast_encoder(reference, "fast", aot="reuse").compile_missing
    monkeypatch.setenv("HRMEDSEG_AOT", "0")
    assert isinstance(build_fast_encoder(reference, "fast", aot="reuse"), FastHRMedSegEncoder)
    with pytest.raises(ValueError, match="reuse"):
        build_fast_encoder(reference, "fast", aot="sometimes")


def test_reuse_loads_a_package_compiled_before_and_compiles_none(loads, monkeypatch):
    """aot="reuse" (a batch worker): the package a long session compiled is loaded; without one, eager and no compile."""
    monkeypatch.delenv("HRMEDSEG_AOT", raising=False)

    def no_compiling(*args):
        raise AssertionError("a one-shot call compiled")

    monkeypatch.setattr(aot_cache, "compile_to_cache", no_compiling)
    reference = HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    x = torch.randn(1, 3, 64, 64)
    cold = build_fast_encoder(reference, "fast", aot="reuse")
    torch.testing.assert_close(cold(x), cold.eager(x))
    assert cold.compiled is None and cold.thread is None and loads == []
    from hrmedseg.models.onnx_export import weights_digest

    fake_package(aot_key(weights_digest(reference)[:20], "fast", tuple(x.shape)))
    warm = build_fast_encoder(reference, "fast", aot="reuse")
    assert warm(x) is x  # the recorder's "package" returns its input
    assert len(loads) == 1 and warm.thread is None


@pytest.mark.slow
def test_compiled_once_then_loaded_with_no_wait(monkeypatch):
    """Real AOTInductor: the first session compiles (eager serves until then), the second loads it."""
    torch.manual_seed(0)
    reference = HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    eager = FastHRMedSegEncoder.from_reference(reference)
    x = torch.randn(1, 3, 256, 256)
    expected = eager(x)

    first = AotEncoder(eager, "digest", "fast")
    out = first(x)  # served eagerly while the background thread compiles
    torch.testing.assert_close(out, expected)
    # Calls during the export and compilation still get the eager module's own results: the thread
    # exports a copy (torch.export puts fake tensors into the module it traces).
    served = 0
    while first.thread.is_alive() and first.compiled is None:
        torch.testing.assert_close(first(x), expected)
        served += 1
    assert served > 0
    first.thread.join()
    assert first.compiled is not None and package_path(aot_key("digest", "fast", tuple(x.shape))).is_file()
    torch.testing.assert_close(first(x), expected, rtol=1e-4, atol=1e-4)

    def no_compiling(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(aot_cache, "compile_to_cache", no_compiling)
    second = AotEncoder(FastHRMedSegEncoder.from_reference(reference), "digest", "fast")
    torch.testing.assert_close(second(x), expected, rtol=1e-4, atol=1e-4)
    assert second.compiled is not None and second.thread is None


def test_aot_setting_env_then_session_default_and_compiler(monkeypatch):
    """HRMEDSEG_AOT=1/0 decide; unset, a long session's default holds only where a C++ compiler is found."""
    found = {"c++": "/usr/bin/c++"}
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(aot_cache.shutil, "which", lambda name: found.get(name))
    monkeypatch.delenv("HRMEDSEG_AOT", raising=False)
    assert aot_cache.aot_enabled(default=True) and not aot_cache.aot_enabled()
    found.clear()
    assert not aot_cache.aot_enabled(default=True)
    monkeypatch.setenv("HRMEDSEG_AOT", "1")
    assert aot_cache.aot_enabled()
    found["c++"] = "/usr/bin/c++"
    monkeypatch.setenv("HRMEDSEG_AOT", "0")
    assert not aot_cache.aot_enabled(default=True)


def test_annotator_model_compiles_ahead_of_time_and_cli_default_does_not(monkeypatch, tmp_path):
    """The dock's loader builds an AotEncoder that compiles where a compiler is found; a plain
    BoxPredictor (the CLI's) keeps the eager fast encoder. Nothing is called, so nothing compiles."""
    from hrmedseg.engine import BoxPredictor
    from napari_hrmedseg._model import load_predictor

    monkeypatch.delenv("HRMEDSEG_AOT", raising=False)
    monkeypatch.setenv("HRMEDSEG_BACKEND", "fast")
    monkeypatch.setattr(aot_cache, "cxx_compiler_found", lambda: True)
    bundle = tmp_path / "model.pt"
    from hrmedseg.models import build_hrmedseg_sam
    from hrmedseg.weights.bundle import save_bundle

    model = build_hrmedseg_sam()
    save_bundle(bundle, "hrmedseg_sam", model.state_dict())
    predictor, _ = load_predictor(str(bundle), device="cpu")
    assert isinstance(predictor.encoder.image_encoder, AotEncoder)
    assert predictor.encoder.image_encoder.compile_missing
    assert not isinstance(BoxPredictor(str(bundle), device="cpu").encoder.image_encoder, AotEncoder)


def test_package_that_crashes_its_check_process_is_refused_and_not_compiled_again(monkeypatch):
    """A package whose loading kills the process (a real crash, in the check child) is never
    loaded in this process: no key is written, it is deleted, and later sessions stay eager."""
    torch.manual_seed(0)
    reference = HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))).eval()
    eager = FastHRMedSegEncoder.from_reference(reference)
    x = torch.randn(1, 3, 64, 64)

    def write_package(program, package_path):
        with open(package_path, "wb") as f:
            f.write(b"a package whose loading crashes")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", write_package)
    monkeypatch.setattr(aot_cache, "CHECK_SCRIPT", "import os; os.abort()")
    key = aot_key("digest", "fast", tuple(x.shape))
    first = AotEncoder(eager, "digest", "fast", background=False)
    torch.testing.assert_close(first(x), eager(x))
    path = package_path(key)
    assert first.compiled is None and not path.exists() and not path.with_suffix(".json").exists()
    assert aot_cache.refused(key) and not aot_cache.refused(aot_key("other", "fast", tuple(x.shape)))

    def no_compiling(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(aot_cache, "compile_to_cache", no_compiling)
    second = AotEncoder(FastHRMedSegEncoder.from_reference(reference), "digest", "fast")
    torch.testing.assert_close(second(x), eager(x))
    assert second.compiled is None and second.thread is None


def test_check_in_child_reports_the_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(aot_cache, "CHECK_SCRIPT", "import sys; sys.exit('cannot load ' + sys.argv[1])")
    problem = aot_cache.check_in_child(tmp_path / "x.pt2", torch.zeros(1, 3, 8, 8))
    assert problem is not None and "status 1" in problem and "cannot load" in problem
    monkeypatch.setattr(aot_cache, "CHECK_SCRIPT", "import sys; assert sys.argv[2:] == ['1,3,8,8', 'bfloat16']")
    assert aot_cache.check_in_child(tmp_path / "x.pt2", torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16)) is None


def test_batch_worker_reuses_packages_and_compiles_none(monkeypatch, tmp_path):
    """A batch worker's box predictor loads a package compiled earlier (it encodes many crops)
    but never compiles one itself; HRMEDSEG_AOT=0 still turns that off."""
    from hrmedseg.batch import BatchConfig
    from hrmedseg.batch.tasks import box_predictor
    from hrmedseg.models import build_hrmedseg_sam
    from hrmedseg.weights.bundle import save_bundle

    monkeypatch.delenv("HRMEDSEG_AOT", raising=False)
    monkeypatch.setenv("HRMEDSEG_BACKEND", "fast")
    bundle = tmp_path / "model.pt"
    save_bundle(bundle, "hrmedseg_sam", build_hrmedseg_sam().state_dict())
    encoder = box_predictor(BatchConfig("boxes", str(bundle), device="cpu"))[0].encoder.image_encoder
    assert isinstance(encoder, AotEncoder) and not encoder.compile_missing
    monkeypatch.setenv("HRMEDSEG_AOT", "0")
    other = tmp_path / "other.pt"
    save_bundle(other, "hrmedseg_sam", build_hrmedseg_sam().state_dict())
    assert not isinstance(box_predictor(BatchConfig("boxes", str(other), device="cpu"))[0].encoder.image_encoder, AotEncoder)
