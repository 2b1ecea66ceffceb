"""Typed errors, so callers (CLI, Slicer, trainers) can tell the user what went wrong and what to do."""

from __future__ import annotations


class MedVolR1Error(Exception):
    """Base of every error the library raises on purpose."""


class VolumeError(MedVolR1Error):
    """A scan could not be read or is not a 3D volume; the message names the file and the problem."""


class AnchorError(MedVolR1Error):
    """An evidence anchor does not fit the volume (slice out of range, box outside or inverted, no boxes)."""


class CheckpointError(MedVolR1Error):
    """A model checkpoint is missing or unreadable; the message says where the file comes from."""


class DeviceError(MedVolR1Error):
    """The requested device is unavailable (e.g. CUDA asked for and absent) or ran out of memory."""


class DataError(MedVolR1Error):
    """A dataset case, label or sample is unusable (empty mask, unknown label, corrupt file)."""


class Cancelled(MedVolR1Error):
    """Raised from a progress callback to stop long work cleanly."""


class OutputsIncomplete(MedVolR1Error):
    """The result was computed and saved, but some output format could not be written (CLI exit code 3).

    `written` maps file names to paths; `failures` lists (format, file, one-line reason) for each missing one.
    """

    def __init__(self, out_dir, written: dict, failures: list):
        self.out_dir, self.written, self.failures = out_dir, dict(written), list(failures)
        missing = "; ".join(f"{fmt} ({name}) not written: {reason}" for fmt, name, reason in self.failures)
        super().__init__(f"{missing} (written in {out_dir}: {', '.join(self.written) or 'nothing'})")


def one_line(exc: BaseException) -> str:
    """An exception as one line: our own and OS errors by their message, anything else with its type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, (MedVolR1Error, ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
