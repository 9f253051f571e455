"""The CPU backend chosen by measurement: cached per machine key, overridable, bf16 only on bf16 CPUs."""

from __future__ import annotations

import json

import pytest
import torch

from hrmedseg.engine import BoxPredictor
from hrmedseg.models import calibration
from hrmedseg.models.calibration import (
    AGREEMENT_DICE, MIN_SPEEDUP, calibration_key, calibration_path, candidate_backends, cpu_has_bf16, fastest_worth_it,
    load_choice,
)
from hrmedseg.models.runtime import build_fast_encoder, select_backend
from test_engine_fast_default import tiny_sam


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """Calibration on, its cache in tmp_path; returns the list of calibrate() calls' candidates."""
    monkeypatch.delenv("HRMEDSEG_CALIBRATE", raising=False)
    monkeypatch.delenv("HRMEDSEG_BACKEND", raising=False)
    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path))
    calls: list[list[str]] = []
    real = calibration.calibrate

    def counting(model, candidates, **kwargs):
        calls.append(list(candidates))
        return real(model, candidates, repeats=1, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", counting)
    return calls


@pytest.mark.parametrize(
    "flags, bf16",
    [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True),
     ({"fp", "asimd", "bf16"}, True), ({"fp", "asimd"}, False), (set(), False)],
)
def test_bf16_is_a_candidate_only_where_the_cpu_reports_it(flags, bf16):
    assert cpu_has_bf16(frozenset(flags)) is bf16
    assert ("fast-bf16" in candidate_backends(frozenset(flags))) is bf16
    assert candidate_backends(frozenset(flags))[0] == "fast"  # the float32 reference comes first


def test_cpu_without_bf16_never_gets_bf16(sam, calibrating, monkeypatch):
    monkeypatch.setattr(calibration, "cpu_flags", lambda: frozenset({"sse4_2", "avx2", "fma"}))
    assert select_backend("cpu", model=sam) == "fast"
    assert calibrating == [["fast"]]
    assert BoxPredictor(sam, device="cpu").backend == "fast"


