"""Slicer-side code of the ParotidOAR module (tabs, process runner, dependencies).

Files here may import ``qt``/``slicer`` (except Signal.py, Process.py and
SegmentLogic.py, which are Qt-free so they can be driven and tested without a
GUI). The engine is ``ParotidOARLib``; MRML node handling is in
``ParotidOARLib.scene``.
"""
