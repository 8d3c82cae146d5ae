"""ParotidOAR engine: two-stage parotid / organ-at-risk segmentation for
post-operative parotid brachytherapy. Pure Python; never imports Slicer or Qt
at module level.

For notebooks and scripts::

    from ParotidOARLib import load_model, segment_image
    result = segment_image("ct.nrrd", side="left", model=load_model())
    result.labelmap  # a SimpleITK.Image

(see :mod:`ParotidOARLib.api`; torch is imported only when a model is loaded).

Research use only: the shipped models are trained on public data and a
synthetic phantom and are NOT FOR CLINICAL USE.
"""

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = "Research use only - NOT FOR CLINICAL USE."

__all__ = ["__version__", "NOT_FOR_CLINICAL_USE", "load_model", "segment_image", "Model", "Segmentation"]

_API = ("load_model", "segment_image", "Model", "Segmentation")


def __getattr__(name):  # lazy: `import ParotidOARLib` (and the CLI's --help) stays light
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
