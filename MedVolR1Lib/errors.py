"""Typed errors, so callers (CLI, Slicer, trainers) can tell the user what went wrong and what to do."""


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
