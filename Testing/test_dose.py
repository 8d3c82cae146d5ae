"""Dose statistics (Dmean, D2cc, Dmax) on analytic dose distributions, resampling, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from ParotidOARLib import dose
from ParotidOARLib.errors import GeometryError, InputError
from ParotidOARLib.imageio import Geometry, write_image

G = 0.5  # Gy per mm along x (LPS)


def linear_dose(geom: Geometry) -> np.ndarray:
    """D = 10 Gy + G * x(mm) evaluated at the voxel centres of ``geom``."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij")
    lps = geom.index_to_lps(np.stack([i, j, k], axis=-1))
    return (10.0 + G * lps[..., 0]).astype(np.float32)


def test_statistics_on_linear_gradient():
    geom = Geometry((60, 40, 40), (1.0, 1.0, 1.0), (-30.0, 0.0, 0.0))  # 0.001 cc voxels
    d = linear_dose(geom)
    m = np.zeros(geom.shape, bool)
    m[10:30, 10:30, 20:50] = True  # 20 x 20 voxels per x-plane = 0.4 cc; x from -10 to +19 mm
    s = dose.dose_statistics(d, m, geom.voxel_volume_cc)
    x = np.arange(20, 50) - 30.0
    assert s["volume_cc"] == pytest.approx(30 * 0.4)
    assert s["dmean_gy"] == pytest.approx(10 + G * x.mean(), abs=1e-5)
    assert s["dmax_gy"] == pytest.approx(10 + G * x.max(), abs=1e-5)
    # 2 cc = the five hottest planes; D2cc is the dose of the fifth hottest plane
    assert s["d2cc_gy"] == pytest.approx(10 + G * x[-5], abs=1e-5)
    assert s["flags"] == []
    small = np.zeros(geom.shape, bool)
    small[0:5, 0:5, 0:5] = True
    s = dose.dose_statistics(d, small, geom.voxel_volume_cc)
    assert math.isnan(s["d2cc_gy"]) and s["flags"] == ["volume_below_2cc"] and not math.isnan(s["dmean_gy"])
    s = dose.dose_statistics(d, np.zeros(geom.shape, bool), geom.voxel_volume_cc)
    assert s["flags"] == ["empty"] and math.isnan(s["dmax_gy"])
    with pytest.raises(GeometryError):
        dose.dose_statistics(d, np.zeros((2, 2, 2), bool), 0.001)


def test_resampling_reproduces_a_linear_dose():
    ct = Geometry((50, 40, 20), (0.8, 0.8, 2.0), (-20.0, -16.0, -10.0))
    coarse = Geometry((20, 16, 16), (2.5, 2.5, 3.0), (-24.0, -20.0, -14.0))  # covers the CT grid
    resampled, outside = dose.resample_dose_to(linear_dose(coarse), coarse, ct)
    assert outside == 0.0
    assert np.allclose(resampled, linear_dose(ct), atol=1e-3)  # linear interpolation is exact on a plane
    partial = Geometry((8, 16, 16), (2.5, 2.5, 3.0), (-24.0, -20.0, -14.0))  # x up to -6.5 mm only
    resampled, outside = dose.resample_dose_to(linear_dose(partial), partial, ct)
    assert 0.4 < outside < 0.9
    with pytest.raises(InputError):
        dose.resample_dose_to(np.full(coarse.shape, np.nan, np.float32), coarse, ct)


