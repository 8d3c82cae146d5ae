"""``.seg.nrrd`` I/O: the slicerio round trip, and loading the phantom's files into a real
slicer-core MRML scene (segment names, colours, terminology, geometry matching ct.nrrd)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ParotidOARLib import imageio, phantom, segio
from ParotidOARLib import labels as L
from ParotidOARLib.errors import InputError, OutputExistsError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_geometry():
    a, b = math.radians(20), math.radians(-12)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return imageio.Geometry((23, 19, 11), (0.6, 0.85, 2.5), (-31.5, 12.25, -80.0), (rz @ rx).ravel())


def _masks(shape, seed=0):
    rng = np.random.default_rng(seed)
    masks = {}
    for n, name in enumerate(L.STRUCTURES):
        m = np.zeros(shape, dtype=bool)
        lo = rng.integers(0, [s - 4 for s in shape])
        m[lo[0]:lo[0] + 3, lo[1]:lo[1] + 4, lo[2]:lo[2] + 3] = True
        m &= rng.random(shape) < 0.8
        m[lo[0], lo[1], lo[2]] = True
        masks[name] = m
    roi = np.zeros(shape, dtype=bool)
    roi[1:-1, 2:-2, 3:-3] = True  # overlaps several structures: needs extra layers
    masks[L.ROI] = roi
    return masks


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    (folder,) = phantom.generate(out, cases=1, seed=31, side="right", size="small")
    return folder


def test_roundtrip_through_slicerio(tmp_path):
    import nrrd
    import slicerio

    geom = _oblique_geometry()
    masks = _masks(geom.shape)
    path = segio.write_seg(tmp_path / "x.seg.nrrd", masks, geom, side="right", extra_header={"ParotidOAR_Model": "m1"})
    read, rgeom, segments = segio.read_seg(path)
    assert list(read) == list(masks)
    for name, m in masks.items():
        assert np.array_equal(read[name], m), name
    assert rgeom.size == geom.size
    assert np.allclose(rgeom.spacing, geom.spacing) and np.allclose(rgeom.origin, geom.origin)
    assert np.allclose(rgeom.direction_matrix, geom.direction_matrix, atol=1e-9)
    assert np.allclose(rgeom.ijk_to_lps, geom.ijk_to_lps)
    by_name = {s["name"]: s for s in segments}
    for name in masks:
        assert by_name[name]["color"] == pytest.approx(list(L.info(name).color))
        assert by_name[name]["terminology"]["type"] == list(L.info(name).type_code)
    assert by_name[L.PAROTID]["terminology"]["typeModifier"] == list(L.RIGHT)
    assert "typeModifier" not in by_name[L.ROI]["terminology"]
    # the raw NRRD header carries Slicer's tag strings
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["ParotidOAR_Model"] == "m1"
    for i, name in enumerate(masks):
        assert header[f"Segment{i}_Name"] == name
        assert f"TerminologyEntry:{L.terminology_string(name, 'right')}|" in header[f"Segment{i}_Tags"]
        assert [float(v) for v in header[f"Segment{i}_Color"].split()] == pytest.approx(L.info(name).color)
    assert segio.reference_geometry_string(geom) in header["Segmentation_ConversionParameters"]
    # slicerio reads our ijk->LPS directly
    seg = slicerio.read_segmentation(str(path))
    assert np.allclose(seg["ijkToLPS"], geom.ijk_to_lps)


def test_two_layer_packing_matches_numpys_stack_and_extents(tmp_path):
    """The cascade's case, disjoint structures plus an ROI over them (two layers): the fast byte interleave
    writes exactly np.stack's layers, every segment's extent is its bounding box, and the file reads back."""
    geom = _oblique_geometry()
    k, j, i = geom.shape
    masks = {}
    for n, name in enumerate(L.STRUCTURES):  # disjoint boxes, one per structure, on different slices
        m = np.zeros(geom.shape, bool)
        m[n + 1, 2 + n:5 + n, 3:3 + n + 2] = True
        masks[name] = m
    roi = np.zeros(geom.shape, bool)
    roi[1:-1, 1:-1, 1:-1] = True
    masks[L.ROI] = roi
    voxels, segments = segio._pack_layers(masks, geom, "left")
    assert voxels.shape == (2, i, j, k)
    layers = [np.asarray(voxels[n]).transpose(2, 1, 0) for n in range(2)]
    assert np.array_equal(segio._interleave(layers), np.stack(layers, axis=-1))
    three = layers + [layers[0][::-1].copy()]
    assert np.array_equal(segio._interleave(three), np.stack(three, axis=-1))
    for seg, (name, m) in zip(segments, masks.items()):
        kk, jj, ii = np.nonzero(m)
        assert seg["extent"] == [ii.min(), ii.max(), jj.min(), jj.max(), kk.min(), kk.max()], name
        assert np.array_equal(layers[seg["layer"]] == seg["labelValue"], m), name
    read, _g, _s = segio.read_seg(segio.write_seg(tmp_path / "two.seg.nrrd", masks, geom, side="left"))
    assert all(np.array_equal(read[n], m) for n, m in masks.items())


def test_write_refuses_to_overwrite_and_checks_shapes(tmp_path):
    geom = _oblique_geometry()
    masks = _masks(geom.shape)
    path = segio.write_seg(tmp_path / "x.seg.nrrd", masks, geom)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        segio.write_seg(path, masks, geom)
    assert path.read_bytes() == before
    with pytest.raises(InputError):
        segio.write_seg(tmp_path / "y.seg.nrrd", {"Parotid": np.zeros((2, 2, 2), bool)}, geom)
    assert not (tmp_path / "y.seg.nrrd").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.seg.nrrd"]  # no temp files left


def _vtk_matrix(m):
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _load_segmentation(mrml, path):
    import slicer

    node = slicer.vtkMRMLSegmentationNode()
    mrml.scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    mrml.scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def _segment_array(segment, label_value):
    """(bool array [k, j, i], image-to-world 4x4, extent) of a segment's binary labelmap."""
    import vtk
    from vtk.util import numpy_support

    image = segment.GetRepresentation("Binary labelmap")
    ext = image.GetExtent()
    dims = [ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1]
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    arr = scalars.reshape(dims[2], dims[1], dims[0]) == label_value
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return arr, _vtk_matrix(m), ext


