"""A local rehearsal of a deployment: the real Deployment Engine, all on 127.0.0.1.

It follows docs/deployment.md with this checkout's ``fedsft`` (``python -m
deployment.cli``) and the scripts it generates; only the ports differ (free loopback
ports, given with the commands' port options). The documented steps it runs:

1. ``fedsft create DIR --name fedsft-rehearsal --address 127.0.0.1:P --local-port L
   --app-index-port A --site ...`` (the CA fingerprint is read from its output, as a
   site admin hears it);
2. ``bash DIR/superlink/start-superlink.sh`` (the SuperLink on 127.0.0.1:L with TLS,
   SuperNode authentication and ``--database superlink/state.db``; Caddy on P, Fleet
   API only; it binds 127.0.0.1 because the address is a loopback one);
3. ``fedsft register DIR SITE`` for every site;
4. ``fedsft bundle DIR SITE --data-path F [--text-column C --label-column C] --port N``
   (each site its own ClientApp port: they share this host);
5. ``fedsft sites DIR``;
6. ``FEDSFT_CA_FINGERPRINT=<fingerprint> sh DIR/sites/SITE/start-supernode.sh`` (the
   fingerprint check, the data check, then ``flower-supernode`` with the bundle's own
   ``FLWR_HOME``): a site whose file is missing is refused there (exit 2), and the run
   goes on with the others (``min-nodes`` = the sites that started, unless given);
7. ``fedsft submit DIR --set k=v ... --app APP`` (signed, streamed, its exit code);
8. with ``restart=True``: the same run again, the SuperLink's host "crashes" (SIGKILL of
   ``start-superlink.sh`` and its children) once round 1 is recorded, step 2 again (same
   database), and ``fedsft submit DIR --set resume-from=<run folder> ...`` (the
   documented resume command: the first run's settings but ``run-name``): it must end
   with the first run's final weights, bit for bit.

``fedsft export RUN OUT --consortium DIR`` and ``fedsft predict`` are run by the test
(tests/deployment/test_rehearsal.py) on the result. Not through the CLI: the restarted
run's first attempt and the attack runs are submitted with ``flwr run`` (the attack
apps are what ``fedsft submit`` would never send).

While the run goes on, a site tries the Control API through the public port with what
its bundle holds (``flwr`` with the bundle's ``ca.pem``): register a key, unregister
another site, submit a run, list runs, read the run's logs, stop it; each must be
refused by the proxy (403, read from Caddy's access log in the start script's log).
Everything started here is stopped when the rehearsal ends, also on errors and Ctrl-C;
the run folder stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from common.config import NO_DATASET, RunConfig
from common.specs import DataSpec
from common.tasks import get_task, task_info
from deployment import app_signing, pki
from deployment import consortium as cons
from deployment.processes import (
    ProcessError,
    ProcessSet,
    executable,
    flower_env,
    flwr,
    flwr_json,
    free_port,
    started_run_id,
    stop_following,
    wait_for_port,
)
from deployment.registry import site_flwr_home
from deployment.site import FINGERPRINT_ENV
from deployment.site_attacks import Attack, fedsft_on_path, site_attacks, summary
from server.preflight import preflight
from server.results import read_results
from server.run_outputs import resumable_round, run_folder
from server.run_verdict import attempt_outcome, has_final_model, outcome_stamp, run_verdict
from simulations.runner import APP_DIR

_REPO = Path(__file__).resolve().parents[1]  # this checkout: its CLI runs the steps


@dataclass(frozen=True)
class Site:
    """A rehearsal site: its name and its data file (which may be missing, on purpose)."""

    name: str
    data_path: Path
    text_column: str | None = None
    label_column: str | None = None

    @property
    def site_keys(self) -> dict[str, str]:
        """Its node-config column keys (the ones it sets)."""
        return {key: value for key, value in (("text-column", self.text_column),
                                              ("label-column", self.label_column)) if value}


@dataclass(frozen=True)
class AdminAttempt:
    """One Control API call a site tried through the public address, and its fate."""

    name: str  # what it tried, e.g. "stop a run"
    command: tuple[str, ...]  # the ``flwr`` words (after ``flwr``)
    returncode: int  # the CLI's exit code
    refused_paths: tuple[str, ...]  # Control API paths the proxy answered 403 to
    output: str  # the CLI's output (its end)

    @property
    def refused(self) -> bool:
        """The CLI failed and the proxy refused its request: it never reached the SuperLink."""
        return self.returncode != 0 and any(
            path.startswith("/v1/control/") for path in self.refused_paths)


# What a site tries on the Control API (names of :func:`site_admin_calls`' entries).
ADMIN_CALLS = ("stop a run", "read logs", "list runs", "register a key",
               "unregister another site", "submit a run")


def attempts_line(attempts: Sequence[AdminAttempt]) -> str:
    """``admin calls through the site address: N attempted, K refused``."""
    refused = sum(a.refused for a in attempts)
    return (f"admin calls through the site address: {len(attempts)} attempted, "
            f"{refused} refused")


@dataclass(frozen=True)
class RestartCheck:
    """The run done again with a SuperLink crash in the middle, then resumed."""

    run_dir: Path  # the interrupted (then resumed) run's folder
    killed_after_round: int  # the last round recorded with its checkpoint at the kill
    rounds: int  # the run's num-server-rounds
    resume_command: tuple[str, ...]  # ``fedsft submit ...`` as run (after ``fedsft``)
    resume_returncode: int  # that command's exit code
    differing: tuple[str, ...]  # tensors whose final values differ from the reference's
    message: str = ""  # what went wrong, "" when it ended with the reference's weights

    @property
    def ok(self) -> bool:
        """Killed mid-run, resumed to completion, the reference's final weights exactly."""
        return (not self.message and self.resume_returncode == 0 and not self.differing
                and self.killed_after_round < self.rounds)

    def line(self) -> str:
        """One line for the rehearsal's output."""
        same = "identical" if not self.differing else f"{len(self.differing)} tensors differ"
        return (f"SuperLink killed after round {self.killed_after_round} of {self.rounds}, "
                f"restarted; `fedsft {' '.join(self.resume_command[:4])} ...` exit "
                f"{self.resume_returncode}; final weights vs the uninterrupted run: {same}"
                + (f" ({self.message})" if self.message else ""))


