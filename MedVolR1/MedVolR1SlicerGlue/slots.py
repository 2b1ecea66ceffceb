"""Every exception a Qt slot raises reaches the user as one message.

PythonQt prints an exception escaping a slot to the Python console and the panel shows nothing (a missing
package in server mode once looked like a dead button).  MedVolR1.py wraps each slot with `reporting(show)`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from typing import Callable, Optional

from MedVolR1Lib.errors import MedVolR1Error


def user_message(error: BaseException) -> str:
    """One line for the user: our own errors as written, a missing package by name, anything else typed."""
    if isinstance(error, MedVolR1Error):
        return str(error)
    if isinstance(error, ModuleNotFoundError):
        return (f"The Python package '{error.name}' is missing in this Slicer, so this action could not run. "
                "Nothing was changed; see the Python console for details.")
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def reporting(show: Callable[[str, Optional[str]], None]) -> Callable:
    """Decorator factory: the slot's exception goes to `show(message, details)` (and the log), never further."""

    def decorate(function):
        # PythonQt passes a signal's arguments only up to what a plain function takes (clicked(bool) calls
        # onSegment(self) with no bool), but all of them to a *args wrapper: trim them the same way here.
        code = function.__code__
        takes = None if code.co_flags & inspect.CO_VARARGS else code.co_argcount

        @functools.wraps(function)
        def slot(*args, **kwargs):
            try:
                return function(*(args if takes is None else args[:takes]), **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point: nothing escapes a slot unseen
                logging.error("MedVol-R1: %s failed", function.__name__, exc_info=exc)
                details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                try:
                    show(user_message(exc), details)
                except Exception:  # noqa: BLE001 - the dialog itself failed: the log has it
                    logging.exception("MedVol-R1: could not show the error")
                return None

        slot.reports_errors = True
        return slot

    return decorate
