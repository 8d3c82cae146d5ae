"""scene.py against Slicer's real MRML classes (slicer-core wheel).

The input volume is deliberately oblique (rotated 30 degrees about the
superior axis, anisotropic spacing, off-centre origin) so that every LPS/RAS
or IJK ordering mistake shows up as a mismatch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ParotidOARLib import labels, scene, segio
from ParotidOARLib.errors import OutputExistsError
from ParotidOARLib.imageio import Geometry, read_image

pytest.importorskip("slicer", reason="slicer-core is part of the test install (make test)")


def _rotated_geometry() -> Geometry:
    a = np.deg2rad(30.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0.0],
                          [np.sin(a), np.cos(a), 0.0],
                          [0.0, 0.0, 1.0]])
    return Geometry((40, 36, 18), (0.9, 1.1, 2.0), (-12.5, 30.0, -40.0), direction.ravel())


def _masks(geometry: Geometry) -> dict[str, np.ndarray]:
    shape = geometry.shape
    masks = {name: np.zeros(shape, dtype=bool) for name in labels.STRUCTURES}
    masks[labels.PAROTID][6:11, 12:22, 14:26] = True
    for n, name in enumerate(labels.OARS):
        masks[name][4 + n:6 + n, 8 + 2 * n:11 + 2 * n, 6 + 3 * n:9 + 3 * n] = True
    roi = np.zeros(shape, dtype=bool)
    roi[2:16, 5:31, 4:36] = True
    masks[labels.ROI] = roi
    return masks


def _crop_box_lps(geometry: Geometry, mask: np.ndarray, pad_mm: float = 2.0) -> dict:
    """Axis-aligned LPS box around the mask's voxel corners (what the cascade reports)."""
    idx = np.argwhere(mask)  # (k, j, i)
    lo = idx.min(axis=0)[::-1] - 0.5
    hi = idx.max(axis=0)[::-1] + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    lps = geometry.index_to_lps(corners)
    return {"min": (lps.min(axis=0) - pad_mm).tolist(), "max": (lps.max(axis=0) + pad_mm).tolist()}


@pytest.fixture()
def case(mrml, tmp_path):
    geometry = _rotated_geometry()
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, size=geometry.shape).astype(np.int16)
    volume = scene.add_volume(mrml.scene, ct, geometry, "CT 1")
    masks = _masks(geometry)
    seg_path = segio.write_seg(tmp_path / "result.seg.nrrd", masks, geometry, side="left")
    report = {"model": {"id": "parotid-oar-test", "version": "0.0.1", "sha256": "0" * 64},
              "device": "cpu", "side": "left", "roi_volume_cc": 12.5,
              "volumes_cc": {name: float(m.sum()) * geometry.voxel_volume_cc for name, m in masks.items()},
              "timings": {"stage 1": 1.25, "stage 2": 2.5},
              "crop_box_lps": _crop_box_lps(geometry, masks[labels.ROI])}
    return {"mrml": mrml, "geometry": geometry, "ct": ct, "volume": volume, "masks": masks,
            "seg_path": seg_path, "report": report, "tmp": tmp_path}


def _load(case, **kw):
    return scene.load_result(case["mrml"].scene, case["seg_path"], case["volume"], report=case["report"], **kw)


def _segments(node) -> dict:
    segmentation = node.GetSegmentation()
    out = {}
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        out[segmentation.GetSegment(sid).GetName()] = sid
    return out


def test_volume_geometry_and_write_volume_roundtrip(case):
    geometry = scene.volume_geometry(case["volume"])
    assert geometry.same_grid(case["geometry"])
    path = scene.write_volume(case["volume"], case["tmp"] / "input.nrrd")
    array, read_geometry = read_image(path)
    assert read_geometry.same_grid(case["geometry"])
    np.testing.assert_array_equal(array, case["ct"])
    with pytest.raises(OutputExistsError):
        scene.write_volume(case["volume"], path)


