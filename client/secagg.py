"""The client side of secure aggregation over Flower messages (common/secagg_protocol.py).

The server drives the stages with ``query`` messages whose config names a
``secagg-stage``; the masked input itself is the train reply (:func:`mask_update`),
with the site statistics the round sums (``secagg-sum-keys``) masked after the weight.
Per-round secrets live in ``context.state`` (kept by Flower per node, never sent) and
are deleted once the round's unmask request is answered. Every refusal raises
:class:`common.secagg.SecAggRefusal` (a ValueError), which Flower turns into an error
reply carrying the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.secagg import WEIGHT_WORDS, flatten
from common.secagg_protocol import (
    ADVERTISE,
    SHARE_KEYS,
    STAGE,
    SUM_KEYS,
    SUMS_KEY,
    UNMASK,
    WEIGHT_KEY,
    ClientState,
    KeyAdvert,
    SecAggRefusal,
    client_advertise,
    client_mask,
    client_share_keys,
    client_unmask,
    get_bytes,
    get_bytes_list,
    get_float,
    get_int,
    get_ints,
    get_pairs,
    get_strs,
    summed_values,
)

__all__ = ["STAGE", "STATE_KEY", "SUMS_KEY", "SUM_KEYS", "WEIGHT_KEY", "handle_stage",
           "mask_update", "summed_keys_of"]
STATE_KEY = "secagg"  # in context.state


def handle_stage(msg: Message, context: Context) -> Message:
    """Answer one ``secagg-stage`` query: public keys, encrypted shares or unmask shares."""
    config = msg.content["config"]
    stage = config.get(STAGE)
    server_round = get_int(config, "secagg-round")
    state, last_round = _load(context)
    reply: dict[str, Any]
    if stage == ADVERTISE:
        state, advert = client_advertise(
            node_id=int(msg.metadata.dst_node_id), server_round=server_round,
            last_round=last_round,
        )
        reply = {"secagg-c-pk": advert.c_pk, "secagg-s-pk": advert.s_pk,
                 "secagg-b-commit": advert.b_commit}
    elif stage == SHARE_KEYS:
        state = _current(state, server_round)
        nodes = get_ints(config, "secagg-nodes")
        c_pks = get_bytes_list(config, "secagg-c-pks")
        s_pks = get_bytes_list(config, "secagg-s-pks")
        if not len(nodes) == len(c_pks) == len(s_pks) or len(set(nodes)) != len(nodes):
            raise SecAggRefusal("secure aggregation: malformed key list")
        adverts = {n: KeyAdvert(c_pk=c, s_pk=s, b_commit=b"")
                   for n, c, s in zip(nodes, c_pks, s_pks, strict=True)}
        state, ciphertexts = client_share_keys(
            state, server_round=server_round, adverts=adverts,
            threshold=get_int(config, "secagg-threshold"),
        )
        reply = {"secagg-share-dst": list(ciphertexts),
                 "secagg-share-ct": list(ciphertexts.values())}
    elif stage == UNMASK:
        state = _current(state, server_round)
        state, b_shares, sk_shares = client_unmask(
            state, server_round=server_round,
            survivors=get_ints(config, "secagg-survivors"),
            dropped=get_ints(config, "secagg-dropped"),
        )
        reply = {"secagg-b-nodes": list(b_shares), "secagg-b-shares": list(b_shares.values()),
                 "secagg-sk-nodes": list(sk_shares),
                 "secagg-sk-shares": list(sk_shares.values())}
    else:
        raise SecAggRefusal(f"secure aggregation: unknown stage {stage!r}")
    _save(context, state)
    return Message(RecordDict({"config": ConfigRecord(reply)}), reply_to=msg)


def summed_keys_of(config: Mapping[str, object]) -> list[str]:
    """The site statistics a train config asks to sum securely (``secagg-sum-keys``)."""
    return get_strs(config, SUM_KEYS)


def mask_update(
    delta: Mapping[str, np.ndarray], weight: int, config: ConfigRecord, context: Context,
    statistics: Mapping[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """The masked train payload: name -> uint32 array (shapes as ``delta``) plus
    ``WEIGHT_KEY`` (2 words). ``delta`` is new - global; it is clipped to
    ``secagg-clip-range``, multiplied by ``weight`` (capped at ``secagg-max-weight``) and
    quantized with ``secagg-frac-bits`` before masking.

    When the config names ``secagg-sum-keys``, their values in ``statistics`` (the
    task's site metrics: non-negative ints) are masked too and sent as ``SUMS_KEY``, one
    word each in that order; a missing, non-integer or too large value is refused.
    """
    if WEIGHT_KEY in delta or SUMS_KEY in delta:
        raise ValueError(f"{WEIGHT_KEY!r} and {SUMS_KEY!r} are reserved for secure aggregation")
    keys = summed_keys_of(config)
    sums = dict(zip(keys, summed_values(statistics or {}, keys), strict=True))
    server_round = get_int(config, "secagg-round")
    state, _ = _load(context)
    state = _current(state, server_round)
    state, vector = client_mask(
        state, server_round=server_round,
        participants=get_ints(config, "secagg-participants"),
        incoming=get_pairs(config, "secagg-share-src", "secagg-share-ct"),
        values=flatten(delta), weight=int(weight),
        clip_range=get_float(config, "secagg-clip-range"),
        frac_bits=get_int(config, "secagg-frac-bits"),
        max_weight=get_int(config, "secagg-max-weight"), sums=sums,
    )
    _save(context, state)
    out, start = {}, 0
    for name in sorted(delta):
        shape = np.shape(delta[name])
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    out[WEIGHT_KEY] = vector[start : start + WEIGHT_WORDS]
    if keys:
        out[SUMS_KEY] = vector[start + WEIGHT_WORDS :]
    return out


def _current(state: ClientState | None, server_round: int) -> ClientState:
    if state is None:
        raise SecAggRefusal(
            f"secure aggregation: no keys for round {server_round} (advertise stage missed)"
        )
    return state


def _load(context: Context) -> tuple[ClientState | None, int | None]:
    """The stored round state (None if none) and its round."""
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        return None, None
    state = ClientState(
        node_id=get_int(record, "node-id"), server_round=get_int(record, "round"),
        stage=str(record["stage"]), c_sk=get_bytes(record, "c-sk"),
        s_sk=get_bytes(record, "s-sk"), b_seed=get_bytes(record, "b-seed"),
        threshold=get_int(record, "threshold"), nodes=tuple(get_ints(record, "nodes")),
        c_pks=tuple(get_bytes_list(record, "c-pks")),
        s_pks=tuple(get_bytes_list(record, "s-pks")),
        own_shares=get_bytes(record, "own-shares"),
        participants=tuple(get_ints(record, "participants")),
        held=get_pairs(record, "held-from", "held"),
    )
    return state, state.server_round


def _save(context: Context, state: ClientState) -> None:
    context.state[STATE_KEY] = ConfigRecord({
        "node-id": state.node_id, "round": state.server_round, "stage": state.stage,
        "c-sk": state.c_sk, "s-sk": state.s_sk, "b-seed": state.b_seed,
        "threshold": state.threshold, "nodes": list(state.nodes),
        "c-pks": list(state.c_pks), "s-pks": list(state.s_pks),
        "own-shares": state.own_shares, "participants": list(state.participants),
        "held-from": list(state.held), "held": list(state.held.values()),
    })