@dataclass(frozen=True)
class SiteKillCheck:
    """The run done again with one site's SuperNode killed in the middle."""

    site: str
    node_id: int
    run_dir: Path
    killed_after_round: int  # the last round recorded when its SuperNode was killed
    rounds: int  # the run's num-server-rounds
    problems: tuple[str, ...]  # the later rounds' clients.problems that name the site
    status: str = ""  # the run's outcome.json status ("" when it wrote none)
    message: str = ""  # what went wrong

    @property
    def ok(self) -> bool:
        """Killed mid-run, the run completed without it, and a later round recorded the
        site, by its name and node, as the one that did not answer."""
        return (not self.message and self.status == "completed"
                and self.killed_after_round < self.rounds and bool(self.problems))

    def line(self) -> str:
        """One line for the rehearsal's output."""
        named = self.problems[0] if self.problems else "no round named it"
        return (f"SuperNode of {self.site} killed after round {self.killed_after_round} of "
                f"{self.rounds}; run {self.status or 'not ended'}; recorded: {named}"
                + (f" ({self.message})" if self.message else ""))


@dataclass(frozen=True)
class SiteRefusal:
    """A site whose ``start-supernode.sh`` exited before its SuperNode came online."""

    site: str
    returncode: int  # 2: the fingerprint or the data check refused it
    reason: str  # the script's last ``fedsft: error:`` line (else its last line)

    def line(self) -> str:
        return (f"site {self.site} refused by its start-supernode.sh (exit "
                f"{self.returncode}): {self.reason}")


def distinct_port(taken: set[int], pick: Callable[[], int] = free_port,
                  *, tries: int = 100) -> int:
    """A port from ``pick`` (a free one) that is not in ``taken``; added to it. The
    rehearsal's processes share one host, so two of them must never get the same port
    (``free_port`` may give a port again once its socket is closed).

    Raises ``ProcessError`` if ``tries`` picks all gave taken ports.
    """
    for _ in range(tries):
        if (port := pick()) not in taken:
            taken.add(port)
            return port
    raise ProcessError(f"no free port outside the {len(taken)} taken after {tries} tries")


def running_sites(sites: Sequence[Site], refusals: Sequence[SiteRefusal]) -> list[Site]:
    """The sites whose start script let them start (not refused).

    Raises ``ProcessError`` when there is none: a run would wait for nodes until its
    timeout.
    """
    refused = {r.site for r in refusals}
    running = [s for s in sites if s.name not in refused]
    if not running:
        why = "; ".join(r.line() for r in refusals) or "no sites were given"
        raise ProcessError(f"no site started, so no run can start: {why}")
    return running


def wait_for_sites(rehearsal: Rehearsal, started: Mapping[str, subprocess.Popen[bytes]],
                   *, timeout: float = 240) -> tuple[SiteRefusal, ...]:
    """Wait until each started site script is either online or has exited; the exited.

    Raises
    ------
    ProcessError
        If, after ``timeout``, a script still runs without its SuperNode online.
    """
    deadline = time.monotonic() + timeout
    while True:
        exited = {name: proc.returncode for name, proc in started.items()
                  if proc.poll() is not None}
        online = rehearsal.online_count()
        if online >= len(started) - len(exited):
            break
        if time.monotonic() > deadline:
            raise ProcessError(f"{len(started) - len(exited)} site scripts running but "
                               f"{online} SuperNodes online after {timeout:g} s; logs in "
                               f"{rehearsal.logs}")
        time.sleep(1)
    refusals = []
    for name, code in sorted(exited.items()):
        log = rehearsal.logs / f"supernode-{name}.log"
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        reason = next((x for x in reversed(lines) if "fedsft: error:" in x),
                      lines[-1] if lines else "(no output)")
        refusals.append(SiteRefusal(site=name, returncode=code, reason=reason.strip()))
    return tuple(refusals)


