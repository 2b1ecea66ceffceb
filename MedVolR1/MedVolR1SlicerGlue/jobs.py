"""Run one MedVolR1Lib call on a worker thread with progress and Cancel, without Qt.

The worker never touches the MRML scene: the GUI thread polls `BackgroundJob.poll()` (a QTimer in
Slicer) and applies the result itself.  Cancel works through the library's progress callback, which
raises `Cancelled` at the next report, so the library unwinds and releases what it holds.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from MedVolR1Lib.errors import Cancelled
from MedVolR1Lib.progress import ProgressCallback


@dataclass
class JobState:
    done: bool
    fraction: float
    message: str
    cancelled: bool = False
    result: Any = None
    error: Optional[BaseException] = None
    error_trace: str = ""


@dataclass
class BackgroundJob:
    """`work(progress)` on a daemon thread; poll from the GUI thread."""

    work: Callable[[ProgressCallback], Any]
    name: str = "job"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _fraction: float = 0.0
    _message: str = "starting"
    _result: Any = None
    _error: Optional[BaseException] = None
    _trace: str = ""
    _thread: Optional[threading.Thread] = None

    def start(self) -> "BackgroundJob":
        self._thread = threading.Thread(target=self._run, name=f"MedVolR1-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"{self.name} cancelled by the user")
        with self._lock:
            self._fraction = float(fraction)
            self._message = str(message)

    def _run(self) -> None:
        try:
            result = self.work(self._progress)
            if self._cancel.is_set():  # cancelled after the last progress report: drop the result
                raise Cancelled(f"{self.name} cancelled by the user")
            with self._lock:
                self._result = result
        except BaseException as exc:  # noqa: BLE001 - reported to the GUI thread, never swallowed
            with self._lock:
                self._error = exc
                self._trace = traceback.format_exc()
        finally:
            self._finished.set()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._finished.wait(timeout)

    def poll(self) -> JobState:
        with self._lock:
            error = self._error
            return JobState(
                done=self._finished.is_set(),
                fraction=self._fraction,
                message=self._message,
                cancelled=isinstance(error, Cancelled),
                result=self._result,
                error=error,
                error_trace=self._trace,
            )
