"""The rehearsal's site-side attacks: apps the sites must not run, a bundle they must
not use. Each is tried for real against the rehearsal's SuperLink and SuperNodes.

- ``unsigned-app``: ``flwr run <folder>`` straight to the Control API (what anyone who
  reaches it can do): the FAB carries no signature.
- ``foreign-signed-app``: the app signed with a key the sites do not trust.
- ``modified-app-genuine-signature``: the app with its egress audit switched off,
  carrying the genuine app's signature (the signature covers the FAB's SHA-256).
- ``tampered-bundle``: a site bundle whose ``ca.pem`` and address were swapped for a
  rogue SuperLink's, started with the fingerprint the site admin was told.

An app attack counts as refused when every SuperNode logged Flower's FAB verification
refusal for it (no ClientApp ran); the bundle attack when ``start-supernode.sh`` exits
non-zero on the fingerprint before ``flower-supernode`` starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployment import app_signing, pki
from deployment import consortium as cons
from deployment.processes import flwr, free_port, started_run_id
from deployment.site import FINGERPRINT_ENV

if TYPE_CHECKING:
    from deployment.rehearsal import Rehearsal

# What flower-supernode logs when --trusted-entities refuses a FAB (start_client_internal).
REFUSAL_MARKS = ("FAB verification failed", "App verification is not supported")
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Attack:
    """One attack tried in a rehearsal and whether the sites refused it."""

    name: str
    refused: bool
    evidence: str  # what showed it (log lines, exit code)


def summary(attacks: Sequence[Attack]) -> str:
    """``attacks: N attempted, N refused`` (+ the names of any that got through)."""
    through = [a.name for a in attacks if not a.refused]
    line = f"attacks: {len(attacks)} attempted, {len(attacks) - len(through)} refused"
    return line + (f" (NOT refused: {', '.join(through)})" if through else "")


def _refusals(rehearsal: Rehearsal, sites: Sequence[str]) -> dict[str, int]:
    counts = {}
    for site in sites:
        log = rehearsal.logs / f"supernode-{site}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        counts[site] = sum(text.count(mark) for mark in REFUSAL_MARKS)
    return counts


def modified_fab(fab: bytes) -> bytes:
    """The FAB with its egress audit switched off (an app a site must never run).

    Its ``.info/CONTENT`` manifest is rewritten to match, as an attacker would: what
    stops it is the signature, not Flower's manifest check at install time.
    """
    target = "client/egress_audit.py"
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        patched = src.read(target) + (b"\n\ndef egress_problems(*args, **kwargs):\n"
                                      b"    return []\n")
        for info in src.infolist():
            data = src.read(info)
            if info.filename == target:
                data = patched
            elif info.filename == ".info/CONTENT":
                data = "\n".join(
                    f"{target},{hashlib.sha256(patched).hexdigest()},{len(patched) * 8}"
                    if line.startswith(f"{target},") else line
                    for line in data.decode("utf-8").split("\n")).encode("utf-8")
            dst.writestr(info, data)
    return out.getvalue()


def _app_attack(rehearsal: Rehearsal, name: str, sites: Sequence[str],
                run_config: Mapping[str, Any], *, app_dir: Path,
                index: app_signing.AppIndex | None, timeout: float) -> Attack:
    before = _refusals(rehearsal, sites)
    config = {**run_config, "run-name": f"attack-{name}", "num-server-rounds": 1}
    code, log_path = rehearsal.submit(config, app_dir=app_dir, index=index,
                                      signed=index is not None, stream=False,
                                      log_name=f"attack-{name}.log", on_line=lambda _: None)
    text = log_path.read_text(errors="replace")
    run_id = next((r for line in text.splitlines()
                   if (r := started_run_id(line)) is not None), None)
    if run_id is None:  # the SuperLink would not even start it
        return Attack(name, refused=True, evidence=f"no run started (exit {code})")
    deadline = time.monotonic() + timeout
    refused: list[str] = []
    while time.monotonic() < deadline:
        now = _refusals(rehearsal, sites)
        refused = [s for s in sites if now[s] > before[s]]
        if len(refused) == len(sites):
            break
        time.sleep(2)
    try:
        flwr(["stop", str(run_id), cons.CONNECTION], flwr_home=rehearsal.consortium.flwr_home)
    except Exception as error:  # noqa: BLE001 (an ended run cannot be stopped: fine)
        refused_note = f"; stop: {error}"
    else:
        refused_note = ""
    return Attack(name, refused=len(refused) == len(sites),
                  evidence=f"run {run_id}: FAB verification refused by "
                           f"{len(refused)}/{len(sites)} SuperNodes{refused_note}")


def app_attacks(rehearsal: Rehearsal, sites: Sequence[str], run_config: Mapping[str, Any],
                *, app_dir: Path, timeout: float = 240) -> list[Attack]:
    """Submit three apps the sites must refuse (module doc); one attack each."""
    fab = app_signing.build_fab(app_dir)
    genuine = app_signing.load_signing_key(rehearsal.consortium.app_signing_key)
    port = rehearsal.consortium.app_index_port
    attacks = [_app_attack(rehearsal, "unsigned-app", sites, run_config, app_dir=app_dir,
                           index=None, timeout=timeout)]
    foreign = app_signing.AppIndex(
        fab, (app_signing.sign_fab(fab, app_signing.new_signing_key()),), port=port)
    attacks.append(_app_attack(rehearsal, "foreign-signed-app", sites, run_config,
                               app_dir=app_dir, index=foreign, timeout=timeout))
    replayed = app_signing.AppIndex(modified_fab(fab), (app_signing.sign_fab(fab, genuine),),
                                    port=port)
    attacks.append(_app_attack(rehearsal, "modified-app-genuine-signature", sites,
                               run_config, app_dir=app_dir, index=replayed, timeout=timeout))
    return attacks


def fedsft_on_path(folder: Path) -> Path:
    """A ``bin`` folder whose ``fedsft`` runs this checkout's CLI (for the site scripts)."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "fedsft"
    script = (f"#!/bin/sh\nexec {sys.executable!s} -c 'import sys; sys.path.insert(0, "
              f"{json.dumps(str(_REPO))}); from deployment.cli import main; "
              "sys.exit(main(sys.argv[1:]))'"
              ' "$@"\n')
    if tool.is_file() and tool.read_text(encoding="utf-8") == script:
        return folder
    # Written aside and renamed over: a site script started a moment before may be
    # exec'ing the tool now, and a file open for writing fails exec (ETXTBSY), so `sh`
    # would go on down the PATH and run another `fedsft`.
    partial = folder / f".fedsft.{os.getpid()}"
    partial.write_text(script, encoding="utf-8")
    partial.chmod(0o755)
    os.replace(partial, tool)
    return folder


