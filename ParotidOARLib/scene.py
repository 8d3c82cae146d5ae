"""MRML glue: everything ParotidOAR does to Slicer scene nodes.

Every function takes the ``scene`` (a ``vtkMRMLScene``) or a node as its first
argument and never touches ``slicer.mrmlScene``, ``slicer.modules`` or
``slicer.app``, so the same code runs inside Slicer and, in the tests, against
the PyPI ``slicer-core`` wheel. Only classes present in both are used
(``vtkMRML*``, ``vtkSegmentation*``, ``vtkOrientedImageData*``,
``vtkSlicerSegmentationsModuleLogic``). ``slicer`` and ``vtk`` are imported
inside functions: this module can be imported without Slicer.

Public functions
----------------
* :func:`volume_geometry` — a volume node's grid as an LPS :class:`Geometry`.
* :func:`add_volume` — numpy ``[k, j, i]`` + Geometry → new scalar volume node.
* :func:`write_volume` — write a volume node to NRRD/NIfTI (atomic; no node added).
* :func:`load_result` — import a cascade ``.seg.nrrd`` into a new or existing
  segmentation node, with reference geometry, names/colours/terminology, the
  outline-only ROI segment, closed surfaces, subject-hierarchy placement and
  the locked crop-box ROI. Refuses to replace a user-edited segmentation
  unless ``force``.
* :func:`check_can_write` / :func:`has_user_edits` / :func:`segment_content_hash`
  — the "never overwrite user edits" guard.
* :func:`made_for_other_volume` / :func:`input_volume_of` — a result belongs to the CT
  it was computed from (node reference ``ParotidOARInputVolume``).
* :func:`set_roi_visible`, :func:`roi_segment_id` — the Show ROI toggle.
* :func:`set_crop_box` — the locked ``vtkMRMLMarkupsROINode`` of the stage-2 crop.
* :func:`place_in_study` — parent a node under the volume's study item.
* :func:`segment_arrays` — segments resampled onto a volume's grid as numpy masks (any source
  representation, parent transforms honoured).
* :func:`summary_rows` / :func:`report_of` — the widget's summary table, as data.

Node attributes written by ParotidOAR (all prefixed ``ParotidOAR.``):
``ContentHash`` (segment content when the result was loaded), ``Report``
(the cascade report as JSON), ``Side``, ``RoiSegmentID``, ``Model``, ``InputVolumeID``
(with the node reference ``ParotidOARInputVolume``: the CT the result was computed from).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import labels
from .errors import GeometryError, InputError, OutputExistsError
from .imageio import Geometry, atomic_file

ATTR_HASH = "ParotidOAR.ContentHash"
ATTR_REPORT = "ParotidOAR.Report"
ATTR_SIDE = "ParotidOAR.Side"
ATTR_ROI_ID = "ParotidOAR.RoiSegmentID"
ATTR_MODEL = "ParotidOAR.Model"
CROP_BOX_ROLE = "ParotidOARCropBox"
INPUT_VOLUME_ROLE = "ParotidOARInputVolume"  # node reference: the CT a result was computed from
ATTR_INPUT_VOLUME = "ParotidOAR.InputVolumeID"  # the same, as an attribute: it outlives the CT's removal
CROP_BOX_NAME = "ParotidOAR stage-2 crop box"
BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"
PLANAR_CONTOUR = "Planar contour"  # SlicerRT's RTSTRUCT import

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS (its own inverse)


def _mrml():
    """The ``slicer`` module (Slicer app or slicer-core), imported lazily."""
    import slicer

    return slicer


def _matrix_to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_matrix(array):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


# --------------------------------------------------------------------------- volumes
def volume_geometry(volume_node) -> Geometry:
    """The grid of a scalar volume node as an LPS :class:`Geometry`."""
    import vtk

    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError("The input volume has no image data. Load a CT volume first.")
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_lps = _LPS_RAS @ _matrix_to_numpy(m)
    linear = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    return Geometry(image.GetDimensions(), spacing, ijk_to_lps[:3, 3], direction.ravel())


def add_volume(scene, array: np.ndarray, geometry: Geometry, name: str = "CT"):
    """Add a ``vtkMRMLScalarVolumeNode`` holding ``array`` (``[k, j, i]``) on ``geometry``."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.shape != geometry.shape:
        raise GeometryError(f"Array shape {array.shape} does not match geometry shape {geometry.shape}.")
    image = vtk.vtkImageData()
    image.SetDimensions(*geometry.size)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(_LPS_RAS @ geometry.ijk_to_lps))
    node.SetAndObserveImageData(image)
    return node


