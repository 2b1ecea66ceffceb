"""A running request, pumped from the caller's thread: `poll()` moves bytes without blocking and reports state.

No Python thread does the waiting: Slicer's main thread holds the GIL while Qt idles, so a helper thread
would only run during the 100 ms polls.  Instead each `poll()` writes what the transport can take and
reads what has arrived (non-blocking), and finishes a frame already under way within a small budget.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import protocol as p
from .framing import Frame, ProtocolError

POLL_BUDGET_S = 0.05  # longest a GUI poll spends finishing a transfer that is under way


@dataclass
class JobState:
    done: bool
    fraction: float
    message: str
    cancelled: bool = False
    result: Any = None  # the final reply of the job's last request (EvidenceFound, MaskResult, StatsReply)
    error: Optional[BaseException] = None
    error_trace: str = ""


class Transport(ABC):
    """Bytes to and from one worker or one HTTP exchange."""

    @abstractmethod
    def pump(self, max_wait: float, *, block: bool) -> tuple[list[Frame], bool]:
        """Move bytes for up to `max_wait` s; returns the whole frames received and whether the peer has closed.

        block=False waits only while a frame is half sent or half received (GUI polls); block=True also waits
        for the next byte (scripts, the CLI)."""

    @abstractmethod
    def abort(self) -> None: ...

    def closed_error(self) -> BaseException:
        return p.WorkerCrashed("the model worker stopped without answering; the next run starts a new one", "WorkerCrashed")


class Job:
    """One or more requests sent together (e.g. OpenVolume + Propagate); done when each has its final reply.

    `attempts` lists request batches: when the first fails with UnknownVolume (a fresh or busy-evicting
    worker), the next batch, which carries the volume, is sent."""

    def __init__(self, attempts: list[list], open_transport: Callable[[bytes], Transport],
                 on_reply: Optional[Callable[[Any, Any], None]] = None, name: str = "job") -> None:
        self.name = name
        self._attempts = list(attempts)
        self._open = open_transport
        self._on_reply = on_reply  # client bookkeeping: (request, final reply)
        self._state = JobState(False, 0.0, "starting")
        self._transport: Optional[Transport] = None
        self._requests: list = []
        self._finals: list = []
        self._next_attempt()

    # ------------------------------------------------------------------------------------------------- API
    def poll(self) -> JobState:
        if not self._state.done:
            self._pump(POLL_BUDGET_S, block=False)
        return self._state

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block (scripts, CLI, tests) until done or `timeout` seconds; waiting happens in select(), without the GIL."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._state.done:
            remaining = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if remaining <= 0:
                return False
            self._pump(remaining, block=True)
        return True

    def cancel(self) -> None:
        """Stop now: the transport is torn down (a local worker is killed), and nothing of this run is applied."""
        if self._state.done:
            return
        if self._transport is not None:
            self._transport.abort()
        self._finish(error=None, cancelled=True, message=f"{self.name} cancelled by the user")

    @property
    def cancel_requested(self) -> bool:
        return self._state.cancelled

    # ------------------------------------------------------------------------------------------- internals
    def _next_attempt(self) -> None:
        self._requests = self._attempts.pop(0)
        self._finals = []
        payload = b"".join(p.to_frame(r) for r in self._requests)
        try:
            self._transport = self._open(payload)
        except Exception as exc:  # noqa: BLE001 - the worker could not start or the server is unreachable
            self._finish(error=exc)

    def _pump(self, max_wait: float, *, block: bool) -> None:
        transport = self._transport
        try:
            frames, closed = transport.pump(max_wait, block=block)
            for frame in frames:
                self._receive(p.from_frame(frame, p.REPLIES))
                if self._state.done:
                    return
        except (ProtocolError, p.ServiceError) as exc:  # garbage on the wire, an HTTP refusal, a lost connection
            transport.abort()
            self._finish(error=exc)
            return
        if closed and not self._state.done:
            self._finish(error=transport.closed_error())

    def _receive(self, reply) -> None:
        if isinstance(reply, p.Progress):
            self._state.fraction, self._state.message = float(reply.fraction), reply.message
            return
        request = self._requests[len(self._finals)]
        self._finals.append(reply)
        if self._on_reply is not None:
            self._on_reply(request, reply)
        if len(self._finals) < len(self._requests):
            return
        errors = [r for r in self._finals if isinstance(r, p.ErrorReply)]
        if errors and errors[0].error_class == "UnknownVolume" and self._attempts:
            self._next_attempt()
            return
        if errors:
            try:
                p.raise_for(errors[0])
            except Exception as exc:  # noqa: BLE001 - turned into state for the caller
                self._finish(error=exc, cancelled=errors[0].error_class == "Cancelled")
            return
        self._finish(result=self._finals[-1])

    def _finish(self, *, result=None, error=None, cancelled: bool = False, message: str = "") -> None:
        if self._state.done:
            return
        self._state = JobState(
            done=True,
            fraction=1.0 if error is None and not cancelled else self._state.fraction,
            message=message or ("done" if error is None else str(error)),
            cancelled=cancelled,
            result=result,
            error=error,
        )


def run_blocking(job: Job, timeout: Optional[float] = None):
    """The final reply of a job, or its error raised (CLI, scripts, stats queries)."""
    if not job.wait(timeout):
        job.cancel()
        raise TimeoutError(f"{job.name} did not finish within {timeout} s")
    state = job.poll()
    if state.error is not None:
        raise state.error
    if state.cancelled:
        raise p.ServiceError(state.message, "Cancelled")
    return state.result
