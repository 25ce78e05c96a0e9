"""Did a run do what was asked? The one rule the harness and the rehearsal apply.

``flwr run --stream`` exits with 0 even when the ServerApp crashed, so the exit code
alone proves nothing. A run is done only if ``flwr run`` exited with 0, the ServerApp
wrote ``outcome.json`` with status ``completed`` *during this attempt* (an earlier
attempt's file does not count: compare :func:`outcome_stamp` before and after) and
the final model exists. Otherwise the verdict's message says why, quoting the last
exception of the attempt's log when the ServerApp died before writing its outcome.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server.run_outputs import OUTCOME_FILE, OutcomeError, read_outcome

# The last line of a Python traceback: "ValueError: ...", "common.data.DataError: ...".
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Interrupt|Abort|Refusal|Violation|"
    r"Exhausted|Exit)(?::\s.*)?$"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LEVEL = re.compile(r"^(?:ERROR|WARNING|INFO|DEBUG)\s*:\s*")


def has_final_model(run_dir: Path) -> bool:
    """Whether the run folder holds a final model (``final/model/config.json``)."""
    return (run_dir / "final" / "model" / "config.json").is_file()


def outcome_stamp(run_dir: Path) -> int | None:
    """When outcome.json was last written (ns), to tell this attempt's from an earlier one's."""
    try:
        return (run_dir / OUTCOME_FILE).stat().st_mtime_ns
    except OSError:
        return None


def attempt_outcome(run_dir: Path, *, stamp_before: int | None) -> dict[str, Any] | None:
    """``outcome.json`` if this attempt wrote it (its stamp changed), as a dict; else None.

    An unreadable or malformed file counts as not written.
    """
    if outcome_stamp(run_dir) in (None, stamp_before):
        return None
    try:
        outcome = read_outcome(run_dir)
    except (OSError, OutcomeError):
        return None
    return None if outcome is None else asdict(outcome)


def last_exception_line(log_text: str) -> str | None:
    """The last ``SomethingError: message`` line of a log (Flower's level prefix and
    colours removed), or None."""
    found = None
    for raw in log_text.splitlines():
        line = _LOG_LEVEL.sub("", _ANSI.sub("", raw).strip()).strip()
        if _EXCEPTION_LINE.match(line):
            found = line
    return found


def run_verdict(
    *, returncode: int, outcome: Mapping[str, Any] | None, final_model: bool,
    log_text: str, log_path: Path | str,
) -> tuple[bool, str]:
    """Did the run do what was asked? ``(ok, message)``; the message says why not.

    ``outcome`` is this attempt's ``outcome.json`` (None: not written), ``final_model``
    whether ``final/model`` exists, ``log_text`` the attempt's log.
    """
    if outcome is None:
        message = f"the ServerApp failed before writing its outcome; see {log_path}"
        error = last_exception_line(log_text)
        if error:
            message += f" (last error in the log: {error})"
        if returncode != 0:
            message += f" (flwr run exit code {returncode})"
        return False, message
    status = outcome.get("status")
    if status != "completed":
        text = str(outcome.get("message") or f"the run ended with status {status!r}")
        return False, f"{text} (log: {log_path})"
    if not final_model:
        return False, (f"the run reported completion but its final model is missing; "
                       f"see {log_path}")
    if returncode != 0:
        return False, (f"the run completed but `flwr run` exited with code {returncode}; "
                       f"see {log_path}")
    return True, ""