def write_volume(volume_node, path, force: bool = False, compress: bool = False) -> Path:
    """Write a volume node to ``path`` (NRRD/NIfTI/MHA by suffix) atomically.

    Uses a stand-alone ``vtkMRMLVolumeArchetypeStorageNode`` (not added to the
    scene), so the volume keeps its own storage node and the scene is unchanged.
    """
    slicer = _mrml()
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass force=True to replace it.")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    # published without replacing a file that appeared meanwhile unless force (imageio.publish)
    with atomic_file(path, suffix, force=force) as tmp:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(tmp))
        storage.SetUseCompression(1 if compress else 0)  # uncompressed: a temp file, written fast
        if not storage.WriteData(volume_node):
            raise InputError(f"Could not write the volume {volume_node.GetName()!r} to {path}.")
    return path


# --------------------------------------------------------------------------- segments
def _segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _segment_mask_extent(segmentation_node, segment_id):
    """(mask [k, j, i] bool over the labelmap extent, extent lower corner (i, j, k)) or None."""
    from vtk.util import numpy_support

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    image = segment.GetRepresentation(BINARY_LABELMAP)
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return None
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros((0, 0, 0), dtype=bool), (0, 0, 0)
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims)
    return values == segment.GetLabelValue(), (extent[0], extent[2], extent[4])