@dataclass(frozen=True)
class RehearsalResult:
    """What a rehearsal leaves behind."""

    run_dir: Path
    returncode: int  # 0 only if the run completed with its final model, no admin call passed
    log_path: Path
    work_dir: Path
    message: str = ""  # why the run did not complete, or which attack got through
    attacks: tuple[Attack, ...] = ()  # the site-side attacks tried (``attacks=True``)
    admin_attempts: tuple[AdminAttempt, ...] = ()  # a site's Control API calls, all refused?
    nodes_after: tuple[int, ...] = ()  # node ids still registered after the run (admin's view)
    runs_after: int = 0  # runs the SuperLink knows after the run (admin's view)
    restart: RestartCheck | None = None  # ``restart=True``: the kill, restart and resume
    refused_sites: tuple[SiteRefusal, ...] = ()  # sites their start script refused
    site_kill: SiteKillCheck | None = None  # ``kill_site``: the SuperNode kill and its record


class Rehearsal:
    """A SuperLink and SuperNodes on loopback; use as a context manager.

    ``work_dir`` receives the consortium folder (made by ``fedsft create``: keys,
    certificates, the SuperLink's state database) and one log per process. The
    SuperLink and its proxy run as ``bash superlink/start-superlink.sh``.
    """

    def __init__(self, work_dir: Path, site_names: Sequence[str]) -> None:
        self.work_dir = work_dir.resolve()
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Every port a process of this rehearsal listens on, kept distinct.
        self.ports: set[int] = set()
        # public (the proxy), local (the admin's), the app index
        self.port, self.local_port, app_index_port = (distinct_port(self.ports)
                                                      for _ in range(3))
        # The documented command; only the ports differ (free ones, on loopback).
        out = self.fedsft(["create", str(self.work_dir / "consortium"),
                           "--name", "fedsft-rehearsal",
                           "--address", f"127.0.0.1:{self.port}",
                           "--local-port", str(self.local_port),
                           "--app-index-port", str(app_index_port),
                           *[w for s in site_names for w in ("--site", s)], "--force"])
        self.consortium = cons.Consortium(self.work_dir / "consortium")
        # What the coordinator tells each site admin out of band: the printed line.
        prefix = "[fedsft] CA SHA-256 fingerprint: "
        fingerprint = next((line.removeprefix(prefix).strip() for line in out.splitlines()
                            if line.startswith(prefix)), None)
        if not fingerprint:
            raise ProcessError(f"`fedsft create` printed no {prefix.strip()!r} line (the "
                               f"fingerprint the sites check); its output: "
                               f"{out.strip()[-2000:]}")
        self.fingerprint = fingerprint
        self.processes = ProcessSet()
        self.superlink: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Rehearsal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.stop_all()

    # --- the documented commands ------------------------------------------------
    def fedsft(self, words: Sequence[str], *, check: bool = True,
               timeout: float = 300) -> str:
        """Run one ``fedsft`` command (this checkout's CLI, ``python -m deployment.cli``,
        as the ``fedsft`` script runs it); returns its output, logged to logs/fedsft.log.

        Raises ``ProcessError`` if it exits non-zero and ``check``.
        """
        result = subprocess.run([sys.executable, "-m", "deployment.cli", *words],
                                cwd=_REPO, capture_output=True, text=True,
                                timeout=timeout, check=False, env=flower_env())
        output = result.stdout + result.stderr
        with (self.logs / "fedsft.log").open("a", encoding="utf-8") as log:
            log.write(f"$ fedsft {' '.join(words)}\n{output}(exit {result.returncode})\n")
        if check and result.returncode != 0:
            raise ProcessError(f"`fedsft {' '.join(words)}` exited {result.returncode}: "
                               f"{output.strip()[-2000:]}")
        return output

    def script_env(self, **extra: str) -> dict[str, str]:
        """The environment of the generated scripts: ``fedsft`` (this checkout),
        ``flower-*`` and ``caddy`` on the PATH; Caddy's data not in ``~/.local``."""
        tools = fedsft_on_path(self.work_dir / "bin")
        path = os.pathsep.join([str(tools), str(Path(sys.executable).parent),
                                os.environ.get("PATH", "")])
        return {**flower_env(PATH=path, XDG_DATA_HOME=str(self.work_dir / "caddy-data")),
                **extra}

    # --- processes --------------------------------------------------------------
    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    @property
    def proxy_log(self) -> Path:
        """Caddy's access log (JSON lines), in the start script's output."""
        return self.superlink_log

    def start_superlink(self) -> None:
        """``bash superlink/start-superlink.sh``: the SuperLink (TLS, SuperNode
        authentication, ``--database``, loopback) and Caddy on the public port."""
        script = self.consortium.root / "superlink" / "start-superlink.sh"
        self.superlink = self.processes.start(
            "superlink", ["bash", str(script)], log_path=self.superlink_log,
            env=self.script_env())
        for port in (self.local_port, self.port):
            wait_for_port(port, proc=self.superlink, log_path=self.superlink_log)

    def crash_superlink(self) -> None:
        """Kill the SuperLink, its ServerApp and the proxy at once (SIGKILL), as a crash
        of the SuperLink's host."""
        if self.superlink is not None:
            self.processes.kill(self.superlink)
            self.superlink = None

    def bundle(self, site: Site) -> None:
        """``fedsft bundle DIR SITE --data-path P [--text-column C] [--label-column C]
        --port N``: the site's data and its own ClientApp port (sites share this host)."""
        words = ["bundle", str(self.consortium.root), site.name,
                 "--data-path", str(site.data_path), "--port",
                 str(distinct_port(self.ports))]
        if site.text_column:
            words += ["--text-column", site.text_column]
        if site.label_column:
            words += ["--label-column", site.label_column]
        self.fedsft(words)

    def start_site(self, site: str) -> subprocess.Popen[bytes]:
        """``FEDSFT_CA_FINGERPRINT=<told out of band> sh sites/<site>/start-supernode.sh``:
        the fingerprint check, the data check, then the SuperNode (its own FLWR_HOME)."""
        script = self.consortium.site_dir(site) / "start-supernode.sh"
        return self.processes.start(
            f"supernode-{site}", ["sh", str(script)],
            log_path=self.logs / f"supernode-{site}.log",
            env=self.script_env(**{FINGERPRINT_ENV: self.fingerprint}))

    def start_supernode(self, site: Site, *, tls: bool = True,
                        give_up_after: float | None = None) -> subprocess.Popen[bytes]:
        """Start a site's ``flower-supernode`` directly, not through its script (for the
        refusal checks); ``tls=False`` tries without TLS or a key (to fail)."""
        command = cons.supernode_command(
            superlink=self.consortium.address, ca_cert=self.consortium.ca_cert,
            private_key=self.consortium.site_key(site.name), data_path=site.data_path,
            site=site.name, runtime_port=distinct_port(self.ports),
            site_keys=site.site_keys,
            max_wait_time=cons.RECONNECT_WAIT_S if give_up_after is None else give_up_after,
            # As the bundle's script: only apps signed by the coordinator, replies audited.
            trusted_entities=self.consortium.site_dir(site.name) / "trusted-entities.yaml",
            audit_egress=True,
        )
        if not tls:
            i = command.index("--root-certificates")
            command[i:i + 4] = ["--insecure"]  # drop the CA and the key too
        return self.processes.start(
            f"supernode-{site.name}", command, log_path=self.logs / f"supernode-{site.name}.log",
            env=flower_env(),
        )

    # --- Flower's node registry -------------------------------------------------
    def register(self, site: str) -> int:
        """``fedsft register DIR SITE``; returns its node id (from registry.json)."""
        self.fedsft(["register", str(self.consortium.root), site])
        return int(self.consortium.registry()[site]["node-id"])

    def unregister(self, site: str) -> None:
        """``fedsft revoke DIR SITE`` (``flwr supernode unregister``)."""
        self.fedsft(["revoke", str(self.consortium.root), site])

    def fedsft_submit(self, run_config: Mapping[str, Any], *, app_dir: Path = APP_DIR,
                      on_line: Callable[[str], None] = print, timeout: float | None = None,
                      log_name: str = "flwr-run.log") -> tuple[int, Path]:
        """``fedsft submit DIR --app APP --set k=v ...`` (the documented command: it
        signs the app, serves it to the SuperLink, streams the log and exits 0 only for a
        completed run), each output line passed on; returns its exit code and log."""
        words = [*submit_words(self.consortium.root, run_config), "--app", str(app_dir)]
        log_path = self.logs / log_name
        deadline = None if timeout is None else time.monotonic() + timeout
        with log_path.open("w", encoding="utf-8") as log, subprocess.Popen(
            [sys.executable, "-m", "deployment.cli", *words], cwd=_REPO,
            env=flower_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, errors="replace",
        ) as proc:
            try:
                return _stream(proc, log, on_line, deadline=deadline, timeout=timeout), log_path
            finally:
                # submit stops serving the app and following the run; the run goes on at
                # the SuperLink (as submit says) until the rehearsal ends and stops the
                # SuperLink with every other process it started.
                stop_following(proc, grace=10)

    def runs(self) -> list[dict[str, Any]]:
        """``flwr list`` (the admin's connection): every run the SuperLink knows."""
        return list(flwr_json(["list"], flwr_home=self.consortium.flwr_home)["runs"])

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: node id, status, ..."""
        return list(flwr_json(["supernode", "list"], flwr_home=self.consortium.flwr_home)
                    ["nodes"])

    def online_count(self) -> int:
        """SuperNodes online; 0 while the SuperLink does not answer yet (a restart)."""
        try:
            return sum(n["status"] == "online" for n in self.nodes())
        except ProcessError:
            return 0

    def wait_online(self, count: int, *, timeout: float = 60) -> None:
        """Wait until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_count() >= count:
                return
            time.sleep(1)
        raise ProcessError(f"fewer than {count} SuperNodes online after {timeout:g} s: "
                           f"{self.nodes()}; logs in {self.logs}")

    # --- the run ----------------------------------------------------------------
    def submit(
        self,
        run_config: Mapping[str, Any],
        *,
        app_dir: Path = APP_DIR,
        on_line: Callable[[str], None] = print,
        timeout: float | None = None,
        index: app_signing.AppIndex | None = None,
        signed: bool = True,
        stream: bool = True,
        log_name: str = "flwr-run.log",
    ) -> tuple[int, Path]:
        """``flwr run`` the app signed (as ``fedsft submit``), or ``signed=False`` as a
        folder (unsigned: SuperNodes refuse it); returns its exit code and log path.

        ``index``: serve this (signed) FAB instead of the app folder's, signed with the
        consortium's key. ``stream=False`` returns once the run is started.
        """
        overrides = self.work_dir / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        log_path = self.logs / log_name
        if signed and index is None:
            index = cons.signed_app_index(self.consortium, app_dir)
        target = index.spec if signed and index is not None else str(app_dir)
        command = [executable("flwr"), "run", target, cons.CONNECTION,
                   *(["--stream"] if stream else []), "--run-config", str(overrides)]
        deadline = None if timeout is None else time.monotonic() + timeout
        serving = index if signed and index is not None else contextlib.nullcontext()
        with serving, log_path.open("w", encoding="utf-8") as log, subprocess.Popen(
            command, env=flower_env(self.consortium.flwr_home), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=app_dir,
        ) as proc:
            try:
                return _stream(proc, log, on_line, deadline=deadline, timeout=timeout), log_path
            finally:
                if proc.poll() is None:
                    proc.kill()


