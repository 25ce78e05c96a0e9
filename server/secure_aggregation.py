"""The server side of secure aggregation over Flower messages (common/secagg_protocol.py).

``SecureAggregator.setup`` runs the key stages before a round's train messages go out;
``SecureAggregator.aggregate`` runs the unmask stage on the train replies and returns
the weighted mean delta. All stage messages are ``query`` messages whose config holds
``secagg-stage`` (answered by ``client.secagg.handle_stage``). A node that does not
answer, answers with an error, or answers malformed, is excluded from the rest of the
round; the round aborts (:class:`SecAggAbort`) only when fewer than the threshold remain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from common.secagg import (
    WEIGHT_WORDS,
    decode_weight,
    dequantize_sum,
    frac_bits_for,
    mean_error_bound,
    unflatten,
)
from common.secagg_protocol import (
    ADVERTISE,
    SHARE_KEYS,
    STAGE,
    UNMASK,
    WEIGHT_KEY,
    KeyAdvert,
    SecAggAbort,
    ServerRound,
    get_bytes,
    get_pairs,
)

__all__ = ["SecAggAbort", "SecureAggregator"]
log = logging.getLogger(__name__)


def content_bytes(message: Message) -> int:
    """Serialized size of a message's content (0 for error replies)."""
    return 0 if message.has_error() else recorddict_to_proto(message.content).ByteSize()


class SecureAggregator:
    """Key set-up and unmasking for one round at a time (see the module docstring).

    Parameters
    ----------
    threshold_fraction
        Share of the sampled nodes that must stay to the end; the threshold is
        ``max(ceil(fraction * n), n // 2 + 1, 2)``.
    clip_range
        Each delta value is clipped to ``[-clip_range, clip_range]`` before quantization.
    max_weight
        Bound on a client's weight (num-examples); clients cap theirs at it.
    timeout
        Seconds to wait for each stage's replies.
    seed
        Unused: cryptographic randomness is never seeded. Accepted for symmetry with the
        other server components.
    """

    def __init__(self, *, threshold_fraction: float, clip_range: float, max_weight: int,
                 timeout: float, seed: int | None = None) -> None:
        if not 0 < threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction must be in (0, 1], got {threshold_fraction}")
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        if max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {max_weight}")
        self.threshold_fraction = threshold_fraction
        self.clip_range = float(clip_range)
        self.max_weight = int(max_weight)
        self.timeout = timeout
        self.seed = seed
        self.last_round_info: dict[str, Any] = {}
        self._round: ServerRound | None = None
        self._frac_bits = 0

    # --- key stages ---------------------------------------------------------------------
    def setup(self, grid: Grid, node_ids: list[int], server_round: int) -> dict[int, ConfigRecord]:
        """Advertise and share keys; the train-config entries for each remaining node."""
        self._round = None
        protocol = ServerRound(server_round=server_round, sampled=node_ids,
                               threshold_fraction=self.threshold_fraction)
        info: dict[str, Any] = {
            "round": server_round, "sampled": len(protocol.sampled),
            "threshold": protocol.threshold, "setup-bytes-down": 0, "setup-bytes-up": 0,
            "problems": [],
        }
        self.last_round_info = info
        if len(protocol.sampled) < protocol.threshold:
            raise SecAggAbort(f"secure aggregation needs at least {protocol.threshold} "
                              f"clients, {len(protocol.sampled)} sampled")

        replies = self._exchange(grid, {n: {STAGE: ADVERTISE, "secagg-round": server_round}
                                        for n in protocol.sampled}, info, "setup")
        adverts = {}
        for node, config in replies.items():
            try:
                adverts[node] = KeyAdvert(c_pk=get_bytes(config, "secagg-c-pk"),
                                          s_pk=get_bytes(config, "secagg-s-pk"),
                                          b_commit=get_bytes(config, "secagg-b-commit"))
            except ValueError as exc:
                info["problems"].append(f"node {node}: malformed advert: {exc!r}")
        info["dropped-advertise"] = len(protocol.sampled) - len(adverts)
        adverts = protocol.receive_adverts(adverts)
        info["advertised"] = len(adverts)

        nodes = list(adverts)
        request = {STAGE: SHARE_KEYS, "secagg-round": server_round, "secagg-nodes": nodes,
                   "secagg-c-pks": [adverts[n].c_pk for n in nodes],
                   "secagg-s-pks": [adverts[n].s_pk for n in nodes],
                   "secagg-threshold": protocol.threshold}
        replies = self._exchange(grid, {n: request for n in nodes}, info, "setup")
        shares = {}
        for node, config in replies.items():
            try:
                shares[node] = get_pairs(config, "secagg-share-dst", "secagg-share-ct")
            except ValueError as exc:
                info["problems"].append(f"node {node}: malformed shares: {exc!r}")
        info["dropped-share-keys"] = len(adverts) - len(
            [n for n in shares if set(shares[n]) == set(adverts) - {n}])
        routed = protocol.receive_shares(shares)
        info["shared"] = len(routed)

        self._frac_bits = frac_bits_for(num_clients=len(routed), max_weight=self.max_weight,
                                        clip_range=self.clip_range)
        info["frac-bits"] = self._frac_bits
        self._round = protocol
        participants = list(protocol.participants)
        train_entries = {}
        for node, incoming in routed.items():
            train_entries[node] = ConfigRecord({
                "secagg-round": server_round,
                "secagg-participants": participants,
                "secagg-share-src": list(incoming),
                "secagg-share-ct": list(incoming.values()),
                "secagg-frac-bits": self._frac_bits,
                "secagg-clip-range": self.clip_range,
                "secagg-max-weight": self.max_weight,
            })
            info["setup-bytes-down"] += recorddict_to_proto(
                RecordDict({"config": train_entries[node]})).ByteSize()
        return train_entries

    # --- unmasking ----------------------------------------------------------------------
    def aggregate(
        self, grid: Grid, replies: list[Message],
        spec: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """Unmask the sum of the valid replies; (weighted mean delta, total weight).

        ``spec`` (name -> shape, or name -> (shape, dtype) as server.validation's
        ArraySpec) is the exchanged state; without it, the most common (names, shapes)
        among the replies is taken. Replies that do not match it count as dropped.
        """
        protocol = self._round
        if protocol is None:
            raise SecAggAbort("secure aggregation: aggregate() without a completed setup()")
        self._round = None  # one aggregation per set-up
        info = self.last_round_info
        info.update({"unmask-bytes-down": 0, "unmask-bytes-up": 0})
        shapes = _shapes(spec) if spec is not None else _common_shapes(replies)
        masked: dict[int, np.ndarray] = {}
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            vector = None if reply.has_error() else _masked_vector(reply, shapes)
            if node in seen or node not in protocol.participants or vector is None:
                info["problems"].append(f"node {node}: malformed or unexpected masked input")
                masked.pop(node, None)  # a node that replied twice is dropped altogether
            else:
                masked[node] = vector
            seen.add(node)
        survivors, dropped = protocol.unmask_request(sorted(masked))
        info["masked"] = len(survivors)
        info["dropped-masked-input"] = len(dropped)
        request = {STAGE: UNMASK, "secagg-round": protocol.server_round,
                   "secagg-survivors": survivors, "secagg-dropped": dropped}
        responses = {}
        for node, config in self._exchange(grid, {n: request for n in survivors}, info,
                                           "unmask").items():
            try:
                responses[node] = (get_pairs(config, "secagg-b-nodes", "secagg-b-shares"),
                                   get_pairs(config, "secagg-sk-nodes", "secagg-sk-shares"))
            except ValueError as exc:
                info["problems"].append(f"node {node}: malformed unmask shares: {exc!r}")
        info["unmasked"] = len(responses)
        info["dropped-unmask"] = len(survivors) - len(responses)
        total = protocol.unmasked_sum({n: masked[n] for n in survivors}, responses)
        weight = decode_weight(total[-WEIGHT_WORDS:])
        if weight <= 0:
            raise SecAggAbort("secure aggregation: the summed weight is 0")
        mean = dequantize_sum(total[:-WEIGHT_WORDS], frac_bits=self._frac_bits) / weight
        info["total-weight"] = weight
        info["error-bound"] = mean_error_bound(num_clients=len(survivors),
                                               frac_bits=self._frac_bits, total_weight=weight)
        arrays = {k: v.astype(np.float32) for k, v in unflatten(mean, shapes).items()}
        return arrays, float(weight)

    # --- messaging ----------------------------------------------------------------------
    def _exchange(self, grid: Grid, configs: Mapping[int, Mapping[str, Any]],
                  info: dict[str, Any], phase: str) -> dict[int, ConfigRecord]:
        """Send one query per node; the config of each valid reply by node id."""
        messages = [
            Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=node,
                    message_type="query")
            for node, config in configs.items()
        ]
        info[f"{phase}-bytes-down"] += sum(content_bytes(m) for m in messages)
        out: dict[int, ConfigRecord] = {}
        known = len(info["problems"])
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            info[f"{phase}-bytes-up"] += content_bytes(reply)
            if reply.has_error():
                info["problems"].append(f"node {node}: {reply.error.reason}")
                continue
            if node not in configs or node in out or "config" not in reply.content:
                info["problems"].append(f"node {node}: unexpected reply")
                continue
            out[node] = reply.content.config_records["config"]
        for problem in info["problems"][known:]:
            log.warning("secure aggregation round %s: %s", info.get("round"), problem)
        return out


