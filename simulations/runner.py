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
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

APP_DIR = Path(__file__).resolve().parent.parent
# The fixed ports of Flower's managed local SuperLink (flwr/cli/local_superlink.py).
LOCAL_SUPERLINK_PORTS = (39091, 39093)
# Held for a whole simulation: two fedsft processes that both saw the ports free would
# otherwise start at once, and the second `flwr run` would submit to the first one's
# SuperLink and lose it when that run ends.
MACHINE_LOCK = Path(tempfile.gettempdir()) / "fedsft-local-superlink.lock"


class HarnessError(RuntimeError):
    """The simulation could not be started or did not complete."""


@dataclass(frozen=True)
class SimulationResult:
    """Where a finished simulation left its outputs."""

    run_dir: Path
    returncode: int
    log_path: Path
    seconds: float = 0.0  # wall time of ``flwr run`` itself, not of waiting for the machine


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_processes_under(flwr_home: Path) -> None:
    """Stop the SuperLink started for ``flwr_home`` and everything it spawned."""
    marker = str(flwr_home)
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    stop_process_trees(roots)


def stop_process_trees(roots: list[psutil.Process], *, timeout: float = 10) -> None:
    """SIGTERM each root and all its descendants; SIGKILL what is left after ``timeout``.

    Descendants are listed before anything is signalled: Flower's SuperLink and
    SuperNode start their SuperExec in a new session, so a process-group kill misses it.
    """
    procs = []
    for root in roots:
        try:
            procs.extend([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


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
) -> SimulationResult:
    """Run one simulation of the app with ``run_config`` overrides; wait for its end.

    ``run_config`` must set ``output-dir`` (absolute) and ``run-name`` (or
    ``resume-from``) so the run folder is known in advance. Output is streamed to
    stdout unless ``quiet`` and always saved to ``<run folder>/flwr.log``.
    Flower's local SuperLink has fixed ports, so one simulation runs at a time on a
    machine: while another fedsft simulation (a file lock) or another SuperLink (the
    ports) holds it, this waits up to ``port_wait`` seconds in all.
    """
    deadline = time.monotonic() + port_wait
    with MACHINE_LOCK.open("a") as lock:
        announced = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HarnessError(
                        f"another fedsft simulation held {MACHINE_LOCK} for {port_wait:g} s; "
                        "wait for it to finish"
                    ) from None
                if not announced:
                    print("[fedsft] waiting for another fedsft simulation on this machine",
                          file=sys.stderr, flush=True)
                    announced = True
                time.sleep(1)
        # Released when the file closes, also if this process dies.
        _wait_for_free_ports(max(deadline - time.monotonic(), 0.0))
        return _run_locked(run_config, num_supernodes=num_supernodes, num_cpus=num_cpus,
                           num_gpus=num_gpus, app_dir=app_dir, timeout=timeout, quiet=quiet)


def _run_locked(
    run_config: Mapping[str, Any], *, num_supernodes: int, num_cpus: float,
    num_gpus: float, app_dir: Path, timeout: float | None, quiet: bool,
) -> SimulationResult:
    """``run_app`` once this process holds the machine's local SuperLink."""
    if run_config.get("resume-from"):
        run_dir = Path(str(run_config["resume-from"])).resolve()
    else:
        run_dir = Path(str(run_config["output-dir"])) / str(run_config["run-name"])
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
    try:
        with log_path.open("w", encoding="utf-8") as log, subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if not quiet:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise HarnessError(f"simulation exceeded {timeout:g} s; log: {log_path}")
            returncode = proc.wait()
    finally:
        _stop_processes_under(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
    return SimulationResult(run_dir=run_dir, returncode=returncode, log_path=log_path,
                            seconds=time.monotonic() - started)