def _stream(proc: subprocess.Popen[str], log: IO[str], on_line: Callable[[str], None], *,
            deadline: float | None, timeout: float | None) -> int:
    """Copy ``proc``'s output to ``log`` and ``on_line`` line by line until it exits;
    returns its exit code. Raises ``ProcessError`` once ``deadline`` (monotonic) passes."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        log.flush()
        on_line(line.rstrip("\n"))
        if deadline is not None and time.monotonic() > deadline:
            raise ProcessError(f"the run exceeded {timeout:g} s; log {log.name}")
    return proc.wait()


def site_admin_calls(*, other_node_id: int, run_id: int, rogue_key: Path,
                     app_dir: Path) -> list[tuple[str, list[str]]]:
    """The Control API calls a site tries, as ``flwr`` CLI words: (what, command).

    The run-specific ones come first, while the run is surely still going on.
    """
    return [
        ("stop a run", ["stop", str(run_id)]),
        ("read logs", ["log", str(run_id)]),
        ("list runs", ["list"]),
        ("register a key", ["supernode", "register", str(rogue_key)]),
        ("unregister another site", ["supernode", "unregister", str(other_node_id)]),
        ("submit a run", ["run", str(app_dir), cons.CONNECTION]),
    ]


def refused_paths(log_lines: Sequence[str]) -> tuple[str, ...]:
    """The request paths the proxy answered 403 to, from lines of its access log (JSON)."""
    paths = []
    for line in log_lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (isinstance(entry, dict) and entry.get("status") == 403
                and str(entry.get("logger", "")).startswith("http.log.access")):
            paths.append(str(entry.get("request", {}).get("uri", "")))
    return tuple(paths)


def try_admin_calls_as_site(
    rehearsal: Rehearsal, site: str, *, other_node_id: int, run_id: int, app_dir: Path,
) -> tuple[AdminAttempt, ...]:
    """Make every Control API call of :func:`site_admin_calls` as ``site`` would.

    Each is a real ``flwr`` command through the public (proxy) address, with a
    ``FLWR_HOME`` holding only the site's bundle ``ca.pem``; the proxy's access log
    tells which requests it refused.
    """
    folder = rehearsal.work_dir / f"as-{site}"
    home = site_flwr_home(rehearsal.consortium, site, folder / "flwr-home")
    rogue_key = folder / "rogue.pub"  # a key the site would like to have admitted
    pki.write_public(rogue_key, pki.ssh_public(pki.new_key(), comment="rogue"), force=True)
    attempts = []
    for name, command in site_admin_calls(other_node_id=other_node_id, run_id=run_id,
                                          rogue_key=rogue_key, app_dir=app_dir):
        seen = _line_count(rehearsal.proxy_log)
        try:
            result = flwr(command, flwr_home=home, check=False, timeout=120)
            returncode, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as error:  # e.g. `flwr log` following a stream
            returncode, output = -1, f"timed out: {error}"
        new_lines = rehearsal.proxy_log.read_text(errors="replace").splitlines()[seen:]
        attempts.append(AdminAttempt(name=name, command=tuple(command),
                                     returncode=returncode,
                                     refused_paths=refused_paths(new_lines),
                                     output=output.strip()[-1000:]))
    return tuple(attempts)


def _line_count(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


def submit_words(consortium_dir: Path, run_config: Mapping[str, Any]) -> list[str]:
    """``fedsft submit DIR --set k=v ...`` (the words after ``fedsft``) for a run config.

    Strings are written as TOML strings, so that ``--set`` reads back the same values.
    """
    words = ["submit", str(consortium_dir)]
    for key, value in run_config.items():
        text = (json.dumps(value) if isinstance(value, str)
                else str(value).lower() if isinstance(value, bool) else repr(value))
        words += ["--set", f"{key}={text}"]
    return words


def final_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint's tensors (global exchanged state and strategy state)."""
    from safetensors.numpy import load_file

    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    if not checkpoints:
        raise ProcessError(f"{run_dir} has no checkpoint")
    return dict(load_file(str(checkpoints[-1])))