def segment_content_hash(segmentation_node) -> str:
    """SHA-1 over segment names, colours-independent voxel content and order.

    Invariant to labelmap extent padding/cropping (only the set voxels, in
    absolute IJK of the labelmap grid, count), so Slicer re-cropping a
    labelmap is not mistaken for an edit; any painted/erased voxel, added,
    removed or renamed segment changes it.
    """
    h = hashlib.sha1()
    for segment_id in _segment_ids(segmentation_node):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        h.update(b"\0segment\0" + segment.GetName().encode("utf-8"))
        found = _segment_mask_extent(segmentation_node, segment_id)
        if found is None:
            h.update(b"no-labelmap")
            continue
        mask, corner = found
        if not mask.any():
            h.update(b"empty")
            continue
        nz = [np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
        lo = [int(a[0]) for a in nz]
        hi = [int(a[-1]) + 1 for a in nz]
        crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        origin_ijk = (corner[0] + lo[2], corner[1] + lo[1], corner[2] + lo[0])
        h.update(repr((origin_ijk, crop.shape)).encode())
        h.update(np.packbits(crop).tobytes())
    return h.hexdigest()


def has_user_edits(segmentation_node) -> bool:
    """True if the node holds segments that ParotidOAR did not produce as they are now.

    An empty node is free to use. A node with segments but no
    ``ParotidOAR.ContentHash`` attribute was made by someone else; a node
    whose current content hash differs from the stored one has been edited.
    """
    if segmentation_node is None or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return False
    stored = segmentation_node.GetAttribute(ATTR_HASH)
    if not stored:
        return True
    return stored != segment_content_hash(segmentation_node)


def input_volume_of(segmentation_node):
    """The volume node a ParotidOAR result was computed from (a saved node reference), or None."""
    if segmentation_node is None:
        return None
    return segmentation_node.GetNodeReference(INPUT_VOLUME_ROLE)


def made_for_other_volume(segmentation_node, volume_node) -> bool:
    """True if ``segmentation_node`` holds a ParotidOAR result computed from a volume other than ``volume_node``
    (e.g. the previous patient's CT): writing the new result into it would overwrite that patient's result."""
    if segmentation_node is None or volume_node is None:
        return False
    source = input_volume_of(segmentation_node)
    if source is not None:
        return source.GetID() != volume_node.GetID()
    # a result whose CT was removed from the scene (MRML drops the reference then; the attribute stays)
    return bool(segmentation_node.GetAttribute(ATTR_INPUT_VOLUME))


def check_can_write(segmentation_node, force: bool = False) -> None:
    """Raise :class:`OutputExistsError` if writing would destroy user edits (and not ``force``)."""
    if force or segmentation_node is None or not has_user_edits(segmentation_node):
        return
    name = segmentation_node.GetName()
    if segmentation_node.GetAttribute(ATTR_HASH):
        what = "has been edited since ParotidOAR created it"
    else:
        what = "holds segments that ParotidOAR did not create"
    raise OutputExistsError(
        f"The segmentation {name!r} {what}. Choose 'Create new' as output, or confirm overwriting "
        "(force=True) to replace its segments.")


def roi_segment_id(segmentation_node) -> str | None:
    """ID of the ``ROI (parotid + N mm)`` segment, or None."""
    if segmentation_node is None:
        return None
    stored = segmentation_node.GetAttribute(ATTR_ROI_ID)
    segmentation = segmentation_node.GetSegmentation()
    if stored and segmentation.GetSegment(stored) is not None:
        return stored
    for segment_id in _segment_ids(segmentation_node):
        if labels.is_roi(segmentation.GetSegment(segment_id).GetName()):
            return segment_id
    return None


def set_roi_visible(segmentation_node, visible: bool) -> bool:
    """Show or hide the ROI segment (2D outline only, never in 3D). Returns False if there is none."""
    segment_id = roi_segment_id(segmentation_node)
    display = segmentation_node.GetDisplayNode() if segmentation_node is not None else None
    if segment_id is None or display is None:
        return False
    display.SetSegmentVisibility(segment_id, bool(visible))
    display.SetSegmentVisibility2DFill(segment_id, False)
    display.SetSegmentOpacity2DFill(segment_id, 0.0)
    display.SetSegmentVisibility2DOutline(segment_id, True)
    display.SetSegmentOpacity2DOutline(segment_id, 1.0)
    display.SetSegmentVisibility3D(segment_id, False)
    return True


def _set_terminology(segment, name: str, side: str | None) -> None:
    try:
        tag = labels.terminology_string(name, side)
    except KeyError:
        return  # a user's structure keeps its own terminology
    if hasattr(segment, "SetTerminology"):  # Slicer >= 5.7
        segment.SetTerminology(tag)
    else:
        segment.SetTag("TerminologyEntry", tag)


def _style_segments(segmentation_node, side: str | None, show_roi: bool) -> None:
    segmentation = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    for segment_id in _segment_ids(segmentation_node):
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        try:
            segment.SetColor(*labels.info(name).color)
        except KeyError:
            pass
        _set_terminology(segment, name, side)
        if display is not None and not labels.is_roi(name):
            display.SetSegmentVisibility(segment_id, True)
            display.SetSegmentVisibility3D(segment_id, True)
    roi_id = roi_segment_id(segmentation_node)
    if roi_id is not None:
        segmentation_node.SetAttribute(ATTR_ROI_ID, roi_id)
        set_roi_visible(segmentation_node, show_roi)


# --------------------------------------------------------------------------- hierarchy
def place_in_study(scene, node, volume_node) -> int:
    """Parent ``node``'s subject-hierarchy item under the volume's parent (its study).

    Returns the node's item ID. If the volume is not under a study/patient,
    the node is placed next to the volume (same parent).
    """
    slicer = _mrml()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    scene_item = sh.GetSceneItemID()
    parent = scene_item
    if volume_node is not None:
        volume_item = sh.GetItemByDataNode(volume_node)
        if volume_item:
            study = sh.GetItemAncestorAtLevel(volume_item, "Study") if hasattr(sh, "GetItemAncestorAtLevel") else 0
            parent = study or sh.GetItemParent(volume_item) or scene_item
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent, node)
    elif sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)
    return item


# --------------------------------------------------------------------------- crop box
def crop_box_ras(crop_box_lps: dict) -> tuple[np.ndarray, np.ndarray]:
    """LPS ``{"min": [x,y,z], "max": [x,y,z]}`` → RAS (min corner, max corner)."""
    lo = np.asarray(crop_box_lps["min"], dtype=float)
    hi = np.asarray(crop_box_lps["max"], dtype=float)
    if lo.shape != (3,) or hi.shape != (3,):
        raise InputError(f"crop_box_lps must have 3-element 'min' and 'max', got {crop_box_lps!r}.")
    corners = np.stack([lo, hi]) * np.array([-1.0, -1.0, 1.0])
    return corners.min(axis=0), corners.max(axis=0)


