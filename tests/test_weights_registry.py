"""Weights registry: resolve order, verification, real downloads over loopback, import of real-format files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import socket
import threading
from pathlib import Path

import pytest
import torch

import hrmedseg.weights.registry as registry_mod
from hrmedseg.errors import WeightsError
from hrmedseg.weights.bundle import load_bundle, save_bundle
from hrmedseg.models.importing import import_checkpoint, resolve_weights
from hrmedseg.weights.registry import Registry, cache_dir, get_entry, list_weights, sidecar_path

SAM_NAMES = ("sam_vit_h", "sam_vit_l", "sam_vit_b")
SAM21_NAMES = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large")


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A fresh cache, no user weights folder, and loopback traffic kept off any proxy."""
    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache_root"))
    monkeypatch.delenv("HRMEDSEG_WEIGHTS_DIR", raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return tmp_path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_dir(tmp_path):
    """(folder, base_url): a folder served over HTTP on 127.0.0.1 only, for the test's duration."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port_url(name: str) -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/{name}"


def payload(n: int = 50_000, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_registry(tmp_path: Path, entries: list[dict], bundled_dir: Path | None = None) -> Registry:
    path = tmp_path / "registry.json"
    base = {"kind": "test", "architecture": "test", "holds": "test bytes", "licence": "CC0"}
    path.write_text(json.dumps({"format_version": 1, "weights": [{**base, **e} for e in entries]}))
    return Registry.from_json(path, bundled_dir)


def small_sam_state(embed_dim: int = 768) -> dict[str, torch.Tensor]:
    """A real segment-anything Sam (real key names, ViT-B width by default), one encoder block."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    sam = _build_sam(
        encoder_embed_dim=embed_dim, encoder_depth=1, encoder_num_heads=max(1, embed_dim // 64),
        encoder_global_attn_indexes=[0],
    )
    return sam.state_dict()


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(small_sam_state(), path)
    return path


# ---------------------------------------------------------------------------------------------
# the shipped registry
# ---------------------------------------------------------------------------------------------


def test_shipped_registry_entries():
    names = [e.name for e in list_weights()]
    for n in ("hrmedseg_pfd_10k", *SAM_NAMES, *SAM21_NAMES):
        assert n in names
    for e in list_weights():
        assert e.sha256 is None or len(e.sha256) == 64
        if e.url:
            assert e.url.endswith("/" + e.file)
            assert e.sha256 and e.size, f"{e.name}: a downloadable entry must be pinned by hash and size"
    for n in SAM_NAMES:
        assert get_entry(n).url.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
        assert get_entry(n).licence == "Apache-2.0"
    for n in SAM21_NAMES:
        assert get_entry(n).url.startswith("https://dl.fbaipublicfiles.com/segment_anything_2/092824/")
    pfd = get_entry("hrmedseg_pfd_10k")
    assert pfd.file == "SAM_PFD_10K.pth" and pfd.url is None and pfd.sha256 is None
    assert "github.com/xq141839" in pfd.note and pfd.architecture == "lgvit_neck"
    with pytest.raises(WeightsError, match="sam_vit_h"):
        get_entry("sam_vit_x")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache_root" / "weights"
    monkeypatch.delenv("HRMEDSEG_CACHE_DIR")
    assert cache_dir().name == "weights" and "hrmedseg" in str(cache_dir())


def test_missing_offline_names_file_url_folder_and_env_var():
    entry = get_entry("sam_vit_b")
    with pytest.raises(WeightsError) as err:
        registry_mod.resolve("sam_vit_b")
    msg = str(err.value)
    for part in (entry.file, entry.url, str(cache_dir()), "HRMEDSEG_WEIGHTS_DIR", "--weights-dir"):
        assert part in msg
    assert not cache_dir().exists() or not any(cache_dir().iterdir()), "nothing may be downloaded unasked"


def test_no_url_entry_says_where_to_obtain_it():
    with pytest.raises(WeightsError, match="No public download URL.*xq141839.*SAM_PFD_10K.pth"):
        registry_mod.fetch("hrmedseg_pfd_10k")


# ---------------------------------------------------------------------------------------------
# downloads (pooch, loopback server)
# ---------------------------------------------------------------------------------------------


def test_download_with_good_hash_then_found_offline(tmp_path, http_dir):
    root, base = http_dir
    data = payload()
    (root / "w.bin").write_bytes(data)
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "url": f"{base}/w.bin", "sha256": sha(data), "size": len(data)}])
    with pytest.raises(WeightsError):
        reg.resolve("w")  # not downloaded unless asked
    path = reg.fetch("w")
    assert path == cache_dir() / "w.bin" and path.read_bytes() == data
    (root / "w.bin").unlink()  # "offline" from now on
    assert reg.resolve("w") == path
    assert reg.status("w") == "cached"