def _shapes(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """name -> shape from a name -> shape or name -> (shape, dtype) mapping."""
    out = {}
    for name, value in spec.items():
        is_array_spec = len(value) == 2 and isinstance(value[0], tuple)
        out[name] = tuple(value[0]) if is_array_spec else tuple(value)
    return out


def _common_shapes(replies: list[Message]) -> dict[str, tuple[int, ...]]:
    """The most common (names, shapes) among the replies (ties: the first seen)."""
    counts: dict[tuple[tuple[str, tuple[int, ...]], ...], int] = {}
    for reply in replies:
        if reply.has_error() or len(reply.content.array_records) != 1:
            continue
        record = next(iter(reply.content.array_records.values()))
        key: tuple[tuple[str, tuple[int, ...]], ...] = tuple(sorted(
            (name, tuple(int(d) for d in array.shape))
            for name, array in record.items() if name != WEIGHT_KEY
        ))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise SecAggAbort("secure aggregation: no reply carries a masked input")
    best = max(counts, key=counts.__getitem__)
    return dict(best)


def _masked_vector(reply: Message, shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray | None:
    """The flat uint32 masked input of a reply, or None if it does not match ``shapes``."""
    if len(reply.content.array_records) != 1:
        return None
    record = next(iter(reply.content.array_records.values()))
    if set(record) != set(shapes) | {WEIGHT_KEY}:
        return None
    try:
        arrays = {name: array.numpy() for name, array in record.items()}
    except Exception:  # undecodable bytes
        return None
    expected = {**shapes, WEIGHT_KEY: (WEIGHT_WORDS,)}
    if any(a.dtype != np.uint32 or tuple(a.shape) != tuple(expected[n])
           for n, a in arrays.items()):
        return None
    return np.concatenate([arrays[n].ravel() for n in sorted(shapes)] + [arrays[WEIGHT_KEY]])
