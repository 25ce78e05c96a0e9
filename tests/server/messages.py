"""Hand-made Flower reply messages for strategy tests (no SuperLink needed)."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common import Metadata


def _metadata(node_id: int, message_type: str = "train") -> Metadata:
    return Metadata(
        run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
        message_type=message_type,
    )


def train_reply(node_id: int, arrays: dict[str, np.ndarray], **metrics: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics),
    })
    return make_message(metadata=_metadata(node_id), content=content)


def eval_reply(node_id: int, **metrics: float) -> Message:
    return make_message(
        metadata=_metadata(node_id, "evaluate"),
        content=RecordDict({"metrics": MetricRecord(metrics)}),
    )


def error_reply(node_id: int, reason: str = "client raised") -> Message:
    return make_message(metadata=_metadata(node_id), error=Error(code=0, reason=reason))


class NodesGrid:
    """Just enough of a Grid for a strategy's ``configure_*``: ``nodes`` connected nodes."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))


def send_round(strategy, server_round: int, state: dict[str, np.ndarray],  # type: ignore[no-untyped-def]
               *, nodes: int = 6) -> None:
    """Run ``strategy.configure_train`` for ``server_round`` with ``state`` as the global.

    Flower's messages need a task identity: use with the ``task_identity`` fixture.
    """
    from flwr.app import ConfigRecord

    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    list(strategy.configure_train(server_round, arrays, ConfigRecord({}), NodesGrid(nodes)))