def test_download_with_wrong_hash_is_refused_and_not_kept(tmp_path, http_dir):
    root, base = http_dir
    data = payload()
    (root / "w.bin").write_bytes(data)
    wrong = sha(data + b"x")
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "url": f"{base}/w.bin", "sha256": wrong}])
    with pytest.raises(WeightsError, match="w.bin.*does not match its published sha256"):
        reg.fetch("w")
    assert not (cache_dir() / "w.bin").exists()


def test_unreachable_url_names_file_url_and_folder(tmp_path):
    url = closed_port_url("w.bin")
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "url": url, "sha256": sha(b"abc")}])
    with pytest.raises(WeightsError) as err:
        reg.fetch("w")
    msg = str(err.value)
    assert "w.bin" in msg and url in msg and str(cache_dir()) in msg and "HRMEDSEG_WEIGHTS_DIR" in msg


def test_unknown_hash_is_recorded_at_first_download_and_enforced(tmp_path, http_dir, caplog):
    root, base = http_dir
    data = payload()
    (root / "w.bin").write_bytes(data)
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "url": f"{base}/w.bin", "sha256": None}])
    with caplog.at_level(logging.WARNING, logger="hrmedseg.weights.registry"):
        path = reg.fetch("w")
    record = json.loads(sidecar_path(path).read_text())
    assert record["sha256"] == sha(data) and record["size"] == len(data)
    assert "recorded" in caplog.text and sha(data) in caplog.text
    assert reg.resolve("w") == path
    path.write_bytes(payload(seed=1))  # same size, other bytes
    with pytest.raises(WeightsError, match="w.bin.*recorded at first download"):
        reg.resolve("w")


def test_corrupt_cached_file_is_reported_then_replaced_by_fetch(tmp_path, http_dir, caplog):
    root, base = http_dir
    data = payload()
    (root / "w.bin").write_bytes(data)
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "url": f"{base}/w.bin", "sha256": sha(data), "size": len(data)}])
    cached = cache_dir() / "w.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(payload(seed=3))  # right size, wrong content
    with pytest.raises(WeightsError, match=f"{cached}.*sha256.*not used"):
        reg.resolve("w")
    with caplog.at_level(logging.WARNING):
        assert reg.fetch("w").read_bytes() == data
    assert "Downloading it again" in caplog.text


# ---------------------------------------------------------------------------------------------
# local folders, precedence, corrupt files, bundled entries
# ---------------------------------------------------------------------------------------------


def test_precedence_weights_dir_then_env_then_cache(tmp_path, monkeypatch):
    data = payload()
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "sha256": sha(data), "url": None}])
    folders = {k: tmp_path / k for k in ("arg", "env")}
    for f in (*folders.values(), cache_dir()):
        f.mkdir(parents=True)
        (f / "w.bin").write_bytes(data)
    monkeypatch.setenv("HRMEDSEG_WEIGHTS_DIR", str(folders["env"]))
    assert reg.resolve("w", weights_dir=folders["arg"]) == folders["arg"] / "w.bin"
    assert reg.resolve("w") == folders["env"] / "w.bin"
    monkeypatch.delenv("HRMEDSEG_WEIGHTS_DIR")
    assert reg.resolve("w") == cache_dir() / "w.bin"
    (cache_dir() / "w.bin").unlink()
    with pytest.raises(WeightsError, match="w.bin"):
        reg.resolve("w")


