"""Dependencies point one way: plugin -> training -> core; the core never imports Qt or napari."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import hrmedseg

REPO = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(hrmedseg.__path__, "hrmedseg.")
        if not m.name.startswith("hrmedseg.training") and not m.name.endswith("__main__")
    ]


def assert_fresh_import_loads_none(imports: str, bad: str) -> None:
    """In a fresh interpreter, run ``imports``; no module in ``sys.modules`` may satisfy ``bad`` (an
    expression of ``k``, the module name)."""
    code = f"import importlib, sys\n{imports}\nbad = sorted(k for k in sys.modules if {bad})\nprint(bad); sys.exit(1 if bad else 0)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_no_qt_napari_or_training():
    modules = core_modules()
    assert "hrmedseg.engine.predictor" in modules and "hrmedseg.cli.segment" in modules
    assert_fresh_import_loads_none(
        f"for m in {modules!r}: importlib.import_module(m)",
        "k.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'napari_hrmedseg')"
        " or k.startswith('hrmedseg.training')",
    )


def test_training_imports_no_qt_or_napari():
    assert_fresh_import_loads_none(
        "import hrmedseg.training.finetune, hrmedseg.training.distill, hrmedseg.training.cli",
        "k.split('.')[0] in ('napari', 'qtpy', 'PyQt6', 'napari_hrmedseg')",
    )


def test_wheel_has_no_bare_training_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_hrmedseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("training/") for n in names)
    assert "hrmedseg/training/finetune.py" in names
    assert "napari_hrmedseg/napari.yaml" in names
    assert "hrmedseg/weights/registry.json" in names


def _imports_of(path: Path) -> set[str]:
    """Modules a source file imports anywhere (top level or inside functions), relative ones resolved in hrmedseg.weights."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "hrmedseg." * (node.level == 2) + "hrmedseg.weights." * (node.level == 1)
            found.add(base + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


WEIGHTS = REPO / "src" / "hrmedseg" / "weights"


def test_weights_does_not_import_models():
    for path in sorted(WEIGHTS.glob("*.py")):
        models = {m for m in _imports_of(path) if m.startswith("hrmedseg.models")}
        assert not models, (path.name, models)
    assert_fresh_import_loads_none(
        "import hrmedseg.weights, hrmedseg.weights.checkpoint, hrmedseg.weights.registry",
        "k.startswith('hrmedseg.models')",
    )


def test_weights_modules_form_no_cycle():
    graph = {
        path.stem: {m.rsplit(".", 1)[-1] for m in _imports_of(path) if m.startswith("hrmedseg.weights.")}
        for path in WEIGHTS.glob("*.py")
        if path.stem != "__init__"
    }
    assert "importing" not in graph  # importing checkpoints builds models: it lives in hrmedseg.models

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m, set())]
    assert not cycles, cycles
