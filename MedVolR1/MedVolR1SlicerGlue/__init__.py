"""Qt-free glue between MRML nodes and MedVolR1Lib.

Everything here runs against plain MRML classes (3D Slicer's embedded Python, or the `slicer-core`
wheel in CI), so the geometry mapping, the ROI edit debounce and the background job can be tested
without the Slicer application.  Qt-specific pieces (timers, dialogs) are injected by MedVolR1.py.
"""
