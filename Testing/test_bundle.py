"""Model bundles: save/load, SHA-256 verification, tamper/corruption errors, install, list, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bundle_utils import make_tiny_bundle, tiny_config
from ParotidOARLib import bundle
from ParotidOARLib.__main__ import main
from ParotidOARLib.errors import ModelError, OutputExistsError
from ParotidOARLib.network import build


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    n1, n2 = build(tiny_config(2)), build(tiny_config(7))
    man = bundle.Manifest(name="rt", version="1.2.3", stages={
        "stage1": bundle.stage_spec(["background", "Parotid"], (4, 4, 3), {"clip": [-1, 1], "mean": 0, "std": 1},
                                    (16, 32, 32), tiny_config(2)),
        "stage2": bundle.stage_spec(["background", "a", "b", "c", "d", "e", "f"], (1, 1, 2),
                                    {"clip": [-1, 1], "mean": 0, "std": 1}, (16, 32, 32), tiny_config(7))},
        created="2026-11-23")
    d = bundle.save_bundle(tmp_path / "b", man, {"stage1": n1.state_dict(), "stage2": n2.state_dict()})
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "stage1.pt", "stage2.pt"]
    assert "sha256" not in man.stages["stage1"]  # the caller's manifest is not modified
    b = bundle.load_bundle(d)
    assert b.manifest.name == "rt" and b.manifest.model_id == "rt@1.2.3"
    assert b.manifest.spacing("stage1") == (4.0, 4.0, 3.0) and b.manifest.patch_size("stage2") == (16, 32, 32)
    assert b.manifest.stage("stage1")["dtype"] == "float16"
    m1 = b.model("stage1")
    assert not m1.training
    for k, v in n1.state_dict().items():
        w = m1.state_dict()[k]
        assert w.dtype == v.dtype
        if v.is_floating_point():
            assert torch.allclose(w, v, atol=1e-3, rtol=1e-3)  # float16 storage
    x = torch.randn(1, 1, 16, 32, 32)
    n1.eval()
    with torch.inference_mode():
        assert torch.allclose(m1(x), n1(x), atol=0.05)
    # full precision storage is exact
    d32 = bundle.save_bundle(tmp_path / "b32", man, {"stage1": n1.state_dict(), "stage2": n2.state_dict()},
                             half=False)
    sd = bundle.load_bundle(d32).state_dict("stage1")
    assert all(torch.equal(sd[k], v) for k, v in n1.state_dict().items())
    assert (d32 / "stage1.pt").stat().st_size > 1.5 * (d / "stage1.pt").stat().st_size


def test_save_is_deterministic_and_refuses_overwrite(tmp_path):
    a = make_tiny_bundle(tmp_path / "a", seed=3)
    b = make_tiny_bundle(tmp_path / "b", seed=3)
    for f in ("manifest.json", "stage1.pt", "stage2.pt"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    with pytest.raises(OutputExistsError):
        make_tiny_bundle(tmp_path / "a", seed=4)
    make_tiny_bundle(tmp_path / "a", seed=4, force=True)
    assert (a / "stage1.pt").read_bytes() != (b / "stage1.pt").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_manifest_fields(tiny_bundle):
    d = json.loads((tiny_bundle / "manifest.json").read_text())
    for key in ("name", "version", "clinical_use", "description", "license", "data", "stages", "training",
                "roi_margin_mm", "created"):
        assert key in d
    assert d["clinical_use"] is False
    s1, s2 = d["stages"]["stage1"], d["stages"]["stage2"]
    assert s1["labels"] == ["background", "Parotid"]
    assert s2["labels"][0] == "background" and len(s2["labels"]) == 7
    for s in (s1, s2):
        assert set(s) >= {"spacing", "normalisation", "patch_size", "architecture", "file", "sha256"}
        assert len(s["sha256"]) == 64
        assert s["sha256"] == bundle.sha256_file(tiny_bundle / s["file"])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sha_tamper_is_detected(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path / "t")
    data = bytearray((d / "stage2.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (d / "stage2.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"stage2\.pt.*(corrupt|modified).*models verify"):
        bundle.verify(d)
    with pytest.raises(ModelError, match="stage2.pt"):
        bundle.load_bundle(d)


def test_corrupt_file_with_matching_sha_fails_clearly(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path / "c")
    (d / "stage1.pt").write_bytes(b"this is not a torch file")
    m = json.loads((d / "manifest.json").read_text())
    m["stages"]["stage1"]["sha256"] = bundle.sha256_file(d / "stage1.pt")
    (d / "manifest.json").write_text(json.dumps(m))
    b = bundle.load_bundle(d)  # the hash matches...
    with pytest.raises(ModelError, match=r"Cannot load weight file .*stage1\.pt"):
        b.model("stage1")  # ...but the file is not a state dict


def test_architecture_mismatch(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path / "m")
    m = json.loads((d / "manifest.json").read_text())
    m["stages"]["stage1"]["architecture"]["base_features"] = 8
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="do not fit the architecture"):
        bundle.load_bundle(d).model("stage1")


def test_missing_pieces(tiny_bundle, tmp_path):
    with pytest.raises(ModelError, match="No model bundle"):
        bundle.load_bundle(tmp_path / "nothing")
    d = _copy(tiny_bundle, tmp_path / "x")
    (d / "stage1.pt").unlink()
    with pytest.raises(ModelError, match=r"stage1\.pt is missing"):
        bundle.verify(d)
    d2 = _copy(tiny_bundle, tmp_path / "y")
    (d2 / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        bundle.verify(d2)
    d3 = _copy(tiny_bundle, tmp_path / "z")
    m = json.loads((d3 / "manifest.json").read_text())
    del m["stages"]["stage2"]
    (d3 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="stage2"):
        bundle.verify(d3)


def test_default_dir_env_and_missing_default(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv(bundle.MODELS_ENV, str(tmp_path / "models"))
    assert bundle.models_root() == tmp_path / "models"
    if not (bundle.REPO_ROOT / "Resources" / "Models" / bundle.DEFAULT_BUNDLE_NAME / "manifest.json").exists():
        assert bundle.default_bundle_dir() is None
        with pytest.raises(ModelError, match="(?s)No model bundle found.*train.*install"):
            bundle.resolve_bundle_dir(None)
    dest = bundle.install(tiny_bundle)
    assert dest == tmp_path / "models" / "tiny-test"
    # install under the default name: becomes the default bundle
    d = _copy(tiny_bundle, tmp_path / "src")
    m = json.loads((d / "manifest.json").read_text())
    m["name"] = bundle.DEFAULT_BUNDLE_NAME
    (d / "manifest.json").write_text(json.dumps(m))
    bundle.install(d)
    assert bundle.default_bundle_dir() == tmp_path / "models" / bundle.DEFAULT_BUNDLE_NAME
    assert bundle.resolve_bundle_dir(None) == bundle.default_bundle_dir()
    assert bundle.resolve_bundle_dir("tiny-test") == tmp_path / "models" / "tiny-test"  # by name


def test_install_and_list(tiny_bundle, tmp_path):
    root = tmp_path / "root"
    dest = bundle.install(tiny_bundle, root=root)
    assert bundle.verify(dest).name == "tiny-test"
    with pytest.raises(OutputExistsError):
        bundle.install(tiny_bundle, root=root)
    bundle.install(tiny_bundle, root=root, force=True)
    broken = _copy(tiny_bundle, root / "broken")
    (broken / "stage1.pt").write_bytes(b"x")
    entries = {e["path"]: e for e in bundle.list_bundles(root)}
    assert entries[str(dest)]["ok"] and entries[str(dest)]["clinical_use"] is False
    assert not entries[str(broken)]["ok"] and "stage1.pt" in entries[str(broken)]["error"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    # a tampered bundle is not installed
    with pytest.raises(ModelError):
        bundle.install(broken, root=tmp_path / "other")
    assert not (tmp_path / "other" / "tiny-test").exists()


def test_models_cli(tiny_bundle, tmp_path, capsys):
    root = tmp_path / "models"
    assert main(["models", "install", str(tiny_bundle), "--root", str(root)]) == 0
    assert main(["models", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "tiny-test" in out and "ok" in out and "not for clinical use" in out
    assert main(["models", "verify", str(root / "tiny-test")]) == 0
    assert "OK" in capsys.readouterr().out
    (root / "tiny-test" / "stage2.pt").write_bytes(b"tampered")
    assert main(["models", "verify", str(root / "tiny-test")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "stage2.pt" in err
    assert main(["models", "list", "--root", str(root), "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert listed["bundles"][0]["ok"] is False
    assert main(["models", "install", str(tiny_bundle), "--root", str(root)]) == 2  # exists
    assert main(["models", "install", str(tiny_bundle), "--root", str(root), "--force"]) == 0


def test_atomic_folder_publishes_whole_or_nothing(tmp_path):
    """The one folder publisher (bundles, installs, nnU-Net exports): an error inside leaves neither the
    folder nor a temporary; an existing folder is refused without force and replaced whole with it."""
    from ParotidOARLib.errors import OutputExistsError
    from ParotidOARLib.imageio import atomic_folder

    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(OutputExistsError):
        with atomic_folder(target):
            pass
    with atomic_folder(target, force=True) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