def differing_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, ...]:
    """Names whose tensors are not bit-identical (or present in only one)."""
    return tuple(sorted(k for k in set(a) | set(b)
                        if k not in a or k not in b or a[k].dtype != b[k].dtype
                        or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()))


def restart_and_resume(
    rehearsal: Rehearsal, run_config: Mapping[str, Any], *, reference: Path,
    sites: int, app_dir: Path, on_line: Callable[[str], None], timeout: float = 600,
) -> RestartCheck:
    """Do the run of ``run_config`` again as ``<run-name>-restarted``; kill the SuperLink
    once round 1 is recorded, restart it (same database), wait for the SuperNodes to
    reconnect, resume with ``fedsft submit DIR --set resume-from=<folder> ...`` (the
    documented command, same settings) and compare its final weights with
    ``reference``'s (the uninterrupted run's folder).
    """
    config = {**run_config, "run-name": f"{run_config['run-name']}-restarted"}
    run_dir = run_folder(RunConfig.from_flower(config))
    rounds = int(config.get("num-server-rounds", RunConfig().num_server_rounds))

    def check(killed: int, code: int, words: list[str], message: str = "",
              differing: tuple[str, ...] = ()) -> RestartCheck:
        return RestartCheck(run_dir=run_dir, killed_after_round=killed, rounds=rounds,
                            resume_command=tuple(words), resume_returncode=code,
                            differing=differing, message=message)

    code, _ = rehearsal.submit(config, app_dir=app_dir, stream=False,
                               log_name="restart-run.log", on_line=on_line)
    if code != 0:
        return check(0, code, [], f"`flwr run` exited {code}")
    deadline = time.monotonic() + timeout
    while (resumable_round(run_dir) or 0) < 1:
        if time.monotonic() > deadline:
            return check(0, -1, [], f"round 1 not recorded after {timeout:g} s")
        time.sleep(0.2)
    rehearsal.crash_superlink()
    killed = resumable_round(run_dir) or 0
    on_line(f"[fedsft] SuperLink killed (SIGKILL) with round {killed} of {rounds} "
            f"recorded in {run_dir}; restarting it")
    rehearsal.start_superlink()
    rehearsal.wait_online(sites, timeout=180)
    resume = {k: v for k, v in run_config.items() if k != "run-name"}
    words = [*submit_words(rehearsal.consortium.root, {"resume-from": str(run_dir), **resume}),
             "--app", str(app_dir)]
    on_line(f"[fedsft] resuming: fedsft {' '.join(words)}")
    log_path = rehearsal.logs / "resume-submit.log"
    with log_path.open("w", encoding="utf-8") as log:
        # This checkout's CLI (`python -m deployment.cli`), as the `fedsft` script runs it.
        proc = subprocess.run([sys.executable, "-m", "deployment.cli", *words],
                              cwd=Path(__file__).resolve().parents[1], stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False,
                              env=flower_env())
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        on_line(line)
    if proc.returncode != 0:
        return check(killed, proc.returncode, words, f"resume failed; log {log_path}")
    return check(killed, 0, words, differing=differing_tensors(
        final_checkpoint(reference), final_checkpoint(run_dir)))