def set_crop_box(scene, segmentation_node, crop_box_lps: dict, volume_node=None):
    """Create/update the locked ``vtkMRMLMarkupsROINode`` showing the stage-2 crop (LPS box)."""
    lo, hi = crop_box_ras(crop_box_lps)
    roi = segmentation_node.GetNodeReference(CROP_BOX_ROLE) if segmentation_node is not None else None
    if roi is None:
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", CROP_BOX_NAME)
        roi.CreateDefaultDisplayNodes()
        if segmentation_node is not None:
            segmentation_node.SetNodeReferenceID(CROP_BOX_ROLE, roi.GetID())
    roi.SetLocked(False)
    center = (lo + hi) / 2.0
    if hasattr(roi, "SetCenter"):
        roi.SetCenter(*center)
    else:  # Slicer < 5.4
        roi.SetXYZ(*center)
    roi.SetRadiusXYZ(*((hi - lo) / 2.0))
    roi.SetLocked(True)
    roi.SetDescription("Stage-2 crop of ParotidOAR (read only): the box the OAR network saw.")
    display = roi.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(1.0, 1.0, 0.0)
        display.SetColor(1.0, 1.0, 0.0)
        display.SetFillOpacity(0.0)
        if hasattr(display, "SetHandlesInteractive"):
            display.SetHandlesInteractive(False)
    if volume_node is not None:
        place_in_study(scene, roi, volume_node)
    return roi


# --------------------------------------------------------------------------- loading
def _read_seg_node(seg_path):
    """Read a ``.seg.nrrd`` into a stand-alone segmentation node (not in any scene)."""
    slicer = _mrml()
    seg_path = Path(seg_path)
    if not seg_path.exists():
        raise InputError(f"Segmentation result not found: {seg_path}.")
    # a private scene, so the user's scene sees no temporary node (no undo/hierarchy noise)
    private_scene = slicer.vtkMRMLScene()
    node = private_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_path))
    if not storage.ReadData(node):
        raise InputError(f"Cannot read {seg_path} as a Slicer segmentation.")
    return node, private_scene


def load_result(scene, seg_path, volume_node, segmentation_node=None, *, report: dict | None = None,
                side: str | None = None, show_roi: bool = True, force: bool = False,
                closed_surface: bool = True, name: str | None = None):
    """Import a cascade result into ``segmentation_node`` (created when None) and return it.

    Checks first (nothing changes on error): the file is readable and an
    existing node has no user edits unless ``force``. Then replaces the
    node's segments, sets the reference geometry from ``volume_node``, names,
    colours and terminology, the outline-only ROI segment, the closed-surface
    representation, the subject-hierarchy placement, the crop-box ROI (from
    ``report["crop_box_lps"]``) and the ParotidOAR attributes.
    """
    check_can_write(segmentation_node, force)
    loaded, _private_scene = _read_seg_node(seg_path)  # keep the private scene alive while copying
    report = dict(report or {})
    side = side or report.get("side")
    if segmentation_node is None:
        base = volume_node.GetName() if volume_node is not None else "ParotidOAR"
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{base} OARs")
    was_modifying = segmentation_node.StartModify()
    try:
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        segmentation.DeepCopy(loaded.GetSegmentation())  # replaces all segments, keeps shared layers
        if volume_node is not None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        _style_segments(segmentation_node, side, show_roi)
    finally:
        segmentation_node.EndModify(was_modifying)
    if closed_surface:
        segmentation_node.CreateClosedSurfaceRepresentation()
        _style_segments(segmentation_node, side, show_roi)  # display properties of new representation
    if volume_node is not None:
        place_in_study(scene, segmentation_node, volume_node)
    if report.get("crop_box_lps"):
        set_crop_box(scene, segmentation_node, report["crop_box_lps"], volume_node)
    if side:
        segmentation_node.SetAttribute(ATTR_SIDE, str(side))
    if volume_node is not None:
        segmentation_node.SetNodeReferenceID(INPUT_VOLUME_ROLE, volume_node.GetID())
        segmentation_node.SetAttribute(ATTR_INPUT_VOLUME, volume_node.GetID())
    model = report.get("model") or {}
    if model:
        segmentation_node.SetAttribute(ATTR_MODEL, f"{model.get('id', '')} {model.get('version', '')}".strip())
    segmentation_node.SetAttribute(ATTR_REPORT, json.dumps(report, sort_keys=True))
    segmentation_node.SetAttribute(ATTR_HASH, segment_content_hash(segmentation_node))
    return segmentation_node