def tampered_bundle_attack(rehearsal: Rehearsal, site: str) -> Attack:
    """Swap a copy of the site's bundle's CA and address for a rogue SuperLink's, start it."""
    c = rehearsal.consortium
    genuine = pki.fingerprint(pki.load_cert(c.ca_cert))
    bundle = rehearsal.work_dir / f"tampered-{site}"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(c.site_dir(site), bundle)
    rogue_key = pki.new_key()
    (bundle / "ca.pem").write_bytes(pki.cert_pem(pki.make_ca(rogue_key, name="rogue")))
    rogue = f"127.0.0.1:{free_port()}"
    script = bundle / "start-supernode.sh"
    script.write_text(script.read_text().replace(c.address, rogue), encoding="utf-8")
    recorded = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**recorded, "superlink": rogue}))
    tools = fedsft_on_path(rehearsal.work_dir / "bin")
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}",
           FINGERPRINT_ENV: genuine}
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    refused = result.returncode != 0 and "is not the consortium CA" in result.stderr
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return Attack("tampered-bundle", refused=refused,
                  evidence=f"start-supernode.sh exit {result.returncode}: {last}")


def site_attacks(rehearsal: Rehearsal, sites: Sequence[str], run_config: Mapping[str, Any],
                 *, app_dir: Path, on_line: Callable[[str], None] = print) -> list[Attack]:
    """Every site-side attack (module doc), each reported on ``on_line`` as it ends."""
    attacks = []
    for attack in [tampered_bundle_attack(rehearsal, sites[0]),
                   *app_attacks(rehearsal, sites, run_config, app_dir=app_dir)]:
        on_line(f"[fedsft] attack {attack.name}: "
                f"{'refused' if attack.refused else 'NOT refused'} ({attack.evidence})")
        attacks.append(attack)
    return attacks
