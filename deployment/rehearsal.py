"""A local rehearsal of a deployment: the real Deployment Engine, all on 127.0.0.1.

One SuperLink with TLS and SuperNode authentication on its own loopback port, Caddy in
front of it on the public port (the Fleet API only: ``deployment/proxy.py``), one
SuperNode per site (each with its own data file and key) connecting to the public port,
the sites registered with ``flwr supernode register`` and the run submitted with
``flwr run`` through the coordinator's ``FLWR_HOME`` (the loopback port). While the run
goes on, a site tries the Control API through the public port with what its bundle
holds (``flwr`` with the bundle's ``ca.pem``): register a key, unregister another site,
submit a run, list runs, read the run's logs, stop it; each must be refused by the proxy
(403). Everything started here is stopped when the rehearsal ends, also on errors and
Ctrl-C; the run folder stays. With ``restart=True`` the same run is done a second time
and the SuperLink is killed once its first round is recorded, restarted, and the run
resumed with the documented command (``fedsft submit DIR --set resume-from=...``): it
must end with the first run's final weights, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import NO_DATASET, RunConfig
from common.specs import DataSpec
from common.tasks import get_task
from deployment import app_signing, pki, proxy
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
    wait_for_port,
)
from deployment.site_attacks import Attack, site_attacks, summary
from server.preflight import preflight
from server.run_outputs import resumable_round, run_folder
from server.run_verdict import attempt_outcome, has_final_model, outcome_stamp, run_verdict
from simulations.runner import APP_DIR


@dataclass(frozen=True)
class Site:
    """A rehearsal site: its name and its data file (which may be missing, on purpose)."""

    name: str
    data_path: Path
    text_column: str | None = None
    label_column: str | None = None


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


class Rehearsal:
    """A SuperLink and SuperNodes on loopback; use as a context manager.

    ``work_dir`` receives the consortium folder (keys, certificates), the SuperLink's
    state database and one log per process.
    """

    def __init__(self, work_dir: Path, site_names: Sequence[str]) -> None:
        self.work_dir = work_dir.resolve()
        self.port = free_port()  # public: the proxy, what SuperNodes (and sites) reach
        self.local_port = free_port()  # the SuperLink's own, loopback: the admin's
        while self.local_port == self.port:
            self.local_port = free_port()
        self.consortium = cons.create(
            self.work_dir / "consortium", name="fedsft-rehearsal", names=pki.Names(),
            address=f"127.0.0.1:{self.port}", sites=tuple(site_names), force=True,
            app_index_port=free_port(),
            local_port=self.local_port,
        )
        self.logs = self.work_dir / "logs"
        self.processes = ProcessSet()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Rehearsal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.stop_all()

    # --- processes --------------------------------------------------------------
    def start_superlink(self) -> None:
        """Start the SuperLink (TLS, SuperNode authentication, loopback) and its proxy.

        The proxy is started once and outlives a SuperLink restart (it answers 502
        meanwhile, which SuperNodes retry).
        """
        command = cons.superlink_command(
            self.consortium, port=self.local_port,
            database=str(self.work_dir / "superlink-state.db"),
        )
        log = self.logs / "superlink.log"
        self.superlink = self.processes.start(
            "superlink", command, log_path=log,
            env={**flower_env(), **cons.superlink_signing_env(self.consortium)})
        wait_for_port(self.local_port, proc=self.superlink, log_path=log)
        if self.proxy is None or self.proxy.poll() is not None:
            self.start_proxy()

    @property
    def proxy_log(self) -> Path:
        return self.logs / "proxy.log"

    def start_proxy(self) -> None:
        """Start Caddy on the public port (127.0.0.1 here) with the generated Caddyfile."""
        caddyfile = self.work_dir / "Caddyfile"
        caddyfile.write_text(proxy.caddyfile(cons.proxy_settings(
            self.consortium, listen_port=self.port, listen_host="127.0.0.1")),
            encoding="utf-8")
        self.proxy = self.processes.start(
            "proxy", proxy.caddy_command(caddyfile),
            log_path=self.proxy_log,
            env=flower_env(XDG_DATA_HOME=str(self.work_dir / "caddy-data")))  # not ~/.local
        wait_for_port(self.port, proc=self.proxy, log_path=self.proxy_log)

    def crash_superlink(self) -> None:
        """Kill the SuperLink and its ServerApp process at once (SIGKILL), as a crash."""
        if self.superlink is not None:
            self.processes.kill(self.superlink)
            self.superlink = None

    def start_supernode(self, site: Site, *, tls: bool = True,
                        give_up_after: float | None = None) -> subprocess.Popen[bytes]:
        """Start a site's SuperNode; ``tls=False`` tries without TLS or a key (to fail)."""
        command = cons.supernode_command(
            superlink=self.consortium.address, ca_cert=self.consortium.ca_cert,
            private_key=self.consortium.site_key(site.name), data_path=site.data_path,
            site=site.name, runtime_port=free_port(), text_column=site.text_column,
            label_column=site.label_column,
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
        """``flwr supernode register`` the site's public key; returns its node id."""
        return register_site(self.consortium, site)

    def unregister(self, site: str) -> None:
        """``flwr supernode unregister`` the site (revocation)."""
        revoke_site(self.consortium, site)

    def runs(self) -> list[dict[str, Any]]:
        """``flwr list`` (the admin's connection): every run the SuperLink knows."""
        return list(flwr_json(["list"], flwr_home=self.consortium.flwr_home)["runs"])

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: node id, status, ..."""
        return list(flwr_json(["supernode", "list"], flwr_home=self.consortium.flwr_home)
                    ["nodes"])

    def wait_online(self, count: int, *, timeout: float = 60) -> None:
        """Wait until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(n["status"] == "online" for n in self.nodes()) >= count:
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
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    on_line(line.rstrip("\n"))
                    if deadline is not None and time.monotonic() > deadline:
                        raise ProcessError(f"the run exceeded {timeout:g} s; log {log_path}")
                return proc.wait(), log_path
            finally:
                if proc.poll() is None:
                    proc.kill()


def register_site(c: cons.Consortium, site: str) -> int:
    """Register a site's public key with the SuperLink; remember its node id.

    A site whose current key was revoked is refused with the way back: Flower never
    accepts a revoked public key again, so re-admitting it takes a new key pair
    (``fedsft add-site DIR SITE --force --register``). A new key of a registered site
    (a rotation) is registered and the old node id kept under ``replaced-node-ids``, to
    be unregistered once the site runs with the new key.

    Raises
    ------
    ConsortiumError
        If the site's key was revoked, or the SuperLink's reply gives no node id.
    """
    public_key = c.site_pub(site).read_text(encoding="utf-8").strip()
    registry = c.registry()
    entry = dict(registry.get(site) or {})
    if entry.get("revoked") and entry.get("public-key") == public_key:
        raise cons.ConsortiumError(
            f"site {site!r}: its key was revoked (node {entry['node-id']}) and Flower "
            f"never accepts a revoked key again; re-admit the site with a new key: "
            f"`fedsft add-site {c.root} {site} --force --register`, then send it the "
            f"new bundle")
    reply = flwr_json(["supernode", "register", str(c.site_pub(site))], flwr_home=c.flwr_home)
    if not isinstance(reply, dict) or "node-id" not in reply:
        raise cons.ConsortiumError(
            f"`flwr supernode register` of site {site!r} gave no node id: {reply}")
    node_id = int(reply["node-id"])
    replaced = list(entry.get("replaced-node-ids", []))
    if "node-id" in entry and not entry.get("revoked") and entry["node-id"] != node_id:
        replaced.append(int(entry["node-id"]))  # still registered: unregister it later
    registry[site] = {"node-id": node_id, "public-key": public_key,
                      **({"replaced-node-ids": replaced} if replaced else {})}
    c.save_registry(registry)
    return node_id


def revoke_site(c: cons.Consortium, site: str) -> int:
    """Unregister a site's node id from the SuperLink; returns the id.

    The registry keeps the site, marked ``revoked``, so that ``register`` can tell a
    revoked key from a new one.
    """
    registry = c.registry()
    entry = registry.get(site)
    if entry is None:
        raise cons.ConsortiumError(f"site {site!r} is not registered (registry.json)")
    if entry.get("revoked"):
        raise cons.ConsortiumError(f"site {site!r} is already revoked "
                                   f"(node {entry['node-id']})")
    node_id = int(entry["node-id"])
    flwr(["supernode", "unregister", str(node_id)], flwr_home=c.flwr_home)
    registry[site] = {**entry, "revoked": True}
    c.save_registry(registry)
    return node_id


def site_flwr_home(c: cons.Consortium, site: str, folder: Path) -> Path:
    """A ``FLWR_HOME`` made of what the site's bundle holds: the address, ``ca.pem``.

    This is the connection a site would write to try the Control API itself.
    """
    cons.write_flwr_config(folder, address=c.address, ca_cert=c.site_dir(site) / "ca.pem")
    return folder


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

    ``run_config`` must name the run folder (``output-dir``, ``run-name``); ``output-dir``
    is made absolute (the ServerApp runs in another working directory). ``labels``
    defaults to the classes of the site files (task sft: ``dataset`` to ``"none"``);
    ``min-nodes`` to the number of sites.
    The run is preflighted (``server.preflight``) before any process starts, and the
    result's ``returncode`` is 0 only if this attempt completed with its final model.
    """
    run_config = dict(run_config)
    if "output-dir" not in run_config or "run-name" not in run_config:
        raise ValueError("run_config must set `output-dir` and `run-name`")
    run_config["output-dir"] = str(Path(str(run_config["output-dir"])).expanduser().resolve())
    if run_config.get("resume-from"):
        run_config["resume-from"] = str(Path(str(run_config["resume-from"])).expanduser()
                                        .resolve())
    cfg = RunConfig.from_flower(run_config)  # fail here, not in the ServerApp
    if cfg.task == "classification":  # the sites' classes; a task without classes has none
        run_config.setdefault("labels", labels_of(sites, cfg))
    else:  # the data is only at the sites: no central evaluation on built-in examples
        run_config.setdefault("dataset", NO_DATASET)
    run_config.setdefault("min-nodes", len(sites))
    cfg = RunConfig.from_flower(run_config)
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
            rehearsal.start_supernode(site)
        rehearsal.wait_online(len(sites))
        on_line(f"[fedsft] {len(sites)} SuperNodes online; submitting the run")

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

        returncode, log_path = rehearsal.submit(run_config, app_dir=app_dir,
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
                                           sites=len(sites), app_dir=app_dir,
                                           on_line=on_line)
            on_line(f"[fedsft] {restarted.line()}")
        tried: list[Attack] = []
        if attacks:
            tried = site_attacks(rehearsal, [s.name for s in sites], run_config,
                                 app_dir=app_dir, on_line=on_line)
            on_line(f"[fedsft] {summary(tried)}")
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
    return RehearsalResult(run_dir=run_dir, returncode=0 if ok else (returncode or 1),
                           log_path=log_path, work_dir=work_dir, message=message,
                           attacks=tuple(tried), admin_attempts=tuple(attempts),
                           nodes_after=nodes_after, runs_after=runs_after,
                           restart=restarted)
