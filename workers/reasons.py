"""Failure texts and warnings without patient data on the worker side.

A job's reason (``jobs.error``, ``studies.reason``, its events) and the worker's log lines name
UIDs, ids and what failed, never a value from a dataset's header. pydicom's and highdicom's
exception and warning texts can quote element values (a name, an id, a date), so:

- :func:`reason_for` keeps the text of an exception only when it was raised by our own code and
  does not quote a library's text; for one raised inside a DICOM library it gives a fixed text;
- :func:`trace` is a traceback without the exception's message (file, line and code only);
- :func:`hide_value_warnings` drops the warnings that quote values (see there).
"""

from __future__ import annotations

import logging
import traceback
import warnings

# Packages whose exception texts may quote a dataset's values.
_DICOM_LIBRARIES = ("pydicom", "highdicom", "pylibjpeg", "openjpeg", "libjpeg", "pynetdicom")
_hidden = False


def _library_of(exc: BaseException) -> str | None:
    """The DICOM library the exception was raised in (its innermost frame), or None."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    module = type(exc).__module__.split(".", 1)[0]
    if module in _DICOM_LIBRARIES:
        return module
    if last is None:
        return None
    parts = last.replace("\\", "/").split("/")
    for lib in _DICOM_LIBRARIES:
        if lib in parts:
            return lib
    return None


def reason_for(exc: BaseException, step: str) -> str:
    """A reason for events and logs. ``step`` says what the worker was doing (fixed text)."""
    name = type(exc).__name__
    lib = _library_of(exc)
    if lib is not None:
        return f"{step}: {name} in {lib} (details withheld: they may quote header values)"
    text = str(exc)
    for cause in (exc.__cause__, exc.__context__):
        if cause is not None and _library_of(cause) is not None:
            quoted = str(cause)
            if quoted and quoted in text:
                return f"{step}: {name} (details withheld: they may quote header values)"
    return f"{step}: {name}: {text}" if text else f"{step}: {name}"


def trace(exc: BaseException) -> str:
    """Where the exception was raised: the traceback's frames without its message."""
    return "".join(traceback.format_tb(exc.__traceback__)).rstrip()


def hide_value_warnings() -> None:
    """Drop the warnings that print a dataset's values into the worker's log.

    - highdicom's ``check_person_name`` warns ``The string "<name>" is unlikely to represent the
      intended person name`` for every Person Name without a caret, e.g. the Referring
      Physician's Name ``ward`` of the NEMA WG04 radiographs, on every worker start (Python
      shows a warning once per process). The writers copy the Patient and Study modules from
      the source unchanged, as they must; a one-component name is valid DICOM (highdicom only
      guesses it may be a mistake), so there is nothing to fix in the value, and the warning's
      only effect is a name in the log. Only that message is filtered.
    - pydicom warns (and logs) about invalid values with the value in the text (a fetched
      instance's header can hold anything); its warnings are dropped and its logger keeps
      errors, as on the agent (pacs_agent.receiving.ingest).

    Process-wide and idempotent: called when a worker starts (and by its pipeline context).
    """
    global _hidden
    if _hidden:
        return
    warnings.filterwarnings(
        "ignore",
        message=r'The string ".*" is unlikely to represent the intended person name',
        category=UserWarning,
    )
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    _hidden = True
