"""A Grid wrapper that bounds the wait for nodes and lists them in a stable order.

Flower's Message-API strategies sample with ``sample_nodes``, which loops forever while
fewer than ``min_available_nodes`` are connected, and draws from
``grid.get_node_ids()`` in whatever order the SuperLink returns (random node ids).
Wrapping the grid fixes both without copying Flower's round loop:

- ``get_node_ids`` waits at most ``wait_timeout`` seconds for ``min_nodes`` nodes, then
  raises :class:`NodesUnavailableError` with a clear message;
- node ids are ordered by each node's *client key* (its partition id in simulation,
  its ``site-name`` or node id in deployment), asked once per node with a ``query``
  message. With the sampler seeded per round, the same seed then samples the same
  clients in every run, although node ids are random.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

CLIENT_KEY = "client-key"


class NodesUnavailableError(RuntimeError):
    """Too few nodes connected within the configured wait."""


class NodeWaitingGrid(Grid):
    """Delegates to ``grid``; see the module docstring for what it adds."""

    def __init__(
        self, grid: Grid, *, min_nodes: int, wait_timeout: float, query_timeout: float = 60.0
    ) -> None:
        self._grid = grid
        self._min_nodes = min_nodes
        self._wait_timeout = wait_timeout
        self._query_timeout = query_timeout
        self._keys: dict[int, str] = {}

    # --- what this wrapper adds ---------------------------------------------
    def get_node_ids(self) -> list[int]:
        """Connected node ids in client-key order, after waiting for ``min_nodes``."""
        deadline = time.monotonic() + self._wait_timeout
        while len(node_ids := list(self._grid.get_node_ids())) < self._min_nodes:
            if time.monotonic() >= deadline:
                raise NodesUnavailableError(
                    f"only {len(node_ids)} node(s) connected after waiting "
                    f"{self._wait_timeout:g} s; the run needs `min-nodes`={self._min_nodes}. "
                    "Start more SuperNodes, or lower `min-nodes` / raise `node-wait-timeout`."
                )
            time.sleep(0.5)
        self._learn_keys([n for n in node_ids if n not in self._keys])
        return sorted(node_ids, key=lambda n: (self._keys[n], n))

    def client_key(self, node_id: int) -> str:
        """The stable key of a node seen by :meth:`get_node_ids`."""
        return self._keys.get(node_id, f"node-{node_id}")

    def _learn_keys(self, node_ids: list[int]) -> None:
        if not node_ids:
            return
        queries = [
            Message(
                content=RecordDict({"config": ConfigRecord({})}),
                message_type="query",
                dst_node_id=node_id,
            )
            for node_id in node_ids
        ]
        for reply in self._grid.send_and_receive(queries, timeout=self._query_timeout):
            node_id = reply.metadata.src_node_id
            if not reply.has_error() and "config" in reply.content.config_records:
                self._keys[node_id] = str(reply.content["config"][CLIENT_KEY])
        for node_id in node_ids:  # a node that did not answer keeps a key too
            self._keys.setdefault(node_id, f"node-{node_id}")

    # --- plain delegation -----------------------------------------------------
    def set_run(self, run):  # type: ignore[no-untyped-def]
        return self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