def kill_a_site(
    rehearsal: Rehearsal, run_config: Mapping[str, Any], *, site: str, node_id: int,
    process: subprocess.Popen[bytes], sites: int, app_dir: Path,
    on_line: Callable[[str], None], timeout: float = 600,
) -> SiteKillCheck:
    """Do the run of ``run_config`` again as ``<run-name>-site-killed`` with one more
    round and ``min-nodes`` one less; kill ``site``'s SuperNode (``process``, SIGKILL:
    its host failing) once round 1 is recorded; wait for the run's end and collect the
    later rounds' problems that name the site (``site (node N)``): Flower answers for a
    node that stopped its heartbeats with a "Node Unavailable" error reply, and a node
    that just never replies is named when the round times out.
    """
    rounds = int(run_config.get("num-server-rounds", RunConfig().num_server_rounds)) + 1
    config = {**run_config, "run-name": f"{run_config['run-name']}-site-killed",
              "num-server-rounds": rounds, "min-nodes": max(1, sites - 1)}
    run_dir = run_folder(RunConfig.from_flower(config))

    def check(killed: int, message: str = "", status: str = "",
              problems: tuple[str, ...] = ()) -> SiteKillCheck:
        return SiteKillCheck(site=site, node_id=node_id, run_dir=run_dir,
                             killed_after_round=killed, rounds=rounds, problems=problems,
                             status=status, message=message)

    code, _ = rehearsal.submit(config, app_dir=app_dir, stream=False,
                               log_name="site-kill-run.log", on_line=on_line)
    if code != 0:
        return check(0, f"`flwr run` exited {code}")
    deadline = time.monotonic() + timeout
    while (resumable_round(run_dir) or 0) < 1:
        if time.monotonic() > deadline:
            return check(0, f"round 1 not recorded after {timeout:g} s")
        time.sleep(0.2)
    rehearsal.processes.kill(process)
    killed = resumable_round(run_dir) or 0
    on_line(f"[fedsft] SuperNode of {site} (node {node_id}) killed (SIGKILL) with round "
            f"{killed} of {rounds} recorded; the run goes on without it")
    while (outcome := attempt_outcome(run_dir, stamp_before=None)) is None:
        if time.monotonic() > deadline:
            return check(killed, f"the run did not end within {timeout:g} s")
        time.sleep(1)
    name = f"{site} (node {node_id})"
    problems = tuple(problem for row in read_results(run_dir / "results.jsonl")
                     if row.round > killed and row.clients is not None
                     for problem in row.clients.problems if name in problem)
    return check(killed, status=str(outcome.get("status", "")), problems=problems)