def test_choice_is_measured_once_then_read_from_the_cache(sam, calibrating, monkeypatch):
    monkeypatch.setattr(calibration, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    first = select_backend("cpu", model=sam)
    assert first in ("fast", "fast-bf16") and len(calibrating) == 1
    entry = load_choice(calibration_key())
    assert entry is not None and entry.backend == first
    assert set(entry.seconds) == {"fast", "fast-bf16"} and entry.dice["fast"] == 1.0
    assert entry.key["threads"] == torch.get_num_threads() and entry.key["torch"] == torch.__version__
    # a second call, and the engine's "auto", use the cached choice without timing anything
    assert select_backend("cpu", model=sam) == first
    assert BoxPredictor(sam, device="cpu").backend == first
    assert len(calibrating) == 1


def test_another_cpu_or_torch_or_thread_count_is_measured_again(sam, calibrating, monkeypatch):
    select_backend("cpu", model=sam)
    monkeypatch.setattr(calibration, "cpu_model", lambda: "Some Other CPU 9000")
    select_backend("cpu", model=sam)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    select_backend("cpu", model=sam)
    assert len(calibrating) == 3
    entries = json.loads(calibration_path().read_text())
    assert len(entries) == 3  # every machine key keeps its own entry
    other_threads = dict(calibration_key(), threads=torch.get_num_threads() + 1)
    assert load_choice(other_threads) is None


def test_unreadable_cache_is_measured_again_and_rewritten(sam, calibrating):
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    backend = select_backend("cpu", model=sam)
    assert len(calibrating) == 1
    assert load_choice(calibration_key()).backend == backend


def test_environment_overrides_without_measuring(sam, calibrating, monkeypatch):
    monkeypatch.setenv("HRMEDSEG_BACKEND", "reference")
    assert select_backend("cpu", model=sam) == "reference"
    assert BoxPredictor(sam, device="cpu").backend == "reference"
    monkeypatch.delenv("HRMEDSEG_BACKEND")
    assert select_backend("cpu", allow_bf16=False, model=sam) == "fast"
    assert calibrating == [] and not calibration_path().exists()


def test_candidate_whose_masks_disagree_is_not_kept(sam, calibrating, monkeypatch):
    """A "fast-bf16" that is faster but gives other masks (here: the embedding negated) loses."""
    monkeypatch.setattr(calibration, "cpu_flags", lambda: frozenset({"amx_bf16"}))

    def wrong(reference, backend, **kwargs):
        encoder = build_fast_encoder(reference, "fast", **kwargs)
        return encoder if backend == "fast" else (lambda x: -encoder(x))

    monkeypatch.setattr("hrmedseg.models.runtime.build_fast_encoder", wrong)
    choice = calibration.cpu_choice(sam)
    assert choice.backend == "fast"
    assert choice.dice["fast-bf16"] < AGREEMENT_DICE and "Dice" in choice.rejected["fast-bf16"]
    assert "fast-bf16" in choice.reason()


def test_info_prints_the_choice_and_why(sam, calibrating, monkeypatch, capsys):
    from hrmedseg.cli import main

    monkeypatch.setattr(calibration, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert main(["info", "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert "bf16 instructions: avx512_bf16" in out and "not measured yet" in out
    assert not calibration_path().exists()  # --no-calibrate times nothing
    backend = select_backend("cpu", model=sam)
    assert main(["info", "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert f"CPU backend: {backend}: fastest agreeing with float32" in out and "fast-bf16 0." in out
    monkeypatch.setenv("HRMEDSEG_BACKEND", "fast")
    assert main(["info"]) == 0
    assert "CPU backend: fast (set by HRMEDSEG_BACKEND)" in capsys.readouterr().out
    assert len(calibrating) == 1


@pytest.mark.parametrize(
    "seconds, kept, chosen",
    [({"fast": 0.035, "fast-bf16": 0.034}, ["fast", "fast-bf16"], "fast"),  # a tie: exact float32
     ({"fast": 0.185, "fast-bf16": 0.119}, ["fast", "fast-bf16"], "fast-bf16"),  # Zen 4: clearly faster
     ({"fast": 0.10, "fast-bf16": 0.10 / MIN_SPEEDUP - 1e-6}, ["fast", "fast-bf16"], "fast-bf16"),
     ({"fast": 0.05, "fast-bf16": 0.10}, ["fast", "fast-bf16"], "fast"),
     ({"fast": 0.05, "fast-bf16": 0.04}, ["fast-bf16"], "fast-bf16"),  # float32 failed: the one that runs
     ({}, [], "fast")],
)
def test_another_backend_must_beat_float32_by_a_margin(seconds, kept, chosen):
    assert fastest_worth_it(seconds, kept) == chosen


@pytest.mark.parametrize("bf16_faster, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_decoder_is_bf16_only_where_it_was_measured_faster(sam, calibrating, monkeypatch, bf16_faster, dtype):
    """With "fast-bf16" chosen, calibration times the float32 and bf16 decoders too; the engine's
    decoder is bf16 only where that was faster (and agreed), float32 on GPUs and without a choice."""
    from hrmedseg.models.runtime import Timing, decoder_dtype

    monkeypatch.setattr(calibration, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(calibration, "fastest_worth_it", lambda seconds, kept: "fast-bf16")
    monkeypatch.setattr(calibration, "AGREEMENT_DICE", 0.0)  # random weights: the timing decides here

    def timed(fns, repeats):  # the decoders' timing: bf16 2x faster, or 2x slower
        for fn in fns.values():
            fn()
        if set(fns) != {"float32", "bf16"}:
            return {name: Timing(0.1, 0.1, (0.1,)) for name in fns}
        fast, slow = ("bf16", "float32") if bf16_faster else ("float32", "bf16")
        return {fast: Timing(0.01, 0.01, (0.01,)), slow: Timing(0.02, 0.02, (0.02,))}

    monkeypatch.setattr("hrmedseg.models.runtime.measure_interleaved", timed)
    assert decoder_dtype("fast-bf16", "cpu") == torch.float32  # nothing measured yet
    predictor = BoxPredictor(sam, device="cpu")
    choice = load_choice(calibration_key())
    assert predictor.backend == choice.backend == "fast-bf16"
    assert choice.decoder_bf16 is bf16_faster and set(choice.decoder_ms) == {"float32", "bf16"}
    assert predictor.decoder.dtype == decoder_dtype("fast-bf16", "cpu") == dtype
    assert "decoder " + ("bf16" if bf16_faster else "float32") in choice.reason()
    assert decoder_dtype("fast", "cpu") == decoder_dtype("fast-bf16", "cuda") == torch.float32
    monkeypatch.setenv("HRMEDSEG_CALIBRATE", "0")
    assert decoder_dtype("fast-bf16", "cpu") == torch.float32
