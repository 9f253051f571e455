"""``hrmedseg weights`` subcommands, through hrmedseg.cli.main."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import pytest
import torch

import hrmedseg.weights.registry as registry_mod
from hrmedseg.cli import main
from hrmedseg.weights.bundle import load_bundle
from hrmedseg.weights.registry import Registry, cache_dir


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache_root"))
    monkeypatch.delenv("HRMEDSEG_WEIGHTS_DIR", raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_registry(tmp_path, monkeypatch):
    """A registry with one file served from 127.0.0.1, installed as the default registry."""
    root = tmp_path / "served"
    root.mkdir()
    data = bytes(range(256)) * 200
    (root / "tiny.bin").write_bytes(data)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    reg_file = tmp_path / "registry.json"
    reg_file.write_text(json.dumps({"weights": [{
        "name": "tiny", "file": "tiny.bin", "kind": "test", "architecture": "test", "holds": "bytes",
        "licence": "CC0", "url": f"http://127.0.0.1:{server.server_address[1]}/tiny.bin",
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
    }]}))
    reg = Registry.from_json(reg_file)
    monkeypatch.setattr(registry_mod, "default_registry", lambda: reg)
    yield data
    server.shutdown()
    server.server_close()


def test_list_shows_every_entry_and_status(tmp_path, capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("hrmedseg_pfd_10k", "sam_vit_h", "sam_vit_b", "sam2.1_hiera_large", "sam2.1_hiera_tiny"):
        assert name in out
    assert "Apache-2.0" in out and "missing (no public URL)" in out and str(cache_dir()) in out
    assert "local" not in out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "SAM_PFD_10K.pth").write_bytes(b"x")
    assert main(["weights", "list", "--weights-dir", str(mine)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("hrmedseg_pfd_10k"))
    assert "local (--weights-dir)" in line


def test_path_of_missing_weights_is_an_error_naming_the_file(capsys):
    assert main(["weights", "path", "sam_vit_h"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrmedseg weights: error:") and "sam_vit_h_4b8939.pth" in err and "Traceback" not in err
    assert main(["weights", "path", "no_such_weights"]) == 2
    assert "known names" in capsys.readouterr().err


def test_fetch_then_path(served_registry, tmp_path, capsys):
    assert main(["weights", "fetch", "tiny"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path == str(cache_dir() / "tiny.bin")
    assert open(path, "rb").read() == served_registry
    assert main(["weights", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == path
    target = tmp_path / "lab_share"
    assert main(["weights", "fetch", "tiny", "--weights-dir", str(target)]) == 0
    # already in the cache: found there, nothing downloaded again
    assert capsys.readouterr().out.strip().splitlines()[-1] == path


def test_fetch_into_weights_dir_when_not_cached(served_registry, tmp_path, capsys):
    target = tmp_path / "lab_share"
    assert main(["weights", "fetch", "tiny", "--weights-dir", str(target)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(target / "tiny.bin")
    assert (target / "tiny.bin").read_bytes() == served_registry


def test_import_sam_file(tmp_path, capsys):
    from segment_anything.build_sam import _build_sam

    sam = _build_sam(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=[0])
    src = tmp_path / "sam_custom.pth"
    torch.save(sam.state_dict(), src)
    out = tmp_path / "dec.pt"
    assert main(["weights", "import", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "sam_prompt_decoder" in text
    assert load_bundle(out, "sam_prompt_decoder")["provenance"]["source"] == "sam_custom.pth"
    assert main(["weights", "import", str(src), "--name", "my_decoder"]) == 0
    assert (cache_dir() / "my_decoder.pt").is_file()


def test_import_of_unknown_file_is_an_error(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not weights")
    assert main(["weights", "import", str(bad)]) == 2
    assert "notes.txt" in capsys.readouterr().err