def test_truncated_files_are_refused_naming_them(tmp_path):
    buf = tmp_path / "full.pt"
    torch.save({"a": torch.randn(1000)}, buf)
    full = buf.read_bytes()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "sized.pt").write_bytes(full[: len(full) // 2])
    (folder / "unpinned.pt").write_bytes(full[: len(full) - 100])
    reg = make_registry(tmp_path, [
        {"name": "sized", "file": "sized.pt", "size": len(full), "sha256": sha(full)},
        {"name": "unpinned", "file": "unpinned.pt"},
    ])
    with pytest.raises(WeightsError, match=r"sized\.pt.*truncated"):
        reg.resolve("sized", weights_dir=folder)
    with pytest.raises(WeightsError, match=r"unpinned\.pt.*truncated or corrupt"):
        reg.resolve("unpinned", weights_dir=folder)
    (folder / "unpinned.pt").write_bytes(full)
    assert reg.resolve("unpinned", weights_dir=folder) == folder / "unpinned.pt"


def test_bundled_entry(tmp_path):
    bundled = tmp_path / "pkg_default"
    bundled.mkdir()
    data = payload()
    (bundled / "tiny_model.pt").write_bytes(data)
    reg = make_registry(
        tmp_path,
        [{"name": "tiny", "file": "tiny_model.pt", "sha256": sha(data), "size": len(data), "bundled": True},
         {"name": "gone", "file": "gone.pt", "bundled": True}],
        bundled_dir=bundled,
    )
    assert reg.resolve("tiny") == bundled / "tiny_model.pt"
    assert reg.status("tiny") == "bundled"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tiny_model.pt").write_bytes(data)
    assert reg.resolve("tiny", weights_dir=mine) == mine / "tiny_model.pt"  # user folders override
    (bundled / "tiny_model.pt").write_bytes(payload(seed=2))
    with pytest.raises(WeightsError, match="tiny_model.pt"):
        reg.resolve("tiny")
    with pytest.raises(WeightsError, match="gone.pt.*reinstall"):
        reg.resolve("gone")


def test_default_bundled_dir_is_beside_the_registry(tmp_path):
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin"}])
    assert reg.bundled_dir == tmp_path / "default"
    assert registry_mod.default_registry().bundled_dir == Path(registry_mod.__file__).parent / "default"


def test_hash_is_not_recomputed_while_file_unchanged(tmp_path, monkeypatch):
    data = payload()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "w.bin").write_bytes(data)
    reg = make_registry(tmp_path, [{"name": "w", "file": "w.bin", "sha256": sha(data)}])
    calls = []
    real = registry_mod.sha256_file
    monkeypatch.setattr(registry_mod, "sha256_file", lambda p, progress=True: calls.append(p) or real(p, progress))
    reg.resolve("w", weights_dir=folder)
    reg.resolve("w", weights_dir=folder)
    assert len(calls) == 1
    (folder / "w.bin").write_bytes(payload(seed=5))
    with pytest.raises(WeightsError):
        reg.resolve("w", weights_dir=folder)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# importing
# ---------------------------------------------------------------------------------------------


def test_import_sam_keeps_exactly_the_prompt_encoder_and_mask_decoder(sam_file):
    source = torch.load(sam_file, weights_only=True)
    dest = import_checkpoint(sam_file)
    assert dest == cache_dir() / "sam_vit_b_prompt_decoder.pt"
    bundle = load_bundle(dest, "sam_prompt_decoder")
    expected = {k for k in source if k.startswith(("prompt_encoder.", "mask_decoder."))}
    assert set(bundle["state_dict"]) == expected
    for k in expected:
        assert torch.equal(bundle["state_dict"][k], source[k])
    assert bundle["config"] == {"variant": "vit_b"}
    prov = bundle["provenance"]
    assert prov["source"] == sam_file.name and prov["licence"] == "Apache-2.0"
    assert prov["source_sha256"] == hashlib.sha256(sam_file.read_bytes()).hexdigest()
    assert prov["source_size"] == sam_file.stat().st_size
    assert dest.stat().st_size < 20e6  # SAM's real (ViT-B/L/H-shaped) decoder: about 16 MB
    # the tensors load, unchanged in name and shape, into segment-anything's own modules
    from segment_anything.build_sam import _build_sam

    sam = _build_sam(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=[0])
    for part in ("prompt_encoder", "mask_decoder"):
        sub = {k[len(part) + 1:]: v for k, v in bundle["state_dict"].items() if k.startswith(part + ".")}
        getattr(sam, part).load_state_dict(sub, strict=True)


def test_import_sam_with_unusual_width_and_explicit_destination(tmp_path):
    src = tmp_path / "my_sam.pth"
    torch.save(small_sam_state(embed_dim=64), src)
    dest = import_checkpoint(src, dest_path=tmp_path / "out" / "dec.pt", name="ignored_when_dest_given")
    bundle = load_bundle(dest, "sam_prompt_decoder")
    assert dest == tmp_path / "out" / "dec.pt"
    assert bundle["config"] == {"variant": None, "encoder_embed_dim": 64}


def test_import_lgvit_checkpoint(tmp_path):
    from hrmedseg.models import EncoderConfig, build_encoder, load_encoder

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    src = tmp_path / "SAM_PFD_10K.pth"
    torch.save({"model": {f"module.{k}": v for k, v in encoder.state_dict().items()}}, src)
    dest = import_checkpoint(src, name="pfd")
    assert dest == cache_dir() / "pfd.pt"
    bundle = load_bundle(dest, "lgvit_neck")
    assert bundle["provenance"]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_encoder(dest)(x), load_encoder(src)(x))
    assert load_encoder(dest).preprocessing == load_encoder(src).preprocessing


