"""A simulation on an existing two-node Ray cluster, as docs/deployment.md describes it.

The cluster is two ``ray start --block`` processes on 127.0.0.1 (a head and a second
node, one CPU each, the second with a resource of its own), in a temp folder of their
own so no other Ray user on the machine finds them (``ray.init()`` without an address
joins the cluster whose address file is in the default temp folder). The harness's
``flwr run`` joins it through ``RAY_ADDRESS``, the documented route. The cluster starts
inside the harness's machine lock (``hold_machine``), so it never waits idle beside
another test's simulation, and the run uses that same hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.runner import hold_machine, run_app_on_held_machine

pytestmark = pytest.mark.e2e

# What the cluster holds: its alive nodes and the node of every ClientAppActor it ran
# (read from the GCS, which needs no dashboard), as JSON, in a process of its own so
# this test process never initialises Ray.
_CLUSTER_STATE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", include_dashboard=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [a["Address"]["NodeID"] for a in state.actors().values()
          if a["ActorClassName"] == "ClientAppActor"]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_state(address: str, timeout: float = 120) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", _CLUSTER_STATE, address], check=True,
                         capture_output=True, text=True, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _alive_nodes(address: str, *, deadline: float) -> int:
    """How many nodes the cluster has up (0 while it cannot be asked yet)."""
    try:
        return len(_cluster_state(address, timeout=max(1.0, deadline - time.monotonic()))
                   ["nodes"])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return 0


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    ray = shutil.which("ray")
    assert ray, "the `ray` command (flwr[simulation]) is not on PATH"
    with log.open("ab") as out:
        # The ClientAppActors inherit the node's environment, not the harness's: a
        # cluster's nodes need HF_HUB_OFFLINE themselves (docs/deployment.md).
        return subprocess.Popen([ray, "start", "--block", "--disable-usage-stats",
                                 "--node-ip-address=127.0.0.1", "--num-cpus=1", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one node: ``ray start --block`` stops its node's processes on SIGTERM; what
    is left of its process group (its own session) is killed after it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[tuple[str, float]]:
    """The cluster's address and the seconds left of the machine's hold it runs in."""
    with hold_machine(run_name="ray-cluster", timeout=900) as left:
        yield from _cluster(tmp_path, left)


def _cluster(tmp_path: Path, left: float) -> Iterator[tuple[str, float]]:
    # Short: Ray's socket paths under its temp folder must stay below 108 characters.
    temp = tempfile.mkdtemp(prefix="fedsft-ray-", dir="/tmp")
    address = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "ray.log"
    nodes = [_start([f"--port={address.rsplit(':', 1)[1]}", "--head",
                     "--include-dashboard=false", f"--temp-dir={temp}"], log)]
    try:
        deadline = time.monotonic() + 120
        while not (Path(temp) / "ray_current_cluster").exists():  # the head is up
            assert nodes[0].poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        nodes.append(_start([f"--address={address}", '--resources={"second": 1}'], log))
        while _alive_nodes(address, deadline=deadline) < 2:
            assert nodes[1].poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        yield address, left
    finally:
        try:
            for proc in reversed(nodes):
                _stop(proc)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_joins_a_two_node_ray_cluster_and_runs_clients_on_both(
    ray_cluster, tmp_path, tiny_model_dir, monkeypatch
):
    address, left = ray_cluster
    monkeypatch.setenv("RAY_ADDRESS", address)
    result = run_app_on_held_machine({
        "model": str(tiny_model_dir), "dataset": "builtin", "builtin-examples": 80,
        "max-length": 32, "batch-size": 8, "local-steps": 2, "num-server-rounds": 1,
        "fraction-train": 1.0, "fraction-evaluate": 0.0, "min-nodes": 2,
        "node-wait-timeout": 60.0, "round-timeout": 300.0,
        "output-dir": str(tmp_path), "run-name": "ray-cluster",
    }, num_supernodes=2, num_cpus=1, timeout=600, quiet=True, port_wait=left)
    assert result.returncode == 0, result.log_path.read_text()[-3000:]
    state = _cluster_state(address)
    # One CPU per node and one per virtual client: Flower's actor pool holds one
    # ClientAppActor per node, and the round's two training messages run at once, one
    # on each. Both actors lived on this cluster, not on a Ray Flower started itself.
    # (Strict: were Flower to restart an actor, the list would hold a node twice.)
    assert len(state["nodes"]) == 2
    assert sorted(state["actors"]) == sorted(state["nodes"])
    assert (tmp_path / "ray-cluster" / "final" / "model").is_dir()