def labels_of(sites: Sequence[Site], cfg: RunConfig) -> str:
    """The classes found in the readable site files, as a ``labels`` value."""
    files = [
        (str(site.data_path), DataSpec.of(cfg.replace(
            text_column=site.text_column or cfg.text_column,
            label_column=site.label_column or cfg.label_column)))
        for site in sites if site.data_path.is_file()
    ]
    return ",".join(get_task(cfg.task).label_names_of_files(files, source="the site files"))


def rehearse(
    sites: Sequence[Site],
    run_config: Mapping[str, Any],
    *,
    work_dir: Path,
    app_dir: Path = APP_DIR,
    on_line: Callable[[str], None] = print,
    timeout: float | None = None,
    attacks: bool = False,
    try_admin_calls: bool = True,
    restart: bool = False,
    kill_site: str | None = None,
) -> RehearsalResult:
    """Run the app once across ``sites`` on a local, secured deployment.

    With ``try_admin_calls`` the first site tries every Control API call of
    :func:`site_admin_calls` through the public address while the run goes on; the
    result's ``returncode`` is non-zero unless every one was refused.
    ``attacks``: after the run, try the site-side attacks (deployment/site_attacks.py:
    unsigned and foreign-signed apps, a modified app, a tampered bundle) and print
    ``attacks: N attempted, N refused``.
    ``restart``: after the run, do it again, kill the SuperLink mid-run, restart it and
    resume (:func:`restart_and_resume`); the result's ``returncode`` is non-zero unless
    the resumed run ends with the first run's final weights exactly.
    ``kill_site``: last, do the run again with one more round and kill that site's
    SuperNode mid-run (:func:`kill_a_site`); the result's ``returncode`` is non-zero
    unless the run completes and a later round names the site as the one that failed.

    ``run_config`` must name the run folder (``output-dir``, ``run-name``); ``output-dir``
    is made absolute (the ServerApp runs in another working directory). ``labels``
    defaults to the classes of the site files (task sft: ``dataset`` to ``"none"``);
    ``min-nodes`` to the number of sites whose start script let them start; when none
    did, ``ProcessError`` names each refusal (no run is submitted).
    The run is preflighted (``server.preflight``) before any process starts, and the
    result's ``returncode`` is 0 only if this attempt completed with its final model.
    """
    run_config = dict(run_config)
    if "output-dir" not in run_config or "run-name" not in run_config:
        raise ValueError("run_config must set `output-dir` and `run-name`")
    if kill_site is not None and kill_site not in {site.name for site in sites}:
        raise ValueError(f"kill_site {kill_site!r} is not one of the sites "
                         f"({', '.join(site.name for site in sites)})")
    run_config["output-dir"] = str(Path(str(run_config["output-dir"])).expanduser().resolve())
    if run_config.get("resume-from"):
        run_config["resume-from"] = str(Path(str(run_config["resume-from"])).expanduser()
                                        .resolve())
    cfg = RunConfig.from_flower(run_config)  # fail here, not in the ServerApp
    info = task_info(cfg.task)
    if info.has_classes:  # the sites' classes; a task without classes has none
        run_config.setdefault("labels", labels_of(sites, cfg))
    if info.deploy_without_dataset:  # no central evaluation on built-in examples
        run_config.setdefault("dataset", NO_DATASET)
    min_nodes_given = "min-nodes" in run_config
    run_config.setdefault("min-nodes", len(sites))
    cfg = RunConfig.from_flower(run_config)
    if restart:  # the resumed attempt's config, refused (e.g. fedsa) before anything runs
        cfg.replace(resume_from=str(Path(cfg.output_dir) / f"{cfg.run_name}-restarted"))
    for note in preflight(cfg, num_partitions=None):  # before any process starts
        on_line(f"[fedsft] preflight: {note}")
    run_dir = run_folder(cfg)
    stamp_before = outcome_stamp(run_dir)
    attempts: list[AdminAttempt] = []
    with Rehearsal(work_dir, [s.name for s in sites]) as rehearsal:
        rehearsal.start_superlink()
        on_line(f"[fedsft] SuperLink on 127.0.0.1:{rehearsal.local_port} (TLS, node auth, "
                f"admin only); proxy on 127.0.0.1:{rehearsal.port} (Fleet API only)")
        node_ids = {}
        for site in sites:
            node_ids[site.name] = rehearsal.register(site.name)
            on_line(f"[fedsft] registered site {site.name} as node {node_ids[site.name]}")
        for site in sites:
            rehearsal.bundle(site)
        on_line(rehearsal.fedsft(["sites", str(rehearsal.consortium.root)]).rstrip())
        started = {site.name: rehearsal.start_site(site.name) for site in sites}
        refusals = wait_for_sites(rehearsal, started)
        for refusal in refusals:
            on_line(f"[fedsft] {refusal.line()}")
        running = running_sites(sites, refusals)  # raises when none: no run could start
        if not min_nodes_given:  # the sites whose start script let them start
            run_config["min-nodes"] = len(running)
        on_line(f"[fedsft] {len(running)} SuperNodes online; submitting the run")

        attacker: threading.Thread | None = None
        if try_admin_calls and sites:
            attacker_site, other = sites[0].name, sites[-1].name  # the first tries the last

            def attack(run_id: int) -> None:
                attempts.extend(try_admin_calls_as_site(
                    rehearsal, attacker_site, other_node_id=node_ids[other], run_id=run_id,
                    app_dir=app_dir))

        def watch(line: str) -> None:
            nonlocal attacker
            on_line(line)
            run_id = started_run_id(line)
            if try_admin_calls and sites and run_id is not None and attacker is None:
                attacker = threading.Thread(target=attack, args=(run_id,), daemon=True)
                attacker.start()

        returncode, log_path = rehearsal.fedsft_submit(run_config, app_dir=app_dir,
                                                       on_line=watch, timeout=timeout)
        if attacker is not None:
            attacker.join(timeout=900)
        if try_admin_calls:
            for attempt in attempts:
                on_line(f"[fedsft] {attempt.name} as site {sites[0].name}: `flwr "
                        f"{' '.join(attempt.command)}` through the public address: "
                        f"{'refused' if attempt.refused else 'NOT REFUSED'} "
                        f"(exit {attempt.returncode}, proxy refused "
                        f"{', '.join(attempt.refused_paths) or 'nothing'})")
            on_line(f"[fedsft] {attempts_line(attempts)}")
        nodes_after = tuple(sorted(int(n["node-id"]) for n in rehearsal.nodes()
                                   if n["status"] != "unregistered"))
        runs_after = len(rehearsal.runs())
        restarted: RestartCheck | None = None
        if restart:
            restarted = restart_and_resume(rehearsal, run_config, reference=run_dir,
                                           sites=len(running), app_dir=app_dir,
                                           on_line=on_line)
            on_line(f"[fedsft] {restarted.line()}")
        tried: list[Attack] = []
        if attacks:
            tried = site_attacks(rehearsal, [s.name for s in running], run_config,
                                 app_dir=app_dir, on_line=on_line)
            on_line(f"[fedsft] {summary(tried)}")
        killed_site: SiteKillCheck | None = None
        if kill_site is not None and kill_site not in {site.name for site in running}:
            killed_site = SiteKillCheck(
                site=kill_site, node_id=node_ids[kill_site], run_dir=run_dir,
                killed_after_round=0, rounds=0, problems=(),
                message="its start script refused it: no SuperNode to kill")
        elif kill_site is not None:
            killed_site = kill_a_site(
                rehearsal, run_config, site=kill_site, node_id=node_ids[kill_site],
                process=started[kill_site], sites=len(running), app_dir=app_dir,
                on_line=on_line)
            on_line(f"[fedsft] {killed_site.line()}")
    # `flwr run --stream` exits 0 also when the ServerApp failed: the run folder says.
    ok, message = run_verdict(
        returncode=returncode, outcome=attempt_outcome(run_dir, stamp_before=stamp_before),
        final_model=has_final_model(run_dir),
        log_text=log_path.read_text(encoding="utf-8", errors="replace"), log_path=log_path,
    )
    passed = [a.name for a in attempts if not a.refused]
    if ok and (passed or (try_admin_calls and len(attempts) != len(ADMIN_CALLS))):
        ok = False
        message = (f"admin calls through the site address not refused: {', '.join(passed)}"
                   if passed else f"{attempts_line(attempts)}, of {len(ADMIN_CALLS)} to try")
    if ok and any(not a.refused for a in tried):
        ok, message = False, summary(tried)
    if ok and restarted is not None and not restarted.ok:
        ok, message = False, restarted.line()
    if ok and killed_site is not None and not killed_site.ok:
        ok, message = False, killed_site.line()
    return RehearsalResult(run_dir=run_dir, returncode=0 if ok else (returncode or 1),
                           log_path=log_path, work_dir=work_dir, message=message,
                           attacks=tuple(tried), admin_attempts=tuple(attempts),
                           nodes_after=nodes_after, runs_after=runs_after,
                           restart=restarted, refused_sites=refusals,
                           site_kill=killed_site)
