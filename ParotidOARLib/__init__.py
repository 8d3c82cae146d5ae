"""ParotidOAR engine: two-stage parotid / organ-at-risk segmentation for
post-operative parotid brachytherapy. Pure Python; never imports Slicer or Qt
at module level.

Research use only: the shipped models are trained on public data and a
synthetic phantom and are NOT FOR CLINICAL USE.
"""

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = "Research use only - NOT FOR CLINICAL USE."
