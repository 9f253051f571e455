from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The on-disk embedding cache is on by default for the CLI and the annotator; tests ask for it explicitly.
os.environ["HRMEDSEG_DISK_CACHE"] = "0"
# No background ahead-of-time compiles in test runs (tests that want one turn it on).
os.environ.setdefault("HRMEDSEG_AOT", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# HRMEDSEG_GOLDEN: the golden file elsewhere (a git worktree has no ../shared beside it).
GOLDEN = Path(os.environ.get("HRMEDSEG_GOLDEN") or SHARED / "reference" / "lgvit_neck_golden.pt")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI has 2 cores; more threads than cores only adds contention.
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_backend_calibration(monkeypatch):
    # Timing the backends takes seconds per machine and would write to the user cache: tests get
    # the static rule unless they test the calibration itself (tests/test_calibration.py).
    monkeypatch.setenv("HRMEDSEG_CALIBRATE", "0")


@pytest.fixture(scope="session")
def golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"golden file missing: {GOLDEN}")
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)
