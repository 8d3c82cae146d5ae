"""Issue 18's speed options: the sliding-window step, the wrong-side check's mirror window and the optional
OpenVINO backend (real torch, the shipped model on a small phantom, real files).

* The default steps (stage 1 0.5, stage 2 0.75) run fewer stage-2 windows than nnU-Net's 0.5 everywhere and
  give the same contours within a tolerance: stage 1 is unchanged, so the parotid is identical; on the small
  phantom (seed 3) the measured OAR agreement is DSC >= 0.99; the test asks for >= 0.95, which a wrong blend
  (a window left out or put in the wrong place) fails by far.
* ``--backend openvino`` gives torch's contours (DSC >= 0.99; measured identical voxel counts) when the
  package is installed, caches the converted model per weight SHA-256, and falls back to torch with one
  line when it is missing (simulated by hiding the module).
* A bad ``--backend`` is a usage error (exit 64) with one ``error:`` line.
* OpenVINO's windows are combined in NumPy exactly as torch's are (a small torch network behind both calling
  conventions: probabilities within 2e-6, same argmax, same progress calls), and once its converted model is
  cached, ``segment --backend openvino`` runs in a process that never imports torch.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from bundle_utils import synthetic_ct
from ParotidOARLib import backends, bundle as bundle_mod, cascade, labels, phantom, preprocess
from ParotidOARLib.__main__ import EXIT_USAGE, main
from ParotidOARLib.errors import InputError
from ParotidOARLib.imageio import write_image

SHIPPED = bundle_mod.default_bundle_dir()
needs_shipped = pytest.mark.skipif(SHIPPED is None, reason="the shipped model bundle is not installed")


def _dice(a, b):
    n = int(a.sum()) + int(b.sum())
    return 1.0 if n == 0 else 2.0 * float(np.count_nonzero(a & b)) / n


@pytest.fixture(scope="module")
def small_case():
    return phantom.generate_case(seed=3, side="left", size="small")


@pytest.fixture(scope="module")
def shipped():
    return cascade.load_model_bundle(SHIPPED)


class _Counting:
    """Wraps a network and counts its calls (windows)."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x):
        self.calls += 1
        return self.net(x)


def _run_counting(monkeypatch, case, bundle, **options):
    counters = {}
    real = cascade._network

    def network(b, stage, device, backend, threads):
        counters[stage] = _Counting(real(b, stage, device, backend, threads))
        return counters[stage]

    monkeypatch.setattr(cascade, "_network", network)
    res = cascade.run(case.ct, case.geometry, cascade.SegmentOptions(side="left", threads=1, **options),
                      bundle=bundle)
    monkeypatch.setattr(cascade, "_network", real)
    return res, {k: c.calls for k, c in counters.items()}


@needs_shipped
def test_default_step_runs_fewer_windows_with_the_same_contours(small_case, shipped, monkeypatch):
    assert cascade.DEFAULT_STEPS == {"stage1": 0.5, "stage2": 0.75}
    old, old_calls = _run_counting(monkeypatch, small_case, shipped, step=0.5)
    new, new_calls = _run_counting(monkeypatch, small_case, shipped)
    assert old.report["step"] == {"stage1": 0.5, "stage2": 0.5}
    assert new.report["step"] == {"stage1": 0.5, "stage2": 0.75}
    assert new_calls["stage2"] < old_calls["stage2"] and new_calls["stage1"] == old_calls["stage1"], \
        (old_calls, new_calls)
    assert np.array_equal(new.masks[labels.PAROTID], old.masks[labels.PAROTID])
    for name in labels.STRUCTURES:
        assert old.masks[name].any(), name
        assert _dice(new.masks[name], old.masks[name]) >= 0.95, name