def test_phantom_loads_into_mrml_scene(mrml, phantom_case):
    import slicer

    node = _load_segmentation(mrml, phantom_case / "reference.seg.nrrd")
    seg = node.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == list(L.STRUCTURES) + [L.ROI]

    # ct.nrrd through Slicer's own volume reader
    volume = slicer.vtkMRMLScalarVolumeNode()
    mrml.scene.AddNode(volume)
    vstorage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    mrml.scene.AddNode(vstorage)
    vstorage.SetFileName(str(phantom_case / "ct.nrrd"))
    assert vstorage.ReadData(volume) == 1
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ct_ijk_to_ras = _vtk_matrix(m)
    ct, geom = imageio.read_image(phantom_case / "ct.nrrd")
    assert np.allclose(ct_ijk_to_ras, LPS_TO_RAS @ geom.ijk_to_lps, atol=1e-4)
    assert volume.GetImageData().GetDimensions() == geom.size
    assert volume.GetImageData().GetScalarTypeAsString() == "short"

    masks, _, _ = segio.read_seg(phantom_case / "reference.seg.nrrd")
    for i, name in enumerate(names):
        segment = seg.GetNthSegment(i)
        assert segment.GetColor() == pytest.approx(L.info(name).color, abs=1e-6)
        entry = segment.GetTerminology() if hasattr(segment, "GetTerminology") else None
        assert entry == L.terminology_string(name, "right")
        arr, image_to_world, ext = _segment_array(segment, segment.GetLabelValue())
        # the labelmap lies on the CT grid: same ijk->RAS, extent inside the CT's
        assert np.allclose(image_to_world, ct_ijk_to_ras, atol=1e-4), name
        assert ext[0] >= 0 and ext[2] >= 0 and ext[4] >= 0
        assert ext[1] < geom.size[0] and ext[3] < geom.size[1] and ext[5] < geom.size[2]
        expected = masks[name][ext[4]:ext[5] + 1, ext[2]:ext[3] + 1, ext[0]:ext[1] + 1]
        assert arr.sum() == masks[name].sum() > 0, name
        assert np.array_equal(arr, expected), name


def test_phantom_full_labels_load_into_mrml(mrml, phantom_case):
    node = _load_segmentation(mrml, phantom_case / "reference-full.seg.nrrd")
    seg = node.GetSegmentation()
    full, _, _ = segio.read_seg(phantom_case / "reference-full.seg.nrrd")
    clipped, _, _ = segio.read_seg(phantom_case / "reference.seg.nrrd")
    skin = seg.GetNthSegment(list(full).index(L.SKIN))
    arr, _, _ = _segment_array(skin, skin.GetLabelValue())
    assert arr.sum() == full[L.SKIN].sum() > clipped[L.SKIN].sum()