def test_segment_names_colours_terminology_and_display(case):
    node = _load(case)
    segs = _segments(node)
    assert list(segs) == list(labels.STRUCTURES) + [labels.ROI]
    display = node.GetDisplayNode()
    for name, sid in segs.items():
        segment = node.GetSegmentation().GetSegment(sid)
        np.testing.assert_allclose(segment.GetColor(), labels.info(name).color, atol=1e-6)
        tag = segment.GetTerminology() if hasattr(segment, "GetTerminology") else None
        if tag is None:
            import vtk
            ref = vtk.reference("")
            assert segment.GetTag("TerminologyEntry", ref)
            tag = str(ref)
        assert tag == labels.terminology_string(name, "left")
        if not labels.is_roi(name):
            assert "7771000" in tag  # laterality: Left
            assert display.GetSegmentVisibility(sid) and display.GetSegmentVisibility3D(sid)
    # ROI: outline only in 2D, hidden in 3D
    roi_id = segs[labels.ROI]
    assert scene.roi_segment_id(node) == roi_id
    assert display.GetSegmentOpacity2DFill(roi_id) == 0.0
    assert display.GetSegmentVisibility2DOutline(roi_id)
    assert display.GetSegmentOpacity2DOutline(roi_id) == 1.0
    assert not display.GetSegmentVisibility3D(roi_id)
    assert display.GetSegmentVisibility(roi_id)
    scene.set_roi_visible(node, False)
    assert not display.GetSegmentVisibility(roi_id)
    assert display.GetSegmentVisibility(segs[labels.PAROTID])  # other segments untouched
    scene.set_roi_visible(node, True)
    assert display.GetSegmentVisibility(roi_id) and not display.GetSegmentVisibility3D(roi_id)
    # closed surfaces for 3D, binary labelmap stays the source
    assert node.GetSegmentation().ContainsRepresentation(scene.CLOSED_SURFACE)
    surface = node.GetSegmentation().GetSegment(segs[labels.PAROTID]).GetRepresentation(scene.CLOSED_SURFACE)
    assert surface.GetNumberOfPoints() > 0
    # attributes
    assert node.GetAttribute(scene.ATTR_SIDE) == "left"
    assert scene.report_of(node)["model"]["id"] == "parotid-oar-test"


def test_show_roi_off_at_load(case):
    node = _load(case, show_roi=False, closed_surface=False)
    roi_id = scene.roi_segment_id(node)
    assert not node.GetDisplayNode().GetSegmentVisibility(roi_id)
    assert node.GetDisplayNode().GetSegmentOpacity2DFill(roi_id) == 0.0


def test_geometry_matches_oblique_volume(case):
    import vtk

    slicer = scene._mrml()
    node = _load(case, closed_surface=False)
    # reference geometry parameter == the volume's grid (direction, spacing, origin, extent)
    ref_string = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    ref_image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(ref_string, ref_image)
    volume_m = vtk.vtkMatrix4x4()
    case["volume"].GetIJKToRASMatrix(volume_m)
    ref_m = vtk.vtkMatrix4x4()
    ref_image.GetImageToWorldMatrix(ref_m)
    np.testing.assert_allclose(scene._matrix_to_numpy(ref_m), scene._matrix_to_numpy(volume_m), atol=1e-6)
    assert not np.allclose(scene._matrix_to_numpy(volume_m)[:3, :3] / [0.9, 1.1, 2.0], np.diag([-1, -1, 1]))
    ni, nj, nk = case["geometry"].size
    assert tuple(ref_image.GetExtent()) == (0, ni - 1, 0, nj - 1, 0, nk - 1)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is case["volume"]
    # every segment lands on exactly the voxels it was written to
    arrays = scene.segment_arrays(node, case["volume"])
    for name, mask in case["masks"].items():
        np.testing.assert_array_equal(arrays[name], mask, err_msg=name)
    # and at the right physical place: voxel centres through the volume's IJK->RAS == LPS with x, y negated
    idx = np.argwhere(arrays[labels.PAROTID])[:, ::-1].astype(float)  # (i, j, k)
    ras = idx @ scene._matrix_to_numpy(volume_m)[:3, :3].T + scene._matrix_to_numpy(volume_m)[:3, 3]
    lps = case["geometry"].index_to_lps(np.argwhere(case["masks"][labels.PAROTID])[:, ::-1])
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)


