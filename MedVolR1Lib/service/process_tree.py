"""Start the worker so that it can be stopped whole, and without a console window on Windows.

Slicer's `PythonSlicer` is a launcher that runs `python-real` as its child, so killing the process we started
ends only the launcher and leaves the worker running (with its multi-GB models) until it next writes.  We
stop the whole tree instead: on POSIX the worker starts in its own session (a process group we can signal),
on Windows `taskkill /T /F` ends the process and its descendants.  The worker also exits by itself when its
connection closes (loopback.exit_when_closed), which covers anything that escapes both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# Windows constants (subprocess has them only on Windows; their values are fixed by the Win32 API).
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def popen_options(platform: str = sys.platform) -> dict:
    """Popen keyword arguments for a worker started on `platform` (sys.platform's spelling).

    Windows: a hidden window and no console, as Slicer's own `launchConsoleProcess` starts tools (without
    them every worker start flashes a console, and closing it kills the worker).  POSIX: a new session."""
    if platform == "win32":
        startupinfo = subprocess.STARTUPINFO()
        startupinfo.dwFlags |= STARTF_USESHOWWINDOW
        startupinfo.wShowWindow = SW_HIDE
        return {"startupinfo": startupinfo, "creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def tree_kill_command(pid: int) -> list[str]:
    """Windows: end `pid` and every process it started (/T), without asking (/F)."""
    return ["taskkill", "/T", "/F", "/PID", str(int(pid))]


def kill_tree(process: subprocess.Popen, platform: str = sys.platform) -> None:
    """End `process` and its descendants now, and reap it; safe to call when it has already exited."""
    if platform == "win32":
        if process.poll() is None:
            try:  # taskkill finds the children through their parent, so it must run while the launcher lives
                subprocess.run(tree_kill_command(process.pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=30, **popen_options(platform))
            except (OSError, subprocess.SubprocessError):
                pass
    else:
        try:  # the group outlives its leader: signal it even when the launcher itself has already exited
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.kill()
    process.wait()
