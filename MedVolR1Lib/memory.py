"""How much memory the system can give without swapping: one probe for every OS Slicer runs on.

Used to refuse a scan that cannot be loaded (readers.check_fits_in_memory) and to size the background
encoding's embedding budget (propagation.embedding_store).  Standard library first: Slicer's Python may
have no psutil.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def os_available_memory() -> Optional[int]:
    """Memory the system can give without swapping (Linux MemAvailable, psutil, Windows' GlobalMemoryStatusEx,
    else free pages), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # psutil where installed (macOS has no SC_AVPHYS_PAGES)
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, AttributeError, OSError):
        pass
    if os.name == "nt":
        return _windows_available_bytes()
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _windows_available_bytes() -> Optional[int]:
    """GlobalMemoryStatusEx's ullAvailPhys (kernel32, through ctypes: no extra package in Slicer's Python)."""
    import ctypes

    class _MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = _MemoryStatus()
    status.dwLength = ctypes.sizeof(_MemoryStatus)
    try:
        ok = ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys) if ok else None
