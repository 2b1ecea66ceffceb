"""Headless training: VRS data on disk, lazy trl datasets, SFT / GRPO helpers, checkpoints and evaluation.

Everything here is imported by the thin scripts under Training/ (prepare_data, sft, grpo, evaluate);
nothing imports Slicer or Qt.  Heavy packages (torch, trl, datasets) are imported inside functions so
`import MedVolR1Lib.training` stays cheap.
"""
