"""The server side of secure aggregation over Flower messages (common/secagg_protocol.py).

``SecureAggregator.setup`` runs the key stages before a round's train messages go out;
``SecureAggregator.aggregate`` runs the unmask stage on the train replies and returns
the weighted mean delta; the site statistics a round sums (``summed_keys`` of
``setup``, masked by the clients after the weight) come out as ``round_info().sums``,
their total over the round's survivors (never one site's). All stage messages are
``query`` messages whose config holds ``secagg-stage`` (answered by
``client.secagg.handle_stage``). A node that does not answer, answers with an error,
or answers malformed, is excluded from the rest of the round; the round aborts
(:class:`SecAggAbort`) only when fewer than the threshold remain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from common.secagg import (
    WEIGHT_WORDS,
    dequantize_sum,
    frac_bits_for,
    mean_error_bound,
    unflatten,
)
from common.secagg_protocol import (
    ADVERTISE,
    SHARE_KEYS,
    STAGE,
    SUM_KEYS,
    SUMS_KEY,
    UNMASK,
    WEIGHT_KEY,
    KeyAdvert,
    SecAggAbort,
    ServerRound,
    get_bytes,
    get_pairs,
    split_total,
)
from server.reply_pipeline import (
    Aggregate,
    AggregationRule,
    Reply,
    RoundSetup,
    State,
    Update,
    error_problems,
    mean_scalar_metrics,
    restore_dtypes,
)
from server.validation import ArraySpec

if TYPE_CHECKING:  # the protocol only: no task code (torch) at import
    from common.tasks.base import RoundFeedback

__all__ = ["SecAggAbort", "SecAggRoundInfo", "SecureAggregationStep", "SecureAggregator"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggRoundInfo:
    """What the protocol did in one round: counts per stage, bytes per phase, problems.

    The counts of a stage that did not run (the round aborted before it) are 0.
    """

    round: int = 0
    sampled: int = 0
    threshold: int = 0
    advertised: int = 0
    dropped_advertise: int = 0
    shared: int = 0
    dropped_share_keys: int = 0
    frac_bits: int = 0
    masked: int = 0
    dropped_masked_input: int = 0
    unmasked: int = 0
    dropped_unmask: int = 0
    total_weight: float = 0.0
    error_bound: float = 0.0
    setup_bytes_down: int = 0
    setup_bytes_up: int = 0
    unmask_bytes_down: int = 0
    unmask_bytes_up: int = 0
    problems: tuple[str, ...] = ()
    # The unmasked sums of the site statistics the round summed, over its survivors
    # (empty when it summed none, or before its unmasking succeeded).
    sums: Mapping[str, int] = field(default_factory=dict)


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
        self._info = SecAggRoundInfo()  # the latest round's, replaced as its stages run
        self._round: ServerRound | None = None
        self._frac_bits = 0
        self._summed_keys: tuple[str, ...] = ()

    def round_info(self) -> SecAggRoundInfo:
        """What the protocol did in the latest round so far (set-up, then unmasking)."""
        return self._info

    def _record(self, **changes: Any) -> None:
        self._info = replace(self._info, **changes)

    def _problem(self, problem: str) -> None:
        self._info = replace(self._info, problems=(*self._info.problems, problem))

    def _add_bytes(self, phase: str, *, down: int = 0, up: int = 0) -> None:
        """Add to the ``<phase>_bytes_down`` / ``_up`` counts (phase: setup, unmask)."""
        self._record(**{f"{phase}_bytes_down": getattr(self._info, f"{phase}_bytes_down") + down,
                        f"{phase}_bytes_up": getattr(self._info, f"{phase}_bytes_up") + up})

    # --- key stages ---------------------------------------------------------------------
    def setup(self, grid: Grid, node_ids: list[int], server_round: int,
              summed_keys: Sequence[str] = ()) -> dict[int, ConfigRecord]:
        """Advertise and share keys; the train-config entries for each remaining node.

        ``summed_keys``: site statistics (integer reply metrics of the task) the clients
        add to their masked input, summed with it (``secagg-sum-keys`` in the entries).
        """
        if len(set(summed_keys)) != len(summed_keys):
            raise ValueError(f"duplicate summed keys: {list(summed_keys)}")
        self._round = None
        self._summed_keys = tuple(summed_keys)
        protocol = ServerRound(server_round=server_round, sampled=node_ids,
                               threshold_fraction=self.threshold_fraction)
        self._info = SecAggRoundInfo(round=server_round, sampled=len(protocol.sampled),
                                     threshold=protocol.threshold)
        if len(protocol.sampled) < protocol.threshold:
            raise SecAggAbort(f"secure aggregation needs at least {protocol.threshold} "
                              f"clients, {len(protocol.sampled)} sampled")

        replies = self._exchange(grid, {n: {STAGE: ADVERTISE, "secagg-round": server_round}
                                        for n in protocol.sampled}, "setup")
        adverts = {}
        for node, config in replies.items():
            try:
                adverts[node] = KeyAdvert(c_pk=get_bytes(config, "secagg-c-pk"),
                                          s_pk=get_bytes(config, "secagg-s-pk"),
                                          b_commit=get_bytes(config, "secagg-b-commit"))
            except ValueError as exc:
                self._problem(f"node {node}: malformed advert: {exc!r}")
        dropped_advertise = len(protocol.sampled) - len(adverts)
        adverts = protocol.receive_adverts(adverts)
        self._record(dropped_advertise=dropped_advertise, advertised=len(adverts))

        nodes = list(adverts)
        request = {STAGE: SHARE_KEYS, "secagg-round": server_round, "secagg-nodes": nodes,
                   "secagg-c-pks": [adverts[n].c_pk for n in nodes],
                   "secagg-s-pks": [adverts[n].s_pk for n in nodes],
                   "secagg-threshold": protocol.threshold}
        replies = self._exchange(grid, {n: request for n in nodes}, "setup")
        shares = {}
        for node, config in replies.items():
            try:
                shares[node] = get_pairs(config, "secagg-share-dst", "secagg-share-ct")
            except ValueError as exc:
                self._problem(f"node {node}: malformed shares: {exc!r}")
        dropped_share_keys = len(adverts) - len(
            [n for n in shares if set(shares[n]) == set(adverts) - {n}])
        routed = protocol.receive_shares(shares)
        self._record(dropped_share_keys=dropped_share_keys, shared=len(routed))

        self._frac_bits = frac_bits_for(num_clients=len(routed), max_weight=self.max_weight,
                                        clip_range=self.clip_range)
        self._record(frac_bits=self._frac_bits)
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
                **({SUM_KEYS: list(self._summed_keys)} if self._summed_keys else {}),
            })
            self._add_bytes("setup", down=recorddict_to_proto(
                RecordDict({"config": train_entries[node]})).ByteSize())
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
        self._record(unmask_bytes_down=0, unmask_bytes_up=0)
        shapes = _shapes(spec) if spec is not None else _common_shapes(replies)
        masked: dict[int, np.ndarray] = {}
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            vector = None if reply.has_error() else _masked_vector(
                reply, shapes, num_sums=len(self._summed_keys))
            if node in seen or node not in protocol.participants or vector is None:
                self._problem(f"node {node}: malformed or unexpected masked input")
                masked.pop(node, None)  # a node that replied twice is dropped altogether
            else:
                masked[node] = vector
            seen.add(node)
        survivors, dropped = protocol.unmask_request(sorted(masked))
        self._record(masked=len(survivors), dropped_masked_input=len(dropped))
        request = {STAGE: UNMASK, "secagg-round": protocol.server_round,
                   "secagg-survivors": survivors, "secagg-dropped": dropped}
        responses = {}
        for node, config in self._exchange(grid, {n: request for n in survivors},
                                           "unmask").items():
            try:
                responses[node] = (get_pairs(config, "secagg-b-nodes", "secagg-b-shares"),
                                   get_pairs(config, "secagg-sk-nodes", "secagg-sk-shares"))
            except ValueError as exc:
                self._problem(f"node {node}: malformed unmask shares: {exc!r}")
        self._record(unmasked=len(responses), dropped_unmask=len(survivors) - len(responses))
        total = protocol.unmasked_sum({n: masked[n] for n in survivors}, responses)
        model, weight, sums = split_total(total, self._summed_keys)
        if weight <= 0:
            raise SecAggAbort("secure aggregation: the summed weight is 0")
        mean = dequantize_sum(model, frac_bits=self._frac_bits) / weight
        self._record(total_weight=weight, error_bound=mean_error_bound(
            num_clients=len(survivors), frac_bits=self._frac_bits, total_weight=weight),
            sums=sums)
        arrays = {k: v.astype(np.float32) for k, v in unflatten(mean, shapes).items()}
        return arrays, float(weight)

    # --- messaging ----------------------------------------------------------------------
    def _exchange(self, grid: Grid, configs: Mapping[int, Mapping[str, Any]],
                  phase: str) -> dict[int, ConfigRecord]:
        """Send one query per node; the config of each valid reply by node id."""
        messages = [
            Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=node,
                    message_type="query")
            for node, config in configs.items()
        ]
        self._add_bytes(phase, down=sum(content_bytes(m) for m in messages))
        out: dict[int, ConfigRecord] = {}
        known = len(self._info.problems)
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            self._add_bytes(phase, up=content_bytes(reply))
            if reply.has_error():
                self._problem(f"node {node}: {reply.error.reason}")
                continue
            if node not in configs or node in out or "config" not in reply.content:
                self._problem(f"node {node}: unexpected reply")
                continue
            out[node] = reply.content.config_records["config"]
        for problem in self._info.problems[known:]:
            log.warning("secure aggregation round %s: %s", self._info.round, problem)
        return out


class SecureAggregationStep:
    """Secure aggregation as an aggregation step (server/reply_pipeline.py's shape).

    ``setup`` runs the key stages before the train messages go out; calling the step
    with the round's (masked) replies unmasks their weighted mean delta, adds it to the
    state sent, and hands that one averaged update to ``rule`` (the inner strategy, so
    server-side optimizers still apply). Masked replies cannot be validated one by one:
    only their sum is ever opened.
    """

    def __init__(self, secure: SecureAggregator, *, rule: AggregationRule,
                 spec: Mapping[str, ArraySpec], min_replies: int,
                 feedback: RoundFeedback | None = None) -> None:
        self.secure = secure
        self.rule = rule
        self.spec = dict(spec)
        self.min_replies = min_replies
        self.feedback = feedback  # the task's: its summed_keys are masked with the update
        self._grid: Grid | None = None  # the unmask stage talks to the clients again

    @property
    def reads_arrays(self) -> bool:
        return False  # masked replies are only ever summed

    def setup(self, rnd: int, node_ids: list[int], grid: Grid,
              round_config: Mapping[str, Any]) -> RoundSetup:
        """The key stages for ``node_ids``; no entries (no node trains) when the set-up
        aborts.

        The feedback's ``summed_keys`` for ``round_config`` are the site statistics the
        round sums with the update (after the round, ``sums()`` holds their total)."""
        self._grid = grid
        summed_keys = (() if self.feedback is None
                       else self.feedback.summed_keys(round_config))
        problems: list[str] = []
        try:
            entries = self.secure.setup(grid, node_ids, rnd, summed_keys=summed_keys)
        except SecAggAbort as exc:
            problems.append(f"secure aggregation set-up failed: {exc}")
            entries = {}
        info = self.secure.round_info()
        return RoundSetup(entries=entries, bytes_down=info.setup_bytes_down,
                          bytes_up=info.setup_bytes_up, problems=(*problems, *info.problems))

    def collect_feedback(self, rnd: int, replies: Sequence[Reply],
                         site_key: Callable[[int], str]) -> None:
        """Only the round's secure sums: no site's own statistics travel in plaintext."""
        sums = self.sums(rnd)  # {} when the round's unmasking failed
        if sums and self.feedback is not None:
            self.feedback.collect_sum(sums)

    def sums(self, rnd: int) -> dict[str, int]:
        """The unmasked sums of round ``rnd``'s summed statistics; {} when it summed none
        or its unmasking failed (a later set-up replaces them)."""
        info = self.secure.round_info()
        return dict(info.sums) if info.round == rnd else {}

    def __call__(self, rnd: int, replies: Sequence[Reply], sent: State) -> Aggregate:
        assert self._grid is not None, "setup() runs before the replies are aggregated"
        masked = [r for r in replies if r.error is None]
        failures = len(replies) - len(masked)
        problems = error_problems(replies)
        known = len(self.secure.round_info().problems)
        started = time.monotonic()
        try:
            if len(masked) < self.min_replies:
                raise SecAggAbort(f"{len(masked)} masked replies, `min-replies` is "
                                  f"{self.min_replies}")
            messages: list[Message] = [r.source for r in masked]  # type: ignore[misc]
            mean_delta, _ = self.secure.aggregate(self._grid, messages, spec=self.spec)
        except SecAggAbort as exc:
            log.warning("round %d skipped: %s", rnd, exc)
            problems.append(f"secure aggregation failed, round skipped: {exc}")
            info = self.secure.round_info()
            return Aggregate(arrays=None, failures=failures,
                             problems=(*problems, *info.problems[known:]),
                             bytes_down=info.unmask_bytes_down, bytes_up=info.unmask_bytes_up)
        info = self.secure.round_info()
        new_state = {name: (sent[name] + mean_delta[name]).astype(self.spec[name][1])
                     for name in self.spec}
        # The inner strategy sees one reply holding the securely averaged state.
        summed = Update(node=masked[0].node, arrays=new_state, metrics={"num-examples": 1},
                        source=masked[0].source)
        arrays, _ = self.rule(rnd, [summed])
        return Aggregate(
            arrays=None if arrays is None else restore_dtypes(arrays, self.spec),
            aggregated=info.unmasked, failures=failures,
            problems=(*problems, *info.problems[known:]),
            train_metrics=mean_scalar_metrics([r.metrics for r in masked]),
            seconds=time.monotonic() - started,
            bytes_down=info.unmask_bytes_down, bytes_up=info.unmask_bytes_up)


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
            for name, array in record.items() if name not in (WEIGHT_KEY, SUMS_KEY)
        ))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise SecAggAbort("secure aggregation: no reply carries a masked input")
    best = max(counts, key=counts.__getitem__)
    return dict(best)


def _masked_vector(reply: Message, shapes: Mapping[str, tuple[int, ...]], *,
                   num_sums: int = 0) -> np.ndarray | None:
    """The flat uint32 masked input of a reply (the update, the weight, ``num_sums``
    summed statistics), or None if it does not match ``shapes``."""
    if len(reply.content.array_records) != 1:
        return None
    record = next(iter(reply.content.array_records.values()))
    tail = [WEIGHT_KEY, SUMS_KEY] if num_sums else [WEIGHT_KEY]
    if set(record) != set(shapes) | set(tail):
        return None
    try:
        arrays = {name: array.numpy() for name, array in record.items()}
    except Exception:  # undecodable bytes
        return None
    expected = {**shapes, WEIGHT_KEY: (WEIGHT_WORDS,), SUMS_KEY: (num_sums,)}
    if any(a.dtype != np.uint32 or tuple(a.shape) != tuple(expected[n])
           for n, a in arrays.items()):
        return None
    return np.concatenate([arrays[n].ravel() for n in [*sorted(shapes), *tail]])
