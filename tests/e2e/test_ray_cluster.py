"""The simulation on a two-node Ray cluster (docs/deployment.md, "Simulation on a
multi-node Ray cluster"), on loopback.

Ray's own test cluster (``ray.cluster_utils.Cluster``) starts a head and a second node,
each a raylet with one CPU and a resource naming it; the simulation joins the cluster
through ``RAY_ADDRESS``, as the docs say. With one CPU a client, one node holds one
virtual client at a time; every ``ray::ClientAppActor`` process seen while the run goes
on is attributed to the node whose raylet is its parent (the raylet's command line lists
its resources): both nodes must have run clients.
"""

from __future__ import annotations

import json
import threading

import psutil
import pytest

from simulations.runner import run_app

pytestmark = pytest.mark.e2e

NODES = ("fedsft_head", "fedsft_worker")  # the custom resource of each node


@pytest.fixture
def ray_cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {NODES[0]: 1}, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, resources={NODES[1]: 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what the docs tell you to set
        yield cluster
    finally:
        cluster.shutdown()  # only this cluster's processes (never `ray stop`)


def _node_of(proc: psutil.Process) -> str | None:
    """The node (its custom resource) whose raylet started this Ray worker process."""
    for parent in proc.parents():
        if parent.name() == "raylet":
            words = " ".join(parent.cmdline())
            return next((n for n in NODES if f"{n},1" in words), None)
    return None


def _watch_actors(seen: dict[int, str | None], stop: threading.Event) -> None:
    """Every ClientAppActor process seen until ``stop``, by pid -> node."""
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0] == "ray::ClientAppActor" and proc.pid not in seen:
                try:
                    seen[proc.pid] = _node_of(proc)
                except psutil.Error:
                    continue
        stop.wait(0.5)


def test_virtual_clients_run_on_both_nodes_of_a_ray_cluster(ray_cluster, tmp_path,
                                                           tiny_model_dir):
    seen: dict[int, str | None] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_actors, args=(seen, stop), daemon=True)
    watcher.start()
    try:
        result = run_app({
            "model": str(tiny_model_dir), "dataset": "builtin", "builtin-examples": 200,
            "max-length": 16, "batch-size": 8, "local-steps": 2, "num-server-rounds": 1,
            "fraction-evaluate": 0.0, "node-wait-timeout": 120.0, "round-timeout": 300.0,
            "output-dir": str(tmp_path), "run-name": "ray-cluster",
        }, num_supernodes=2, num_cpus=1, timeout=600, quiet=True)
    finally:
        stop.set()
        watcher.join(timeout=10)
    log = result.log_path.read_text()
    assert result.returncode == 0, log[-3000:]
    rows = [json.loads(x) for x in (result.run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"]["aggregated"] == 2, rows[1]["clients"]
    # The client actors ran on both nodes of the cluster (not on a private local Ray).
    # Actors of other Ray instances on the machine belong to neither node (None).
    assert {node for node in seen.values() if node is not None} == set(NODES), seen