def test_mirror_side_check_looks_in_one_window_and_keeps_the_warning():
    """The 'parotid everywhere' case of test_cascade's wrong-side test, with both side-check windows: the
    mirror window (default) runs one stage-1 window and reaches the same warning as the whole other side."""
    from bundle_utils import make_tiny_bundle

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        b = make_tiny_bundle(Path(tmp) / "everywhere", stage1_bias=50.0)
        ct, g = synthetic_ct(size=(70, 60, 24), spacing=(3.0, 3.0, 4.0), semi_axes_mm=(35.0, 60.0))
        x = g.index_to_lps(np.stack(np.meshgrid(np.arange(70), [0], [0], indexing="ij"), -1).reshape(-1, 3))[:, 0]
        ct[2:5, 20:40, x > 0] = 40
        assert abs(preprocess.body_midline_x(ct, g)) < 3
        checks = {}
        for window in ("mirror", "side"):
            for side in ("left", "right"):
                opts = cascade.SegmentOptions(side=side, model_dir=b, device="cpu", side_check_window=window)
                checks[window, side] = cascade.run(ct, g, opts, parotid_only=True).report["side_check"]
        assert checks["mirror", "left"]["method"] == "mirror window"
        assert checks["side", "left"]["method"] == "whole side"
        for window in ("mirror", "side"):
            assert "Is the operated side right?" in (checks[window, "left"]["warning"] or ""), checks
            assert checks[window, "right"]["warning"] is None, checks
        with pytest.raises(InputError, match="side-check-window"):
            cascade.check_options(cascade.SegmentOptions(side="left", side_check_window="both"))


@needs_shipped
@pytest.mark.skipif(not backends.openvino_available(), reason="openvino is not installed (pip install openvino)")
def test_openvino_backend_matches_torch_and_caches_the_converted_model(small_case, tmp_path, monkeypatch):
    import openvino as ov

    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    b = cascade.load_model_bundle(SHIPPED)
    ref = cascade.run(small_case.ct, small_case.geometry, cascade.SegmentOptions(side="left", threads=1), bundle=b)
    res = cascade.run(small_case.ct, small_case.geometry,
                      cascade.SegmentOptions(side="left", threads=1, backend="openvino"), bundle=b)
    assert res.report["backend"] == "openvino" and ref.report["backend"] == "torch"
    for name in labels.STRUCTURES:
        assert _dice(res.masks[name], ref.masks[name]) >= 0.99, name
    for stage in ("stage1", "stage2"):
        sha = b.manifest.stage(stage)["sha256"]
        assert (tmp_path / "cache" / "openvino" / f"{sha}.xml").is_file()
        assert (tmp_path / "cache" / "openvino" / f"{sha}.bin").is_file()

    def no_conversion(*a, **k):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    net = backends.openvino_model(cascade.load_model_bundle(SHIPPED), "stage2", (32, 48, 48), threads=1)
    import torch

    x = torch.zeros((1, 1, 32, 48, 48))
    assert tuple(net(x).shape) == (1, 7, 32, 48, 48)


@pytest.fixture()
def no_openvino(monkeypatch):
    """Make ``import openvino`` fail, as on a machine without the package."""
    monkeypatch.setitem(sys.modules, "openvino", None)


