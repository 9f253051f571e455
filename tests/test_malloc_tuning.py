"""The engine's glibc malloc settings (hrmedseg.models.malloc_tuning): applied once, respect the
user's switches, and really keep freed tensor memory (fewer page faults), each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hrmedseg.models import malloc_tuning

from test_engine_predictor import tiny_sam

GLIBC = malloc_tuning._glibc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc only (Linux)")

# 32 MiB of 4 MiB tensors allocated, touched and freed per round: glibc's default thresholds
# map and unmap each of them, the engine's settings keep them (under 16 MiB each, 64 MiB in all).
FAULTS = """
import json, resource, sys, torch
from hrmedseg.models.malloc_tuning import keep_freed_memory
status = keep_freed_memory() if sys.argv[1] == "tuned" else "untouched"
def round_():
    ts = [torch.empty(1 << 20).fill_(1.0) for _ in range(8)]
    del ts
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print(json.dumps({"status": status, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def run_python(code: str, *args: str, env: dict | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != malloc_tuning.ENV_SWITCH}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code, *args], env=full_env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


STATUS = "import json; from hrmedseg.models.malloc_tuning import keep_freed_memory; print(json.dumps({'status': keep_freed_memory()}))"


@needs_glibc
def test_settings_applied_on_glibc():
    assert run_python(STATUS)["status"].startswith("on (glibc: mmap threshold 16 MiB")


@pytest.mark.parametrize("env, expected", [({"HRMEDSEG_MALLOC_TUNING": "0"}, "off"), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "left to")])
def test_user_switches_win(env, expected):
    assert run_python(STATUS, env=env)["status"].startswith(expected)


def test_applied_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc_tuning, "_state", {})
    monkeypatch.setattr(malloc_tuning, "_apply", lambda: calls.append(1) or "on (test)")
    assert malloc_tuning.keep_freed_memory() == malloc_tuning.keep_freed_memory() == "on (test)"
    assert len(calls) == 1


@needs_glibc
def test_freed_tensor_memory_is_reused():
    # Baseline: glibc's static defaults (128 KiB thresholds; untouched, its dynamic thresholds
    # depend on what the imports happened to free), so every round maps its 8192 pages afresh.
    defaults = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    untuned = run_python(FAULTS, "untuned", env=defaults)["faults"]
    tuned = run_python(FAULTS, "tuned")["faults"]
    assert untuned > 20 * 8 * 1024 * 0.9, untuned
    assert tuned < untuned / 10, (tuned, untuned)


def test_engine_applies_it_for_cpu_predictors(monkeypatch):
    import hrmedseg.engine.predictor as predictor_module

    calls = []
    monkeypatch.setattr(predictor_module, "keep_freed_memory", lambda: calls.append(1))
    predictor_module.BoxPredictor(tiny_sam(), device="cpu")
    assert calls == [1]
