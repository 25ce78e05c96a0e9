"""A local rehearsal of a deployment: the real Deployment Engine, all on 127.0.0.1.

One SuperLink with TLS and SuperNode authentication, one SuperNode per site (each with
its own data file and key), the sites registered with ``flwr supernode register``, the
run submitted with ``flwr run`` through a private ``FLWR_HOME`` whose connection trusts
the consortium CA. Everything started here is stopped when the rehearsal ends, also on
errors and Ctrl-C; the run folder stays.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import NO_DATASET, RunConfig
from common.data import build_label_names, read_table
from deployment import consortium as cons
from deployment import pki
from deployment.processes import (
    ProcessError,
    ProcessSet,
    executable,
    flower_env,
    flwr,
    flwr_json,
    free_port,
    wait_for_port,
)
from server.preflight import preflight
from server.run_outputs import run_folder
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
class RehearsalResult:
    """What a rehearsal leaves behind."""

    run_dir: Path
    returncode: int  # 0 only if the run completed (outcome.json) with its final model
    log_path: Path
    work_dir: Path
    message: str = ""  # why the run did not complete


class Rehearsal:
    """A SuperLink and SuperNodes on loopback; use as a context manager.

    ``work_dir`` receives the consortium folder (keys, certificates), the SuperLink's
    state database and one log per process.
    """

    def __init__(self, work_dir: Path, site_names: Sequence[str]) -> None:
        self.work_dir = work_dir.resolve()
        self.port = free_port()
        self.consortium = cons.create(
            self.work_dir / "consortium", name="fedsft-rehearsal", names=pki.Names(),
            address=f"127.0.0.1:{self.port}", sites=tuple(site_names), force=True,
        )
        self.logs = self.work_dir / "logs"
        self.processes = ProcessSet()
        self.superlink: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Rehearsal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.stop_all()

    # --- processes --------------------------------------------------------------
    def start_superlink(self) -> None:
        """Start the SuperLink (TLS, SuperNode authentication) and wait for its port."""
        command = cons.superlink_command(
            self.consortium, port=self.port,
            database=str(self.work_dir / "superlink-state.db"),
        )
        command[command.index("--host") + 1] = "127.0.0.1"  # loopback only
        log = self.logs / "superlink.log"
        self.superlink = self.processes.start("superlink", command, log_path=log,
                                              env=flower_env())
        wait_for_port(self.port, proc=self.superlink, log_path=log)

    def start_supernode(self, site: Site, *, tls: bool = True,
                        give_up_after: float | None = None) -> subprocess.Popen[bytes]:
        """Start a site's SuperNode; ``tls=False`` tries without TLS or a key (to fail)."""
        command = cons.supernode_command(
            superlink=self.consortium.address, ca_cert=self.consortium.ca_cert,
            private_key=self.consortium.site_key(site.name), data_path=site.data_path,
            site=site.name, runtime_port=free_port(), text_column=site.text_column,
            label_column=site.label_column,
            max_wait_time=cons.RECONNECT_WAIT_S if give_up_after is None else give_up_after,
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
    ) -> tuple[int, Path]:
        """``flwr run APP consortium --stream``; returns its exit code and log path."""
        overrides = self.work_dir / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        log_path = self.logs / "flwr-run.log"
        command = [executable("flwr"), "run", str(app_dir), cons.CONNECTION, "--stream",
                   "--run-config", str(overrides)]
        deadline = None if timeout is None else time.monotonic() + timeout
        with log_path.open("w", encoding="utf-8") as log, subprocess.Popen(
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


def labels_of(sites: Sequence[Site], cfg: RunConfig) -> str:
    """The classes found in the readable site files, as a ``labels`` value."""
    found: list[Any] = []
    for site in sites:
        if site.data_path.is_file():
            frame = read_table(str(site.data_path), text_column=site.text_column or
                               cfg.text_column, label_column=site.label_column or
                               cfg.label_column, seed=cfg.seed, builtin_examples=1,
                               label_case_fold=cfg.label_case_fold)
            found.extend(frame[site.label_column or cfg.label_column])
    return ",".join(build_label_names(found, source="the site files"))


def rehearse(
    sites: Sequence[Site],
    run_config: Mapping[str, Any],
    *,
    work_dir: Path,
    app_dir: Path = APP_DIR,
    on_line: Callable[[str], None] = print,
    timeout: float | None = None,
) -> RehearsalResult:
    """Run the app once across ``sites`` on a local, secured deployment.

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
    with Rehearsal(work_dir, [s.name for s in sites]) as rehearsal:
        rehearsal.start_superlink()
        on_line(f"[fedsft] SuperLink on 127.0.0.1:{rehearsal.port} (TLS, node auth)")
        for site in sites:
            node_id = rehearsal.register(site.name)
            on_line(f"[fedsft] registered site {site.name} as node {node_id}")
        for site in sites:
            rehearsal.start_supernode(site)
        rehearsal.wait_online(len(sites))
        on_line(f"[fedsft] {len(sites)} SuperNodes online; submitting the run")
        returncode, log_path = rehearsal.submit(run_config, app_dir=app_dir,
                                                on_line=on_line, timeout=timeout)
    # `flwr run --stream` exits 0 also when the ServerApp failed: the run folder says.
    ok, message = run_verdict(
        returncode=returncode, outcome=attempt_outcome(run_dir, stamp_before=stamp_before),
        final_model=has_final_model(run_dir),
        log_text=log_path.read_text(encoding="utf-8", errors="replace"), log_path=log_path,
    )
    return RehearsalResult(run_dir=run_dir, returncode=0 if ok else (returncode or 1),
                           log_path=log_path, work_dir=work_dir, message=message)