def test_missing_openvino_falls_back_to_torch_with_one_line(no_openvino, fast_bundle, tmp_path, capsys):
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    path = write_image(tmp_path / "ct.nrrd", ct, g)
    capsys.readouterr()
    rc = main(["segment", str(path), "--side", "left", "--out", str(tmp_path / "o.seg.nrrd"), "--model",
               str(fast_bundle), "--device", "cpu", "--threads", "1", "--backend", "openvino", "--report",
               str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "openvino" in ln]
    assert lines == ["warning: --backend openvino: the openvino package is not installed (pip install openvino); "
                     "using torch."], err
    assert json.loads((tmp_path / "r.json").read_text())["backend"] == "torch"
    # the API takes the option too, with the same fallback
    from ParotidOARLib import load_model, segment_image
    from ParotidOARLib.imageio import to_sitk

    seg = segment_image(to_sitk(ct, g), side="left", model=load_model(fast_bundle, device="cpu"), threads=1,
                        backend="openvino", side_check=False)
    assert seg.report["backend"] == "torch"
    assert "using torch" in capsys.readouterr().err


def test_bad_backend_is_a_usage_error_and_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "ct.nrrd", "--side", "left", "--out", str(tmp_path / "o.seg.nrrd"), "--backend", "tensorrt"])
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "--backend" in errors[0] and "tensorrt" in errors[0], err
    with pytest.raises(SystemExit) as exc:
        main(["batch", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--side", "left", "--backend", "x"])
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(InputError, match="Unknown backend 'onnx'"):
        cascade.check_options(cascade.SegmentOptions(side="left", backend="onnx"))
    assert backends.resolve("openvino", "cuda", warn=lambda m: None) == "torch"


def test_preload_imports_in_the_background_and_never_raises():
    sys.modules.pop("colorsys", None)
    t = backends.preload("colorsys", "no_such_module_parotidoar", "json")
    t.join(10)
    assert not t.is_alive()
    assert "colorsys" in sys.modules  # imported by the thread
    import colorsys  # noqa: F401 - the main thread's import finds it

    # a missing module stops the thread quietly; the main thread's own import reports it
    with pytest.raises(ModuleNotFoundError):
        import no_such_module_parotidoar  # noqa: F401


class _NumpyNet:
    """A torch network behind OpenVINO's calling convention (NumPy in, NumPy out)."""

    numpy_io = True

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        import torch

        assert isinstance(x, np.ndarray)
        with torch.no_grad():
            return self.net(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("tta", [False, True])
def test_numpy_windows_combine_like_torch_windows(tta):
    """The NumPy path of sliding_window (OpenVINO's, which never imports torch) blends the same windows with the
    same weights as the torch path: padding (an axis shorter than the patch), overlap, mirroring, softmax."""
    import torch

    from ParotidOARLib import inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4),
                              torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    img = np.random.default_rng(1).normal(size=(13, 40, 37)).astype(np.float32)
    calls = {"torch": [], "numpy": []}
    kw = dict(step=0.5, tta=tta, pad_value=-1.0, mirror_axes=[2] if tta else None)
    ref = inference.sliding_window(net, img, (16, 16, 24), 3, torch.device("cpu"),
                                   progress=calls["torch"].append, **kw)
    out = inference.sliding_window(_NumpyNet(net), img, (16, 16, 24), 3, None, progress=calls["numpy"].append, **kw)
    assert out.shape == ref.shape == (3, 13, 40, 37) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-6)
    assert np.array_equal(out.argmax(0), ref.argmax(0))
    assert calls["numpy"] == calls["torch"] and calls["numpy"][-1] == 1.0 and len(calls["numpy"]) > 4


@pytest.mark.skipif(not backends.openvino_available(), reason="openvino is not installed (pip install openvino)")
def test_openvino_on_the_cpu_runs_without_importing_torch(fast_bundle, tmp_path):
    """`segment --backend openvino`: the first run converts the model (with torch) and caches it; the next one
    reads the cache, and the process never imports torch (issue 18: ~1.1 s of interpreter time saved). Both
    give the same masks, reported as OpenVINO on the CPU."""
    import subprocess

    from ParotidOARLib.segio import load_masks

    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    path = write_image(tmp_path / "ct.nrrd", ct, g)
    env = {**os.environ, backends.CACHE_ENV: str(tmp_path / "cache")}
    seen = {}
    for run in ("first", "second"):
        out, rep = tmp_path / f"{run}.seg.nrrd", tmp_path / f"{run}.json"
        code = ("import sys\nfrom ParotidOARLib.__main__ import main\n"
                f"rc = main(['segment', {str(path)!r}, '--side', 'left', '--out', {str(out)!r}, '--model', "
                f"{str(fast_bundle)!r}, '--threads', '1', '--backend', 'openvino', '--report', {str(rep)!r}, '-q'])\n"
                "print('RESULT', rc, 'torch' in sys.modules)\n")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        result = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        assert result and result[0][1] == "0", proc.stdout + proc.stderr
        seen[run] = result[0][2] == "True"
        report = json.loads(rep.read_text())
        assert report["backend"] == "openvino" and report["device"] == "cpu", report
    assert seen == {"first": True, "second": False}, seen
    first, second = load_masks(tmp_path / "first.seg.nrrd")[0], load_masks(tmp_path / "second.seg.nrrd")[0]
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