def _mask_ras_bounds(mask: np.ndarray, volume) -> list[float]:
    """RAS bounds of a mask's voxel corners on a volume grid."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    m = scene._matrix_to_numpy(m)
    idx = np.argwhere(mask)[:, ::-1]
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ras = (corners @ m.T)[:, :3]
    return [v for axis in range(3) for v in (ras[:, axis].min(), ras[:, axis].max())]


def test_crop_box_roi_contains_roi_segment(case):
    node = _load(case, closed_surface=False)
    box = node.GetNodeReference(scene.CROP_BOX_ROLE)
    assert box is not None and box.IsA("vtkMRMLMarkupsROINode")
    assert box.GetLocked()
    box_bounds = [0.0] * 6
    box.GetRASBounds(box_bounds)
    roi_mask = scene.segment_arrays(node, case["volume"], names=[labels.ROI])[labels.ROI]
    assert roi_mask.sum() == case["masks"][labels.ROI].sum()
    roi_bounds = _mask_ras_bounds(roi_mask, case["volume"])
    for axis in range(3):
        assert box_bounds[2 * axis] <= roi_bounds[2 * axis] + 1e-6
        assert box_bounds[2 * axis + 1] >= roi_bounds[2 * axis + 1] - 1e-6
    # and it is the report's LPS box converted to RAS, not a mirrored one
    lo, hi = np.array(case["report"]["crop_box_lps"]["min"]), np.array(case["report"]["crop_box_lps"]["max"])
    np.testing.assert_allclose(box_bounds[4:6], [lo[2], hi[2]], atol=1e-6)
    np.testing.assert_allclose(box_bounds[0:2], [-hi[0], -lo[0]], atol=1e-6)
    # re-running reuses the same box node
    n_boxes = case["mrml"].scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")
    _load(case, segmentation_node=node, closed_surface=False)
    assert case["mrml"].scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == n_boxes


def test_placed_under_volume_study(case):
    slicer = scene._mrml()
    mrml_scene = case["mrml"].scene
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "CT study")
    volume_item = sh.GetItemByDataNode(case["volume"]) or sh.CreateItem(study, case["volume"])
    sh.SetItemParent(volume_item, study)
    node = _load(case, closed_surface=False)
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    box = node.GetNodeReference(scene.CROP_BOX_ROLE)
    assert sh.GetItemParent(sh.GetItemByDataNode(box)) == study


def test_edited_segmentation_is_not_overwritten(case):
    from vtk.util import numpy_support

    node = _load(case, closed_surface=False)
    assert not scene.has_user_edits(node)
    _load(case, segmentation_node=node, closed_surface=False)  # unedited: a re-run may replace it
    # the user paints one voxel of the parotid
    sid = _segments(node)[labels.PAROTID]
    segment = node.GetSegmentation().GetSegment(sid)
    image = segment.GetRepresentation(scene.BINARY_LABELMAP)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    empty = np.flatnonzero(values == 0)[0]
    values[empty] = segment.GetLabelValue()
    image.Modified()
    assert scene.has_user_edits(node)
    edited_hash = scene.segment_content_hash(node)
    with pytest.raises(OutputExistsError, match="edited"):
        _load(case, segmentation_node=node)
    assert scene.segment_content_hash(node) == edited_hash  # untouched
    # with force it is replaced by the result again
    _load(case, segmentation_node=node, force=True, closed_surface=False)
    assert not scene.has_user_edits(node)
    assert scene.segment_content_hash(node) != edited_hash


def test_foreign_segmentation_is_not_overwritten(case):
    mrml_scene = case["mrml"].scene
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual contours")
    node.GetSegmentation().AddEmptySegment("my_gtv", "GTV")
    with pytest.raises(OutputExistsError, match="did not create"):
        _load(case, segmentation_node=node)
    assert list(_segments(node)) == ["GTV"]
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    assert not scene.has_user_edits(empty)
    _load(case, segmentation_node=empty, closed_surface=False)
    assert len(_segments(empty)) == 8


def test_hash_ignores_extent_padding(case):
    """Slicer re-cropping a labelmap's extent (same voxels) is not a user edit; a changed voxel is."""
    import vtk
    from vtk.util import numpy_support

    slicer = scene._mrml()
    node = _load(case, closed_surface=False)
    before = scene.segment_content_hash(node)
    sid = _segments(node)[labels.EAC]
    segment = node.GetSegmentation().GetSegment(sid)
    mask, corner = scene._segment_mask_extent(node, sid)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1  # (k, j, i)
    crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.uint8)
    cropped = slicer.vtkOrientedImageData()
    start = (corner[0] + lo[2], corner[1] + lo[1], corner[2] + lo[0])
    cropped.SetExtent(start[0], start[0] + crop.shape[2] - 1, start[1], start[1] + crop.shape[1] - 1,
                      start[2], start[2] + crop.shape[0] - 1)
    cropped.GetPointData().SetScalars(numpy_support.numpy_to_vtk(crop.ravel(), deep=True,
                                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    m = vtk.vtkMatrix4x4()
    segment.GetRepresentation(scene.BINARY_LABELMAP).GetImageToWorldMatrix(m)
    cropped.SetImageToWorldMatrix(m)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        cropped, node, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    new_extent = node.GetSegmentation().GetSegment(sid).GetRepresentation(scene.BINARY_LABELMAP).GetExtent()
    assert scene.segment_content_hash(node) == before, new_extent
    assert not scene.has_user_edits(node)
    crop[0, 0, 0] = 1 - crop[0, 0, 0]  # now one voxel really changes
    cropped.GetPointData().SetScalars(numpy_support.numpy_to_vtk(crop.ravel(), deep=True,
                                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        cropped, node, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    assert scene.has_user_edits(node)


def test_summary_rows(case):
    rows = dict(scene.summary_rows(case["report"]))
    assert rows["Model"] == "parotid-oar-test 0.0.1"
    assert rows["Device"] == "cpu"
    assert rows["Time: stage 1"] == "1.2 s" or rows["Time: stage 1"] == "1.3 s"
    assert rows["Time: stage 2"] == "2.5 s"
    expected = case["masks"][labels.PAROTID].sum() * case["geometry"].voxel_volume_cc
    assert rows["Volume: Parotid"] == f"{expected:.2f} cc"
    assert rows["Volume: ROI"] == "12.50 cc"
    assert scene.summary_rows(None) == []
    json.dumps(scene.summary_rows(case["report"]))  # plain data


# ---------------------------------------------------------------------------- segment_arrays (issue 14, defect 1)
def _ball_segmentation(mrml_scene, source: str, center_ras, radius: float, with_surface: bool = True):
    """A reference segmentation the way other tools make them: a closed-surface source (e.g. a model import),
    or SlicerRT's RTSTRUCT import (source "Planar contour", closed surface derived from it)."""
    import slicer
    import vtk

    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*center_ras)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"reference ({source})")
    node.GetSegmentation().SetSourceRepresentationName(source)
    segment = slicer.vtkSegment()
    segment.SetName("Ball")
    if source == scene.PLANAR_CONTOUR:
        contours = vtk.vtkCutter()  # axial contours of the sphere, as stored in an RTSTRUCT
        plane = vtk.vtkPlane()
        plane.SetNormal(0.0, 0.0, 1.0)
        plane.SetOrigin(*center_ras)
        contours.SetCutFunction(plane)
        contours.GenerateValues(7, -radius * 0.9, radius * 0.9)
        contours.SetInputData(sphere.GetOutput())
        contours.Update()
        segment.AddRepresentation(scene.PLANAR_CONTOUR, contours.GetOutput())
    if with_surface or source == scene.CLOSED_SURFACE:
        segment.AddRepresentation(scene.CLOSED_SURFACE, sphere.GetOutput())
    node.GetSegmentation().AddSegment(segment, "Ball")
    return node


def _ball_truth(volume, center_ras, radius):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    dims = volume.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(*(np.arange(n) for n in dims[::-1]), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4)
    ras = (ijk @ ijk_to_ras.T)[:, :3]
    return (np.linalg.norm(ras - np.asarray(center_ras), axis=1) <= radius).reshape(dims[::-1])


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("source", [scene.CLOSED_SURFACE, scene.PLANAR_CONTOUR])
def test_segment_arrays_converts_non_labelmap_references(case, source):
    """A reference whose source is a closed surface, or SlicerRT's planar contours (RTSTRUCT import), used to give
    all-zero masks (Review tab: DSC 0). It is converted now, on a copy: the user's node gains no representation."""
    volume = case["volume"]
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    center = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    node = _ball_segmentation(case["mrml"].scene, source, center, 9.0)
    mask = scene.segment_arrays(node, volume)["Ball"]
    truth = _ball_truth(volume, center, 9.0)
    assert truth.sum() > 300
    assert _dice(mask, truth) > 0.9, (mask.sum(), truth.sum())
    assert not node.GetSegmentation().ContainsRepresentation(scene.BINARY_LABELMAP)  # the user's node untouched


def test_segment_arrays_refuses_what_it_cannot_convert(case):
    """Planar contours alone need SlicerRT's converter; without it the result must be an error, never empty masks."""
    from ParotidOARLib.errors import GeometryError

    node = _ball_segmentation(case["mrml"].scene, scene.PLANAR_CONTOUR, [0.0, 0.0, 0.0], 9.0, with_surface=False)
    with pytest.raises(GeometryError, match="SlicerRT"):
        scene.segment_arrays(node, case["volume"])


def test_segment_arrays_honours_parent_transforms(case):
    """A transformed segmentation is compared where it is shown: through its parent transform (and the volume's)."""
    import vtk

    mrml_scene, volume, masks = case["mrml"].scene, case["volume"], case["masks"]
    node = _load(case)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    step = np.array([m.GetElement(r, 0) for r in range(3)])  # one voxel along i, in RAS
    shift = vtk.vtkMatrix4x4()
    for r in range(3):
        shift.SetElement(r, 3, 3.0 * step[r])
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift 3 voxels")
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    got = scene.segment_arrays(node, volume, names=[labels.PAROTID])[labels.PAROTID]
    expected = np.zeros_like(masks[labels.PAROTID])
    expected[:, :, 3:] = masks[labels.PAROTID][:, :, :-3]
    assert np.array_equal(got, expected)
    # the volume under the same transform: the two line up again
    volume.SetAndObserveTransformNodeID(transform.GetID())
    got = scene.segment_arrays(node, volume, names=[labels.PAROTID])[labels.PAROTID]
    assert np.array_equal(got, masks[labels.PAROTID])