def test_import_bundle_is_validated_and_copied(tmp_path):
    src = save_bundle(tmp_path / "b.pt", "sam_prompt_decoder", {"prompt_encoder.x": torch.ones(3)})
    dest = import_checkpoint(src, dest_path=tmp_path / "copy.pt")
    assert dest.read_bytes() == src.read_bytes()


def test_import_refuses_other_files_naming_them(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, other)
    with pytest.raises(WeightsError, match=r"resnet\.pth.*expected a SAM checkpoint.*prompt_encoder"):
        import_checkpoint(other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(payload(1000))
    with pytest.raises(WeightsError, match=r"garbage\.pth"):
        import_checkpoint(garbage)
    with pytest.raises(WeightsError, match=r"nothere\.pth"):
        import_checkpoint(tmp_path / "nothere.pth")


def test_import_sam2_checkpoint(tmp_path):
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    src = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, src)  # the layout of the released files
    dest = import_checkpoint(src)
    assert dest == cache_dir() / "sam2.1_hiera_tiny_prompt_decoder.pt"
    bundle = load_bundle(dest, "sam2_prompt_decoder")
    state = model.state_dict()
    assert any(k.startswith("sam_mask_decoder.") for k in bundle["state_dict"])
    assert any(k.startswith("sam_prompt_encoder.") for k in bundle["state_dict"])
    assert not any(k.startswith("image_encoder.") for k in bundle["state_dict"])
    for k, v in bundle["state_dict"].items():
        assert torch.equal(v, state[k])
    assert bundle["config"]["sam2_config"] == "sam2.1_hiera_t"
    assert dest.stat().st_size < src.stat().st_size / 4


# ---------------------------------------------------------------------------------------------
# derived entries: made locally from another entry, no download
# ---------------------------------------------------------------------------------------------


def test_derived_entry_is_made_from_a_local_source(tmp_path, sam_file):
    digest = hashlib.sha256(sam_file.read_bytes()).hexdigest()
    reg = make_registry(tmp_path, [
        {"name": "sam_vit_b", "file": sam_file.name, "sha256": digest, "size": sam_file.stat().st_size,
         "url": "http://127.0.0.1:9/never-used"},
        {"name": "sam_vit_b_prompt_decoder", "file": "sam_vit_b_prompt_decoder.pt",
         "architecture": "sam_prompt_decoder", "derived_from": "sam_vit_b"},
    ])
    with pytest.raises(WeightsError, match="made on this computer from sam_vit_b.*hrmedseg weights fetch"):
        reg.resolve("sam_vit_b_prompt_decoder")  # the registry finds files; making one is the models layer's
    with pytest.raises(WeightsError, match="made from sam_vit_b.*sam_vit_b_01ec64.pth"):
        resolve_weights("sam_vit_b_prompt_decoder", registry=reg)
    path = resolve_weights("sam_vit_b_prompt_decoder", weights_dir=sam_file.parent, registry=reg)
    assert path == sam_file.parent / "sam_vit_b_prompt_decoder.pt"
    assert load_bundle(path)["provenance"]["source_sha256"] == digest
    assert reg.resolve("sam_vit_b_prompt_decoder", weights_dir=sam_file.parent) == path
    assert resolve_weights("sam_vit_b_prompt_decoder", weights_dir=sam_file.parent, registry=reg) == path
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_bundle(wrong / "sam_vit_b_prompt_decoder.pt", "lgvit_neck", {"x": torch.ones(1)})
    with pytest.raises(WeightsError, match="lgvit_neck"):
        reg.resolve("sam_vit_b_prompt_decoder", weights_dir=wrong)
