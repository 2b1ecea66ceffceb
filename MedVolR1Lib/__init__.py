"""MedVol-R1 core: volumes, evidence anchors, slice views, rewards, models and pipeline.

Importable without 3D Slicer or Qt; the Slicer module and the training scripts are thin layers over it.
"""

__version__ = "0.1.0"
