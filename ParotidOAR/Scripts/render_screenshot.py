"""Render the extension's screenshot (docs/screenshot-segment.png) from a real ParotidOAR result.

    python ParotidOAR/Scripts/render_screenshot.py CT.nrrd RESULT.seg.nrrd REPORT.json docs/screenshot-segment.png

The result is loaded the way the module loads it (``scene.load_result`` on a slicer-core MRML scene:
names, colours, outline-only ROI, closed surfaces); three slices through the parotid are drawn with the
segments over the CT (ROI as an outline) and the closed surfaces are rendered offscreen with VTK, seen from
the operated side. Not part of the installed extension (not in CMakeLists.txt); it needs matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))


def _overlay(ct2d, masks2d, colors, roi2d=None):
    from scipy import ndimage

    lo, hi = -160.0, 240.0  # soft-tissue window
    grey = np.clip((ct2d - lo) / (hi - lo), 0, 1)
    rgb = np.stack([grey] * 3, axis=-1)
    for name, m in masks2d.items():
        if not m.any():
            continue
        c = np.asarray(colors[name])
        rgb[m] = 0.55 * rgb[m] + 0.45 * c
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = c
    if roi2d is not None and roi2d.any():
        edge = roi2d & ~ndimage.binary_erosion(roi2d)
        rgb[edge] = (1.0, 1.0, 0.0)
    return rgb


def _render_3d(node, side, size=(700, 700)):
    import vtk
    from vtk.util import numpy_support

    from ParotidOARLib import labels

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.05, 0.05, 0.08)
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        if labels.is_roi(segment.GetName()):
            continue
        poly = segment.GetRepresentation("Closed surface")
        if poly is None or poly.GetNumberOfPoints() == 0:
            continue
        mapper = vtk.vtkPolyDataMapper()
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputData(poly)
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*segment.GetColor())
        if segment.GetName() == labels.SKIN:
            actor.GetProperty().SetOpacity(0.35)
        renderer.AddActor(actor)
    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    focal = np.array(camera.GetFocalPoint())
    distance = camera.GetDistance()
    direction = np.array([-1.0, -0.35, 0.15]) if side == "left" else np.array([1.0, -0.35, 0.15])  # RAS
    camera.SetPosition(*(focal + distance * direction / np.linalg.norm(direction)))
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.35)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    return pixels


def main(ct_path, seg_path, report_path, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer
    from matplotlib.patches import Patch

    from ParotidOARLib import imageio, labels, scene

    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    side = report.get("side", "left")
    ct, geometry = imageio.read_image(ct_path)
    mrml = slicer.vtkMRMLScene()
    # the Segmentations logic registers the segmentation representations, as the Slicer application does
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(mrml)
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    segmentations_logic.SetMRMLScene(mrml)
    app_logic.SetModuleLogic("Segmentations", segmentations_logic)
    volume = scene.add_volume(mrml, ct, geometry, "Phantom CT")
    node = scene.load_result(mrml, seg_path, volume, report=report, side=side, closed_surface=True)
    masks = scene.segment_arrays(node, volume)
    roi = next((m for n, m in masks.items() if labels.is_roi(n)), None)
    structures = {n: m for n, m in masks.items() if not labels.is_roi(n)}
    colors = {n: labels.info(n).color for n in structures}
    k, j, i = (int(round(c)) for c in np.argwhere(structures[labels.PAROTID]).mean(axis=0))
    sx, sy, sz = geometry.spacing
    views = [
        ("Axial", ct[k], {n: m[k] for n, m in structures.items()}, roi[k], sy / sx, False),
        ("Coronal", ct[:, j, :], {n: m[:, j, :] for n, m in structures.items()}, roi[:, j, :], sz / sx, True),
        ("Sagittal", ct[:, :, i], {n: m[:, :, i] for n, m in structures.items()}, roi[:, :, i], sz / sy, True),
    ]
    fig = plt.figure(figsize=(16, 9), dpi=100, facecolor="black")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 1.25], left=0.01, right=0.99, top=0.9, bottom=0.08,
                            wspace=0.04, hspace=0.12)
    slots = [grid[0, 0], grid[0, 1], grid[1, 0]]
    for slot, (title, image, ms, roi2d, aspect, flip) in zip(slots, views):
        ax = fig.add_subplot(slot)
        rgb = _overlay(image.astype(float), ms, colors, roi2d)
        ax.imshow(rgb[::-1] if flip else rgb, aspect=aspect, interpolation="nearest")
        ax.set_title(title, color="white", fontsize=13)
        ax.axis("off")
    legend_ax = fig.add_subplot(grid[1, 1])
    legend_ax.axis("off")
    handles = [Patch(color=colors[n], label=n) for n in structures]
    handles.append(Patch(facecolor="none", edgecolor=(1, 1, 0), label=labels.ROI + " (outline)"))
    legend_ax.legend(handles=handles, loc="center", frameon=False, fontsize=13, labelcolor="white")
    ax3d = fig.add_subplot(grid[:, 2])
    ax3d.imshow(_render_3d(node, side))
    ax3d.set_title("3D (closed surfaces, skin translucent)", color="white", fontsize=13)
    ax3d.axis("off")
    model = report.get("model") or {}
    fig.suptitle(f"Parotid OAR - {side} side - model {model.get('name', model.get('id', ''))} "
                 f"{model.get('version', '')} on a synthetic phantom CT", color="white", fontsize=16)
    fig.text(0.5, 0.02, "Research use only - not for clinical use. Trained on synthetic and public data.",
             ha="center", color=(1.0, 0.45, 0.45), fontsize=14, fontweight="bold")
    fig.savefig(out_path, facecolor="black")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