def report_of(segmentation_node) -> dict | None:
    """The cascade report stored on a ParotidOAR segmentation node (or None)."""
    text = segmentation_node.GetAttribute(ATTR_REPORT) if segmentation_node is not None else None
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- arrays
def _volume_reference_image(volume_node):
    """An empty ``vtkOrientedImageData`` with the volume's grid (its own IJK→RAS, before any parent transform)."""
    slicer = _mrml()
    import vtk

    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(volume_node.GetImageData().GetDimensions())
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    reference.SetImageToWorldMatrix(m)
    return reference


def _transform_to_volume(segmentation_node, volume_node):
    """The transform from the segmentation's coordinates to the volume's (None when both are untransformed)."""
    slicer = _mrml()
    import vtk

    seg_parent = segmentation_node.GetParentTransformNode()
    vol_parent = volume_node.GetParentTransformNode()
    if seg_parent is None and vol_parent is None:
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(seg_parent, vol_parent, transform)
    return transform


def _labelmap_copy(segmentation_node, segment_ids, reference, to_volume):
    """A private segmentation node holding ``segment_ids`` with a binary labelmap representation.

    The user's node is never changed. A segment whose source representation is
    not a labelmap (a closed surface, or SlicerRT's planar contours from an
    RTSTRUCT) is converted on the copy, on the volume's grid (expressed in the
    segmentation's coordinates when a transform lies between them). If the
    source cannot be converted here (no converter: e.g. planar contours without
    SlicerRT), any other representation the segment holds is tried as source.
    """
    slicer = _mrml()
    import vtk

    private_scene = slicer.vtkMRMLScene()
    copy = private_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation = copy.GetSegmentation()
    segmentation.DeepCopy(segmentation_node.GetSegmentation())
    for segment_id in list(_segment_ids(copy)):
        if segment_id not in segment_ids:
            segmentation.RemoveSegment(segment_id)
    if not segment_ids or segmentation.ContainsRepresentation(BINARY_LABELMAP):
        return copy, private_scene
    geometry = slicer.vtkOrientedImageData()
    geometry.DeepCopy(reference)
    if to_volume is not None:  # the volume grid in the segmentation's coordinates (geometry only)
        linear = vtk.vtkTransform()
        if slicer.vtkOrientedImageDataResample.IsTransformLinear(to_volume, linear):
            inverse = vtk.vtkTransform()
            inverse.DeepCopy(linear)
            inverse.Inverse()
            slicer.vtkOrientedImageDataResample.TransformOrientedImage(geometry, inverse, True)
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    source = segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName") \
        else segmentation.GetMasterRepresentationName()
    candidates = [source] + [name for name in (CLOSED_SURFACE, PLANAR_CONTOUR) if name != source]
    for candidate in candidates:
        if not all(segmentation.GetSegment(i).GetRepresentation(candidate) is not None for i in segment_ids):
            continue
        if candidate != source:
            if hasattr(segmentation, "SetSourceRepresentationName"):
                segmentation.SetSourceRepresentationName(candidate)
            else:  # Slicer < 5.4
                segmentation.SetMasterRepresentationName(candidate)
        if segmentation.CreateRepresentation(BINARY_LABELMAP) and all(
                _has_labelmap(segmentation.GetSegment(i)) for i in segment_ids):
            return copy, private_scene
    raise GeometryError(
        f"The segmentation {segmentation_node.GetName()!r} has no binary labelmap and its {source!r} "
        "representation cannot be converted to one here. Convert it in the Segmentations module "
        "(Representations: Binary labelmap > Create), or install SlicerRT for RTSTRUCT planar contours.")


def _has_labelmap(segment) -> bool:
    image = segment.GetRepresentation(BINARY_LABELMAP)
    return image is not None and image.GetPointData() is not None and image.GetPointData().GetScalars() is not None


