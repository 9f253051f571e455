"""What every benchmark prints and saves: the result as JSON, and the CPU it ran on."""

from __future__ import annotations

import json
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (sessions land on Intel and AMD CPUs alike): :func:`hrmedseg.models.calibration.cpu_model`."""
    from hrmedseg.models.calibration import cpu_model

    return cpu_model()


def cpu_summary() -> dict:
    """The CPU model, its bf16 flags and the backend "auto" picks on it (measured once, cached)."""
    import torch

    from hrmedseg.models.calibration import BF16_FLAGS, cpu_flags
    from hrmedseg.models.runtime import select_backend

    return {"cpu": cpu_name(), "bf16_flags": sorted(BF16_FLAGS & cpu_flags()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "auto_backend": select_backend("cpu")}


def print_and_save(result: dict, json_path: str | None) -> None:
    """Print ``result`` as indented JSON, and write the same text to ``json_path`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text)


class PeakRSS:
    """Peak resident memory of this process, sampled every 50 ms in a thread (psutil).

    ``start``: RSS when created; ``peak``: the highest sample so far; ``stop()`` ends sampling.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
