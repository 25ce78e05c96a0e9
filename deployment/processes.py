"""Start Flower's long-running processes, run its CLI, and always stop what we started.

Every process is started in its own session with its output in a log file.
``ProcessSet`` stops each one with all its descendants (SIGTERM, then SIGKILL) when its
``with`` block ends, also on errors and Ctrl-C, through the same helper the simulation
harness uses (``simulations.runner.stop_process_trees``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from simulations.runner import stop_process_trees


class ProcessError(RuntimeError):
    """A Flower process did not start, or a Flower CLI command failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of every Flower process we start.

    Runtime dependency installation is off (Flower would ``uv sync`` the app's
    dependencies and download a CUDA torch); nothing is fetched from the Hub.
    """
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def executable(name: str) -> str:
    """A console script of this environment (next to the running Python first)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def flwr(args: Sequence[str], *, flwr_home: Path, timeout: float = 60,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ``flwr`` CLI command against the connection in ``flwr_home``."""
    result = subprocess.run(
        [executable("flwr"), *args], env=flower_env(flwr_home), capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    if check and result.returncode != 0:
        raise ProcessError(
            f"`flwr {' '.join(args)}` failed ({result.returncode}): "
            f"{(result.stdout + result.stderr).strip()[-2000:]}"
        )
    return result


def flwr_json(args: Sequence[str], *, flwr_home: Path, timeout: float = 60) -> Any:
    """Run a ``flwr ... --format json`` command and parse the JSON it prints."""
    out = flwr([*args, "--format", "json"], flwr_home=flwr_home, timeout=timeout).stdout
    start = out.find("{")
    if start < 0:
        raise ProcessError(f"`flwr {' '.join(args)}` printed no JSON: {out[-1000:]}")
    reply = json.JSONDecoder().raw_decode(out[start:])[0]
    # With --format json, flwr reports its errors as {"success": false, ...} and exits 0.
    if isinstance(reply, dict) and reply.get("success") is False:
        raise ProcessError(f"`flwr {' '.join(args)}` failed: "
                           f"{str(reply.get('error-message', reply)).strip()}")
    return reply


# `flwr run` prints this line (flwr/cli/run/run.py) once the SuperLink accepted the run.
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


def started_run_id(line: str) -> int | None:
    """The run id in a line of ``flwr run`` output, or None if the line does not give one."""
    match = _RUN_STARTED.search(line)
    return int(match.group(1)) if match else None


def follow_run(command: Sequence[str], *, env: Mapping[str, str], cwd: Path,
               on_line: Callable[[str], None] = print) -> int:
    """Run ``flwr run ... --stream``, passing each output line on; returns its exit code.

    ``flwr run --stream`` exits 0 also when the run failed: ask the SuperLink
    (:func:`parse_run_status`) for how it ended.
    """
    with subprocess.Popen(
        list(command), env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                on_line(line.rstrip("\n"))
            return proc.wait()
        finally:
            # Interrupted (Ctrl-C, SIGTERM): stop following; the run goes on at the SuperLink.
            stop_following(proc, grace=5)


def stop_following(proc: subprocess.Popen[str], *, grace: float) -> None:
    """Stop a command that follows a run, if still running: SIGTERM, then SIGKILL after
    ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        if proc.poll() is None:
            proc.kill()


@dataclass(frozen=True)
class RunStatus:
    """A run's state on the SuperLink, as ``flwr list`` shows it."""

    run_id: int
    status: str  # "pending", "starting", "running" or "finished:<completed|failed|stopped>"
    details: str  # why it failed or stopped; "" when Flower gives none

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    def describe(self) -> str:
        """One line: how the run ended (or that it has not), and where its log is."""
        if self.completed:
            return f"run {self.run_id} finished with status completed"
        if self.finished:
            outcome = self.status.partition(":")[2] or "unknown"
            why = f": {self.details}" if self.details else ""
            return (f"run {self.run_id} finished with status {outcome}{why}; "
                    f"see `flwr log {self.run_id}`")
        return (f"run {self.run_id} has not finished (status {self.status}); "
                f"follow it with `flwr log {self.run_id}`")


def parse_run_status(reply: Any, run_id: int) -> RunStatus:
    """The status of ``run_id`` in the reply of ``flwr list --run-id N --format json``.

    The reply is ``{"success": true, "runs": [{"run-id": "N", "status": ...,
    "status-details": ...}, ...]}`` (flwr/cli/ls.py); Flower writes details it does
    not have as "N/A".

    Raises
    ------
    ProcessError
        If the reply is an error or does not list the run.
    """
    if not isinstance(reply, dict) or reply.get("success") is not True:
        message = reply.get("error-message", reply) if isinstance(reply, dict) else reply
        raise ProcessError(f"could not read the status of run {run_id}: {message}")
    for run in reply.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            details = str(run.get("status-details") or "").strip()
            return RunStatus(run_id=run_id, status=str(run.get("status", "")),
                             details="" if details == "N/A" else details)
    raise ProcessError(f"the SuperLink does not list run {run_id}")


class ProcessSet:
    """Processes started for one purpose; all stopped when the ``with`` block ends."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, command: Sequence[str], *, log_path: Path,
              env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start ``command`` in a new session, its output appended to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        command = [executable(command[0]), *command[1:]]
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
            start_new_session=True,
        )
        self._procs.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one process and its descendants."""
        for entry in list(self._procs):
            if entry[1] is proc:
                self._stop([entry])
                self._procs.remove(entry)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill one process and its descendants at once (SIGKILL: a crash, no clean-up)."""
        for entry in list(self._procs):
            if entry[1] is proc:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        with contextlib.suppress(psutil.NoSuchProcess):
                            child.kill()
                proc.kill()
                self._stop([entry])  # SIGKILLs its session, reaps it, closes its log
                self._procs.remove(entry)

    def stop_all(self) -> None:
        """Stop every process started here, the last started first."""
        self._stop(list(reversed(self._procs)))
        self._procs.clear()

    @staticmethod
    def _stop(entries: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]]) -> None:
        roots = []
        for _, proc, _ in entries:
            with contextlib.suppress(psutil.NoSuchProcess):
                roots.append(psutil.Process(proc.pid))
        stop_process_trees(roots, timeout=10)
        for _, proc, log in entries:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)  # anything left in its session
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            log.close()

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_for_port(port: int, *, proc: subprocess.Popen[bytes], log_path: Path,
                  timeout: float = 30) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessError(
                f"process exited ({proc.returncode}) before listening on port {port}; "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            # A connection to itself (Linux picks the port as its own source port when
            # nothing listens on an ephemeral port) is not a listener.
            if s.connect_ex(("127.0.0.1", port)) == 0 and s.getsockname() != s.getpeername():
                return
        time.sleep(0.2)
    raise ProcessError(f"nothing listens on port {port} after {timeout:g} s; log "
                       f"{log_path}:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