def test_compare_dose_auto_vs_reference():
    geom = Geometry((60, 40, 40), (1.0, 1.0, 1.0), (-30.0, 0.0, 0.0))
    d = linear_dose(geom)
    ref = np.zeros(geom.shape, bool)
    ref[10:30, 10:30, 20:40] = True
    auto = np.roll(ref, 3, axis=2)  # 3 mm towards +x → +1.5 Gy everywhere
    res = dose.compare_dose(d, geom, geom, {"Parotid": auto}, {"Parotid": ref, "Skin": ref})
    diff = res["segments"]["Parotid"]["difference"]
    assert diff["dmean_gy"] == pytest.approx(3 * G, abs=1e-5)
    assert diff["dmax_gy"] == pytest.approx(3 * G, abs=1e-5)
    assert diff["d2cc_gy"] == pytest.approx(3 * G, abs=1e-5)
    assert diff["volume_cc"] == pytest.approx(0)
    assert list(res["segments"]) == ["Parotid"]
    assert dose.dose_rows(res)[0]["difference_dmean_gy"] == pytest.approx(1.5, abs=1e-5)


def test_evaluate_cli_with_dose(tmp_path):
    from ParotidOARLib import segio

    geom = Geometry((40, 30, 20), (1.0, 1.0, 2.0), (-20.0, 0.0, 0.0))
    ref = np.zeros(geom.shape, bool)
    ref[5:15, 5:25, 10:30] = True
    segio.write_seg(tmp_path / "ref.seg.nrrd", {"Parotid": ref}, geom)
    segio.write_seg(tmp_path / "auto.seg.nrrd", {"Parotid": np.roll(ref, 2, axis=2)}, geom)
    coarse = Geometry((20, 16, 12), (2.5, 2.5, 3.0), (-24.0, -4.0, -4.0))
    write_image(tmp_path / "dose.nrrd", linear_dose(coarse), coarse)
    p = subprocess.run([sys.executable, "-m", "ParotidOARLib", "evaluate", "--pred", tmp_path / "auto.seg.nrrd",
                        "--ref", tmp_path / "ref.seg.nrrd", "--dose", tmp_path / "dose.nrrd", "--json",
                        tmp_path / "m.json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    seg = res["dose"]["segments"]["Parotid"]
    assert seg["difference"]["dmean_gy"] == pytest.approx(2 * G, abs=1e-3)
    assert seg["reference"]["dmean_gy"] == pytest.approx(10 + G * (np.arange(10, 30) - 20).mean(), abs=1e-3)
    assert any("resampled" in n for n in res["dose"]["notes"])


def _write_rtdose(path, dose_gy: np.ndarray, geom: Geometry, scaling=1e-4, reverse_frames=False):
    """A minimal RTDOSE (pydicom) holding ``dose_gy`` on an axial ``geom`` (uint32 × DoseGridScaling)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dose.RTDOSE_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = dose.RTDOSE_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTDOSE"
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = scaling
    frames = np.rint(dose_gy / scaling).astype(np.uint32)
    z = geom.origin[2] + np.arange(geom.shape[0]) * geom.spacing[2]
    if reverse_frames:
        frames, z = frames[::-1], z[::-1]
    ds.ImagePositionPatient = [geom.origin[0], geom.origin[1], float(z[0])]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [geom.spacing[1], geom.spacing[0]]
    ds.GridFrameOffsetVector = [float(v - z[0]) for v in z]
    ds.Rows, ds.Columns, ds.NumberOfFrames = geom.shape[1], geom.shape[2], geom.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.parametrize("reverse", [False, True])
def test_read_rtdose_applies_scaling_and_geometry(tmp_path, reverse):
    geom = Geometry((16, 12, 8), (2.5, 2.0, 3.0), (-20.0, -10.0, -12.0))
    truth = linear_dose(geom)
    path = _write_rtdose(tmp_path / "RD.dcm", truth, geom, reverse_frames=reverse)
    arr, g = dose.read_dose(path)
    assert g.same_grid(geom)
    assert np.allclose(arr, truth, atol=1e-3)
    bad = _write_rtdose(tmp_path / "rel.dcm", truth, geom)
    import pydicom

    ds = pydicom.dcmread(str(bad))
    ds.DoseUnits = "RELATIVE"
    ds.save_as(str(bad))
    with pytest.raises(InputError, match="Gy"):
        dose.read_dose(bad)