def segment_arrays(segmentation_node, volume_node, names=None) -> dict[str, np.ndarray]:
    """``{segment name: bool mask [k, j, i]}`` on ``volume_node``'s grid (nearest neighbour).

    Works whatever the segmentation's source representation is (binary
    labelmap, closed surface, SlicerRT's planar contours: converted on a
    private copy, the user's node is not changed) and honours parent transforms
    of the segmentation and of the volume, as Slicer's
    ``ExportSegmentsToLabelmapNode`` does. Raises :class:`GeometryError` when a
    segment cannot be converted, instead of returning an empty mask.
    """
    slicer = _mrml()
    from vtk.util import numpy_support

    reference = _volume_reference_image(volume_node)
    to_volume = _transform_to_volume(segmentation_node, volume_node)
    shape = volume_geometry(volume_node).shape
    source_segmentation = segmentation_node.GetSegmentation()
    wanted = [i for i in _segment_ids(segmentation_node)
              if names is None or source_segmentation.GetSegment(i).GetName() in names]
    copy, _private_scene = _labelmap_copy(segmentation_node, wanted, reference, to_volume)
    segmentation = copy.GetSegmentation()
    out = {}
    for segment_id in wanted:
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        source = segment.GetRepresentation(BINARY_LABELMAP)
        labelmap = slicer.vtkOrientedImageData()
        labelmap.DeepCopy(source)
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        values[:] = values == segment.GetLabelValue()  # shared layers hold several label values
        labelmap.Modified()
        if to_volume is not None:
            slicer.vtkOrientedImageDataResample.TransformOrientedImage(labelmap, to_volume)
        resampled = slicer.vtkOrientedImageData()
        ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, True)  # nearest neighbour, pad to reference extent
        if not ok:
            raise GeometryError(f"Could not resample segment {name!r} to the volume grid.")
        values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
        out[name] = values.reshape(shape) != 0
    return out


def write_segment_mask(segmentation_node, volume_node, name: str, path) -> Path:
    """Write the segment called ``name`` (case-insensitive) as a 0/1 mask NRRD on ``volume_node``'s grid,
    e.g. a corrected Parotid for ``segment --parotid``. Missing or empty segments are refused."""
    from .imageio import write_image

    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in _segment_ids(segmentation_node)]
    found = [n for n in names if n.strip().lower() == name.lower()]
    if len(found) != 1:
        raise InputError(f"The segmentation {segmentation_node.GetName()!r} has {'no' if not found else 'several'} "
                         f"segment(s) named {name!r} (it has: {', '.join(names) or 'none'}). Name the segment "
                         f"{name!r} first.")
    mask = segment_arrays(segmentation_node, volume_node, names=found)[found[0]]  # resample that segment only
    if not mask.any():
        raise InputError(f"The {name!r} segment of {segmentation_node.GetName()!r} is empty inside the volume "
                         f"{volume_node.GetName()!r}; draw it first.")
    return write_image(Path(path), mask.astype(np.uint8), volume_geometry(volume_node))


# --------------------------------------------------------------------------- summary
def summary_rows(report: dict | None) -> list[tuple[str, str]]:
    """Rows ``(item, value)`` for the widget's summary table, from a cascade report."""
    if not report:
        return []
    rows: list[tuple[str, str]] = []
    model = report.get("model") or {}
    if model:
        if model.get("name"):
            label = f"{model['name']} {model.get('version') or ''}"
        elif "@" in str(model.get("id", "")):
            label = str(model["id"])
        else:
            label = f"{model.get('id', '?')} {model.get('version') or ''}"
        rows.append(("Model", label.strip()))
        if model.get("clinical_use") is False or model.get("research_only", False):
            rows.append(("Use", "Research use only - not for clinical use"))
    if report.get("device"):
        rows.append(("Device", str(report["device"])))
    if report.get("side"):
        rows.append(("Side", str(report["side"]).capitalize()))
    if str(report.get("parotid_source", "")).startswith("given"):
        rows.append(("Parotid", "given contour (stage 1 skipped)"))
    timings = report.get("timings") or {}
    for step, seconds in timings.items():
        try:
            rows.append((f"Time: {step}", f"{float(seconds):.1f} s"))
        except (TypeError, ValueError):
            rows.append((f"Time: {step}", str(seconds)))
    for segment, cc in (report.get("volumes_cc") or {}).items():
        rows.append((f"Volume: {segment}", f"{float(cc):.2f} cc"))
    if report.get("roi_volume_cc") is not None:
        rows.append(("Volume: ROI", f"{float(report['roi_volume_cc']):.2f} cc"))
    return rows
