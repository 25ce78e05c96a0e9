"""Run the fedsft Flower App in Flower's Simulation Engine, as a user would.

``run_app`` calls ``flwr run`` with a private ``FLWR_HOME``, so the local SuperLink that
``flwr run`` starts is this harness's own: it is started with runtime dependency
installation turned off (Flower 1.42 would otherwise ``uv sync`` the app's
dependencies, which pulls a CUDA build of torch), its state never mixes with the user's
``~/.flwr``, and it is stopped (with its child processes) when the run ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import tomli_w

APP_DIR = Path(__file__).resolve().parent.parent
# The fixed ports of Flower's managed local SuperLink (flwr/cli/local_superlink.py).
LOCAL_SUPERLINK_PORTS = (39091, 39093)
# Held for a whole simulation: two fedsft processes that both saw the ports free would
# otherwise start at once, and the second `flwr run` would submit to the first one's
# SuperLink and lose it when that run ends.
MACHINE_LOCK = Path(tempfile.gettempdir()) / "fedsft-local-superlink.lock"
# Starts the header line of each attempt in a run's flwr.log.
ATTEMPT_PREFIX = "==== fedsft attempt "
# Flower's `flwr run` gives its local SuperLink a fixed 15 s to start (not configurable in
# 1.42); on a loaded 2-core machine it sometimes needs longer. Nothing has run then, so
# the harness simply tries again.
SUPERLINK_START_TIMEOUT_MESSAGE = "Failed to start local SuperLink within"
SUPERLINK_START_ATTEMPTS = 3
# How long queued work (each run of a sweep, each trial of a tune) waits for the machine:
# it may run behind other simulations for hours, and a run that gave up waiting would be
# a lost run of the sweep (or a failed trial), not a measurement.
QUEUED_RUN_WAIT_SECONDS = 6 * 3600.0


class HarnessError(RuntimeError):
    """The simulation could not be started or did not complete."""


@dataclass(frozen=True)
class SimulationResult:
    """Where a finished simulation left its outputs."""

    run_dir: Path
    returncode: int
    log_path: Path
    seconds: float = 0.0  # wall time of ``flwr run`` itself, not of waiting for the machine
    # Ended by the caller's ``should_stop``: its processes were stopped (returncode -15).
    stopped: bool = False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_under(flwr_home: Path, child: int | None = None) -> list[psutil.Process]:
    """Every process of this simulation: the ``flwr run`` child and its descendants, and
    whatever carries ``flwr_home`` in its command line or its ``FLWR_HOME``.

    The environment catches what the process tree misses: the SuperLink's SuperExec
    runs in a new session, and Ray's workers are re-parented once their driver exits,
    yet all of them inherit ``FLWR_HOME`` (psutil reads the environment of this user's
    processes; others are skipped).
    """
    marker = str(flwr_home)
    found: dict[int, psutil.Process] = {}
    if child is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            found[child] = psutil.Process(child)
    for proc in psutil.process_iter(["cmdline", "environ"]):
        if proc.pid == os.getpid():
            continue
        cmdline = proc.info.get("cmdline") or []
        environ = proc.info.get("environ") or {}
        if environ.get("FLWR_HOME") == marker or any(marker in part for part in cmdline):
            found[proc.pid] = proc
    return list(found.values())


def _stop_processes_under(flwr_home: Path, child: int | None = None) -> None:
    """Stop the SuperLink started for ``flwr_home``, the simulation and its Ray workers."""
    stop_process_trees(_processes_under(flwr_home, child))


def stop_process_trees(roots: list[psutil.Process], *, timeout: float = 10) -> None:
    """SIGTERM each root and all its descendants; SIGKILL what is left after ``timeout``.

    Descendants are listed before anything is signalled: Flower's SuperLink and
    SuperNode start their SuperExec in a new session, so a process-group kill misses it.
    """
    procs: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                procs.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            continue
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises ``KeyboardInterrupt``, as Ctrl-C does.

    So ``kill <harness>`` takes the same path as Ctrl-C: the simulation is stopped and
    the machine released. Only the main thread can install handlers: elsewhere this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM within the block (the clean-up after an interrupt), so a
    second Ctrl-C does not abandon the simulation's processes half stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the machine lock: one simulation at a time, first come first served -----------------


@dataclass(frozen=True)
class _Ticket:
    """A process waiting for the machine, in the queue file next to the lock."""

    pid: int
    created: float  # the process's start time: a reused pid is not the same waiter
    token: str
    run: str
    since: float

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.created) < 1.0
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:  # another user's waiter: keep its place
            return True


def _shared_file(path: Path) -> IO[str]:
    """Open a machine-wide file for appending and reading, writable by every user: the
    first user to create it must not lock out the others."""
    handle = path.open("a+", encoding="utf-8")
    with contextlib.suppress(OSError):  # only the owner may chmod; others need not
        if path.stat().st_uid == os.getuid():
            os.chmod(path, 0o666)
    return handle


def _queue_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".queue")


def _update_queue(lock_path: Path, *, add: _Ticket | None = None,
                  remove: str | None = None) -> list[_Ticket]:
    """Read the queue, drop dead waiters (and ``remove``), append ``add``; under a lock."""
    with _shared_file(_queue_path(lock_path)) as queue:
        fcntl.flock(queue, fcntl.LOCK_EX)  # held for a few reads and writes only
        queue.seek(0)
        tickets = []
        for line in queue.read().splitlines():
            try:
                tickets.append(_Ticket(**json.loads(line)))
            except (ValueError, TypeError):
                continue  # a line from another version: not a waiter we can serve
        tickets = [t for t in tickets if t.token != remove and t.alive()]
        if add is not None and all(t.token != add.token for t in tickets):
            tickets.append(add)
        queue.seek(0)
        queue.truncate()
        queue.write("".join(json.dumps(asdict(t)) + "\n" for t in tickets))
        return tickets


def _holder(lock_path: Path) -> str:
    """Who holds the machine, as its holder wrote into the lock file."""
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8"))
        since = time.strftime("%H:%M:%S UTC", time.gmtime(float(info["since"])))
        return f"pid {info['pid']} (run {info['run']!r}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another fedsft simulation"


@contextlib.contextmanager
def hold_machine(*, run_name: str, timeout: float,
                 lock_path: Path | None = None) -> Iterator[float]:
    """Hold the machine's simulation lock within the block; yields the seconds left.

    Waiters are served in the order they arrived (a queue file next to the lock; dead
    waiters are dropped), and the holder writes its pid, run name and start time into
    the lock file, so a waiter says once whom it waits for. The lock is an ``flock``:
    it is released when the block ends, also if this process dies. Raises
    ``HarnessError`` after ``timeout`` seconds.
    """
    lock_path = MACHINE_LOCK if lock_path is None else lock_path
    deadline = time.monotonic() + timeout
    me = _Ticket(pid=os.getpid(), created=psutil.Process().create_time(),
                 token=uuid.uuid4().hex, run=run_name, since=time.time())
    with _shared_file(lock_path) as lock:
        try:
            announced = False
            tickets = _update_queue(lock_path, add=me)
            while True:
                position = [t.token for t in tickets].index(me.token)
                if position == 0:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        pass
                if time.monotonic() >= deadline:
                    raise HarnessError(
                        f"another fedsft simulation held {lock_path} for {timeout:g} s "
                        f"({_holder(lock_path)}); wait for it to finish"
                    )
                if not announced:
                    print(f"[fedsft] waiting for the machine: held by {_holder(lock_path)}; "
                          f"{position} waiter(s) ahead of this one; waiting up to "
                          f"{timeout:g} s", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(0.5)
                tickets = _update_queue(lock_path, add=me)  # re-adds it if pruned
        finally:
            _update_queue(lock_path, remove=me.token)
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({"pid": me.pid, "run": run_name, "since": time.time()}))
        lock.flush()
        try:
            yield max(deadline - time.monotonic(), 0.0)
        finally:
            lock.seek(0)
            lock.truncate()

def _wait_for_free_ports(port_wait: float) -> None:
    """Wait until no local SuperLink holds Flower's fixed ports, or fail clearly."""
    deadline = time.monotonic() + port_wait
    announced = False
    while busy := [p for p in LOCAL_SUPERLINK_PORTS if _port_in_use(p)]:
        if time.monotonic() >= deadline:
            raise HarnessError(
                f"port(s) {busy} on 127.0.0.1 stayed in use for {port_wait:g} s: another "
                "Flower local SuperLink is running (another simulation, or one started "
                "outside fedsft). Wait for it, or stop it (e.g. `pkill -f flower-superlink`)."
            )
        if not announced:
            print(f"[fedsft] waiting for port(s) {busy}: another local SuperLink is running",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(2)


def run_app(
    run_config: Mapping[str, Any],
    *,
    num_supernodes: int,
    num_cpus: float = 1,
    num_gpus: float = 0.0,
    app_dir: Path = APP_DIR,
    timeout: float | None = None,
    quiet: bool = False,
    port_wait: float = 900.0,
    should_stop: Callable[[], bool] | None = None,
) -> SimulationResult:
    """Run one simulation of the app with ``run_config`` overrides; wait for its end.

    ``run_config`` must set ``output-dir`` (absolute) and ``run-name`` (or
    ``resume-from``, an existing folder) so the run folder is known in advance. Output
    is streamed to stdout unless ``quiet`` and always appended to
    ``<run folder>/flwr.log``, after a header line per attempt.
    Flower's local SuperLink has fixed ports, so one simulation runs at a time on a
    machine: while another fedsft simulation (a file lock, served in order of arrival)
    or another SuperLink (the ports) holds it, this waits up to ``port_wait`` seconds in
    all. An interrupt (``KeyboardInterrupt``; SIGTERM within :func:`sigterm_interrupts`)
    stops every process of the simulation before it propagates. ``should_stop``, asked
    after each output line (the server prints one per recorded round), ends the run
    early when it returns True: its processes are stopped as after an interrupt and the
    result says ``stopped`` (the tuner prunes trials with it).
    """
    run_dir = _run_dir(run_config)
    with hold_machine(run_name=run_dir.name, timeout=port_wait) as left:
        return run_app_on_held_machine(
            run_config, num_supernodes=num_supernodes, num_cpus=num_cpus,
            num_gpus=num_gpus, app_dir=app_dir, timeout=timeout, quiet=quiet,
            port_wait=left, should_stop=should_stop)


def run_app_on_held_machine(
    run_config: Mapping[str, Any],
    *,
    num_supernodes: int,
    num_cpus: float = 1,
    num_gpus: float = 0.0,
    app_dir: Path = APP_DIR,
    timeout: float | None = None,
    quiet: bool = False,
    port_wait: float = 900.0,
    should_stop: Callable[[], bool] | None = None,
) -> SimulationResult:
    """``run_app`` for a caller that already holds the machine (``hold_machine``), e.g.
    to start a Ray cluster for the run inside the same hold: ``port_wait`` seconds for
    another SuperLink's ports, then the run, with the same retries."""
    _wait_for_free_ports(port_wait)
    for attempt in range(1, SUPERLINK_START_ATTEMPTS + 1):
        result = _run_locked(run_config, num_supernodes=num_supernodes,
                             num_cpus=num_cpus, num_gpus=num_gpus, app_dir=app_dir,
                             timeout=timeout, quiet=quiet, should_stop=should_stop)
        if result.returncode == 0 or not _superlink_start_timed_out(result.log_path):
            return result
        if attempt < SUPERLINK_START_ATTEMPTS:
            print(f"[fedsft] Flower's local SuperLink did not start within its fixed "
                  f"limit (a busy machine); no run had started: trying again "
                  f"({attempt + 1}/{SUPERLINK_START_ATTEMPTS})", file=sys.stderr,
                  flush=True)
    return result


def _superlink_start_timed_out(log_path: Path) -> bool:
    """Whether the last attempt in ``log_path`` failed only because the local SuperLink
    did not answer within Flower's startup limit (so no run was started)."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    last_attempt = text.rpartition(ATTEMPT_PREFIX)[2]
    return SUPERLINK_START_TIMEOUT_MESSAGE in last_attempt and \
        "Successfully started run" not in last_attempt


def _run_dir(run_config: Mapping[str, Any]) -> Path:
    """The run folder; a ``resume-from`` folder must exist (it is never created)."""
    if run_config.get("resume-from"):
        run_dir = Path(str(run_config["resume-from"])).expanduser().resolve()
        if not run_dir.is_dir():
            raise HarnessError(f"`resume-from` folder {run_dir} does not exist")
        return run_dir
    return Path(str(run_config["output-dir"])) / str(run_config["run-name"])


def _attempt_header(log_path: Path, command: list[str]) -> str:
    """``==== fedsft attempt N, <UTC time>, <command> ====`` for this attempt's log."""
    attempt = 1
    if log_path.is_file():
        with log_path.open(encoding="utf-8", errors="replace") as log:
            attempt += sum(1 for line in log if line.startswith(ATTEMPT_PREFIX))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"{ATTEMPT_PREFIX}{attempt}, {stamp}, {shlex.join(command)} ====\n"


def _run_locked(
    run_config: Mapping[str, Any], *, num_supernodes: int, num_cpus: float,
    num_gpus: float, app_dir: Path, timeout: float | None, quiet: bool,
    should_stop: Callable[[], bool] | None = None,
) -> SimulationResult:
    """``run_app`` once this process holds the machine's local SuperLink."""
    run_dir = _run_dir(run_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(tempfile.mkdtemp(prefix="fedsft-flwr-home-"))
    overrides = flwr_home / "run-config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
    federation = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus} "
        f"client-resources-num-gpus={float(num_gpus)}"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONUNBUFFERED": "1",
    }
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    command = [flwr, "run", str(app_dir), "--stream",
               "--run-config", str(overrides), "--federation-config", federation]
    log_path = run_dir / "flwr.log"
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    proc = None
    stopped = False
    returncode = 0
    try:
        # Appended, never replaced: the log of an interrupted attempt is kept for its
        # resumption, and each attempt starts with a header line.
        with log_path.open("a", encoding="utf-8") as log:
            log.write(_attempt_header(log_path, command))
            log.flush()
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if not quiet:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    raise HarnessError(f"simulation exceeded {timeout:g} s; log: {log_path}")
                if should_stop is not None and should_stop():
                    stopped = True
                    break
            if not stopped:
                returncode = proc.wait()
    finally:
        with _signals_deferred():
            _stop_processes_under(flwr_home, None if proc is None else proc.pid)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)  # reap it
                if proc.stdout is not None:
                    proc.stdout.close()
            shutil.rmtree(flwr_home, ignore_errors=True)
    if stopped:
        # What the harness did to it (the clean-up reaps the child before Popen can read
        # its status, which Popen then reports as 0).
        returncode = -signal.SIGTERM
        with log_path.open("a", encoding="utf-8") as log:
            log.write("[fedsft] the harness stopped this simulation (asked by its caller)\n")
    return SimulationResult(run_dir=run_dir, returncode=returncode, log_path=log_path,
                            seconds=time.monotonic() - started, stopped=stopped)
