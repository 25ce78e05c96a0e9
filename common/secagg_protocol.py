"""Secure aggregation (SecAgg+ style) protocol stages, without Flower.

The server learns only the sum of the surviving clients' quantized, weight-multiplied
updates (and the sum of their weights), never one client's update. Stages of one round
(``docs/secure-aggregation.md`` has the full description and threat model):

1. advertise: each client makes two fresh X25519 key pairs (``c`` to encrypt shares,
   ``s`` to agree on pairwise masks) and a 256-bit self-mask seed ``b``; it sends the
   public keys and a SHA-256 commitment to ``b``.
2. share-keys: each client Shamir-shares ``b`` and ``s_sk`` (threshold ``t``) among all
   advertisers, each share encrypted with AES-GCM under a key agreed with the
   recipient's ``c`` key; the server only routes the ciphertexts.
3. masked input: each client quantizes ``weight * clip(delta)`` to the ring Z_2^32 and
   adds its self mask ``PRG(b)`` and, for every other participant ``v``, the pairwise
   mask ``+-PRG(KDF(s_u, s_v))`` (``+`` if u < v): pairwise masks cancel in the sum.
   After the weight come the round's summed integer statistics, if the server names
   any (``SUM_KEYS``: e.g. the label counts of ``class-weighting-source`` global), as
   exact words: the server learns only their sum over the survivors.
4. unmask: survivors reveal their shares of ``b`` of every survivor and of ``s_sk`` of
   every dropped participant, never both for one node; the server rebuilds the seeds,
   removes the masks and decodes the sum.

Dropouts at any stage are tolerated while at least ``t`` clients remain; ``t`` is more
than half of the participants, so a server that sends different survivor lists to
different clients still cannot collect ``t`` shares of both secrets of one client.

Client stages are pure functions over a frozen :class:`ClientState`; the server side is
:class:`ServerRound`. ``client/secagg.py`` and ``server/secure_aggregation.py`` carry
them over Flower messages; the tests run them in memory.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.exceptions import InvalidTag

from common.secagg import (
    INFO,
    KEY_BYTES,
    RING,
    SEED_BYTES,
    SHARE_BYTES,
    WEIGHT_WORDS,
    agree,
    commitment,
    decode_weight,
    decrypt,
    encode_weight,
    encrypt,
    generate_key_pair,
    pair_info,
    prg_uint32,
    public_key_of,
    quantize,
    shamir_combine,
    shamir_split,
)

# Message vocabulary shared by client/secagg.py and server/secure_aggregation.py.
STAGE = "secagg-stage"  # in a query's config: which stage the server asks for
ADVERTISE, SHARE_KEYS, UNMASK = "advertise-keys", "share-keys", "unmask"
WEIGHT_KEY = "secagg::weight"  # the extra uplink entry: the weight, as 2 uint32 words
# In a train config: the names of the site statistics the round sums (a list of str);
# the masked statistics travel as the uplink entry SUMS_KEY, one word each, in that order.
SUM_KEYS = "secagg-sum-keys"
SUMS_KEY = "secagg::sums"


class SecAggAbort(RuntimeError):
    """Fewer than the threshold of clients remain (or reconstruction failed): no sum."""


class SecAggRefusal(ValueError):
    """A client refuses a protocol request (stale round, inconsistent or unsafe lists)."""


# --- typed reads of message config values (Flower's ConfigRecord or any mapping) --------


def get_int(config: Mapping[str, object], key: str) -> int:
    """``config[key]`` as an int; ValueError naming the key otherwise."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"secure aggregation: `{key}` must be an int, got {value!r:.60}")
    return value


def get_float(config: Mapping[str, object], key: str) -> float:
    """``config[key]`` as a float (ints accepted)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"secure aggregation: `{key}` must be a number, got {value!r:.60}")
    return float(value)


def get_bytes(config: Mapping[str, object], key: str) -> bytes:
    """``config[key]`` as bytes."""
    value = config.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"secure aggregation: `{key}` must be bytes, got {value!r:.60}")
    return value


def get_ints(config: Mapping[str, object], key: str) -> list[int]:
    """``config[key]`` as a list of ints (an empty list is fine)."""
    value = config.get(key)
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ValueError(f"secure aggregation: `{key}` must be a list of ints")
    return [int(v) for v in value]


def get_strs(config: Mapping[str, object], key: str) -> list[str]:
    """``config[key]`` as a list of str; an absent key is an empty list."""
    value = config.get(key, [])
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        raise ValueError(f"secure aggregation: `{key}` must be a list of strings")
    return [str(v) for v in value]


def get_bytes_list(config: Mapping[str, object], key: str) -> list[bytes]:
    """``config[key]`` as a list of bytes (an empty list is fine)."""
    value = config.get(key)
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value):
        raise ValueError(f"secure aggregation: `{key}` must be a list of bytes")
    return [bytes(v) for v in value]


def get_pairs(config: Mapping[str, object], keys: str, values: str) -> dict[int, bytes]:
    """Two parallel lists (node ids, bytes) as a dict; ValueError if they do not pair up."""
    nodes, data = get_ints(config, keys), get_bytes_list(config, values)
    if len(nodes) != len(data) or len(set(nodes)) != len(nodes):
        raise ValueError(f"secure aggregation: `{keys}` and `{values}` do not pair up")
    return dict(zip(nodes, data, strict=True))


# --- protocol: shared helpers ------------------------------------------------------------


def threshold_for(num_sampled: int, fraction: float) -> int:
    """Shares needed: ``ceil(fraction * n)``, at least a strict majority and at least 2."""
    if not 0 < fraction <= 1:
        raise ValueError(f"threshold fraction must be in (0, 1], got {fraction}")
    return max(math.ceil(fraction * num_sampled), num_sampled // 2 + 1, 2)


@dataclass(frozen=True)
class KeyAdvert:
    """What a client publishes at the advertise stage."""

    c_pk: bytes  # encryption key (shares)
    s_pk: bytes  # masking key (pairwise masks)
    b_commit: bytes  # commitment to the self-mask seed


def _share_aad(*, server_round: int, src: int, dst: int) -> bytes:
    return (INFO + b"share" + server_round.to_bytes(8, "big") + src.to_bytes(8, "big")
            + dst.to_bytes(8, "big"))


def pairwise_mask(
    s_sk: bytes, peer_s_pk: bytes, *, server_round: int, me: int, peer: int, length: int
) -> np.ndarray:
    """The mask ``me`` adds for ``peer`` (the peer subtracts the same vector)."""
    info = pair_info("mask", server_round=server_round, a=me, b=peer)
    return prg_uint32(agree(s_sk, peer_s_pk, info=info), length)


def summed_values(statistics: Mapping[str, object], keys: Sequence[str]) -> list[int]:
    """The values of ``keys`` in a site's ``statistics``, in order, for the masked sum.

    Refuses (:class:`SecAggRefusal`) duplicate keys, a key the site does not have and a
    value that is not a non-negative int (a float is refused too: the sum is exact).
    """
    if len(set(keys)) != len(keys):
        raise SecAggRefusal(f"secure aggregation: duplicate summed keys in {list(keys)}")
    values = []
    for key in keys:
        if key not in statistics:
            raise SecAggRefusal(
                f"secure aggregation: the server asks for the sum of `{key}`, which this "
                f"site's statistics do not have (it has: {', '.join(sorted(statistics))})")
        value = statistics[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SecAggRefusal(
                f"secure aggregation: the summed statistic `{key}` must be a non-negative "
                f"int, got {value!r:.40}")
        values.append(int(value))
    return values


def max_summed_value(num_participants: int) -> int:
    """The largest statistic a client may add: the sum of ``num_participants`` of them
    must stay below 2^32 (the words are summed mod 2^32, an overflow would wrap)."""
    return (RING - 1) // max(num_participants, 1)


def split_total(total: np.ndarray, keys: Sequence[str]) -> tuple[np.ndarray, int, dict[str, int]]:
    """An unmasked sum (:meth:`ServerRound.unmasked_sum`) as its three parts: the model
    words (still quantized), the summed weight, and the summed statistics of ``keys``
    (the round's ``SUM_KEYS``, in the order the clients appended them)."""
    extra = WEIGHT_WORDS + len(keys)
    if len(total) < extra:
        raise SecAggAbort(f"secure aggregation: a sum of {len(total)} words cannot hold the "
                          f"weight and {len(keys)} summed statistics")
    model, tail = total[: len(total) - extra], total[len(total) - extra :]
    sums = {key: int(word) for key, word in zip(keys, tail[WEIGHT_WORDS:], strict=True)}
    return model, decode_weight(tail[:WEIGHT_WORDS]), sums


# --- protocol: client side ---------------------------------------------------------------

STAGES = ("advertised", "shared", "masked", "unmasked")


@dataclass(frozen=True)
class ClientState:
    """A client's secrets and view of one round; ``stage`` is the last stage answered."""

    node_id: int
    server_round: int
    stage: str
    c_sk: bytes = b""
    s_sk: bytes = b""
    b_seed: bytes = b""
    threshold: int = 0
    nodes: tuple[int, ...] = ()  # advertisers, sorted (share x = index + 1)
    c_pks: tuple[bytes, ...] = ()
    s_pks: tuple[bytes, ...] = ()
    own_shares: bytes = b""  # this client's share of its own b || s_sk
    participants: tuple[int, ...] = ()  # those whose masks this client added
    held: Mapping[int, bytes] = field(default_factory=dict)  # src -> b share || sk share

    def require(self, *, server_round: int, stage: str) -> None:
        """Refuse a request for another round or out of order."""
        if server_round != self.server_round:
            raise SecAggRefusal(
                f"secure aggregation: request for round {server_round}, but this client's "
                f"current round is {self.server_round} (stale or replayed request)"
            )
        if self.stage != stage:
            raise SecAggRefusal(
                f"secure aggregation: round {server_round} is at stage {self.stage!r}, "
                f"expected {stage!r} (stages run once each, in order)"
            )


def client_advertise(
    *, node_id: int, server_round: int, last_round: int | None
) -> tuple[ClientState, KeyAdvert]:
    """Stage 1: fresh keys and self-mask seed for a round later than any seen before."""
    if last_round is not None and server_round <= last_round:
        raise SecAggRefusal(
            f"secure aggregation: round {server_round} is not after round {last_round} "
            "already keyed by this client (keys are never reused)"
        )
    c_sk, c_pk = generate_key_pair()
    s_sk, s_pk = generate_key_pair()
    b_seed = secrets.token_bytes(SEED_BYTES)
    state = ClientState(node_id=node_id, server_round=server_round, stage="advertised",
                        c_sk=c_sk, s_sk=s_sk, b_seed=b_seed)
    advert = KeyAdvert(c_pk=c_pk, s_pk=s_pk,
                       b_commit=commitment(b_seed, node_id=node_id, server_round=server_round))
    return state, advert


def client_share_keys(
    state: ClientState,
    *,
    server_round: int,
    adverts: Mapping[int, KeyAdvert],
    threshold: int,
) -> tuple[ClientState, dict[int, bytes]]:
    """Stage 2: Shamir-share ``b`` and ``s_sk`` among the advertisers, encrypted per peer."""
    state.require(server_round=server_round, stage="advertised")
    me = state.node_id
    nodes = tuple(sorted(adverts))
    mine = adverts.get(me)
    if mine is None or mine.c_pk != public_key_of(state.c_sk) or (
        mine.s_pk != public_key_of(state.s_sk)
    ):
        raise SecAggRefusal("secure aggregation: the key list lacks or alters this client's keys")
    keys = [a.c_pk for a in adverts.values()] + [a.s_pk for a in adverts.values()]
    if len(set(keys)) != len(keys) or any(len(k) != KEY_BYTES for k in keys):
        raise SecAggRefusal("secure aggregation: duplicate or malformed public keys")
    if not (2 <= threshold <= len(nodes) and 2 * threshold > len(nodes)):
        raise SecAggRefusal(
            f"secure aggregation: threshold {threshold} for {len(nodes)} participants is "
            "unsafe (it must be at least 2 and more than half of them)"
        )
    b_shares = shamir_split(state.b_seed, threshold=threshold, num_shares=len(nodes))
    sk_shares = shamir_split(state.s_sk, threshold=threshold, num_shares=len(nodes))
    ciphertexts = {}
    for index, peer in enumerate(nodes):
        plaintext = b_shares[index] + sk_shares[index]
        if peer == me:
            own = plaintext
            continue
        key = agree(state.c_sk, adverts[peer].c_pk,
                    info=pair_info("share", server_round=server_round, a=me, b=peer))
        ciphertexts[peer] = encrypt(
            key, plaintext, associated_data=_share_aad(server_round=server_round, src=me,
                                                       dst=peer))
    new = replace(
        state, stage="shared", threshold=threshold, nodes=nodes,
        c_pks=tuple(adverts[n].c_pk for n in nodes), s_pks=tuple(adverts[n].s_pk for n in nodes),
        own_shares=own,
    )
    return new, ciphertexts


def client_mask(
    state: ClientState,
    *,
    server_round: int,
    participants: Sequence[int],
    incoming: Mapping[int, bytes],
    values: np.ndarray,
    weight: int,
    clip_range: float,
    frac_bits: int,
    max_weight: int,
    sums: Mapping[str, int] | None = None,
) -> tuple[ClientState, np.ndarray]:
    """Stage 3: the masked input: quantized ``weight * clip(values)``, the weight, then
    the values of ``sums`` (integer site statistics by name, in the server's order, one
    exact word each).

    ``weight`` is capped at ``max_weight`` (the overflow bound assumes it); a value of
    ``sums`` above :func:`max_summed_value` of the participants is refused. Returns a
    uint32 vector of ``len(values) + WEIGHT_WORDS + len(sums)`` values.
    """
    state.require(server_round=server_round, stage="shared")
    me = state.node_id
    group = tuple(sorted(set(participants)))
    if len(group) != len(participants) or me not in group or not set(group) <= set(state.nodes):
        raise SecAggRefusal(
            "secure aggregation: the participant list must hold this client, no duplicates, "
            "and only nodes that advertised keys"
        )
    if len(group) < state.threshold:
        raise SecAggRefusal(
            f"secure aggregation: {len(group)} participants, below the threshold "
            f"{state.threshold}"
        )
    held = {}
    for peer in group:
        if peer == me:
            continue
        if peer not in incoming:
            raise SecAggRefusal(f"secure aggregation: no key shares from participant {peer}")
        index = state.nodes.index(peer)
        key = agree(state.c_sk, state.c_pks[index],
                    info=pair_info("share", server_round=server_round, a=me, b=peer))
        try:
            plaintext = decrypt(key, incoming[peer], associated_data=_share_aad(
                server_round=server_round, src=peer, dst=me))
        except InvalidTag:
            raise SecAggRefusal(
                f"secure aggregation: the shares from participant {peer} do not decrypt "
                "(tampered, misrouted or replayed)"
            ) from None
        if len(plaintext) != 2 * SHARE_BYTES:
            raise SecAggRefusal(f"secure aggregation: malformed shares from {peer}")
        held[peer] = plaintext
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    weight = min(int(weight), max_weight)
    sums = dict(sums or {})
    limit = max_summed_value(len(group))
    for name, value in sums.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise SecAggRefusal(
                f"secure aggregation: the summed statistic `{name}` is {value!r:.40}; it must "
                f"be an int in [0, {limit}], or the sum over {len(group)} participants could "
                "overflow its 32-bit word (the words are summed mod 2^32)")
    length = len(values) + WEIGHT_WORDS + len(sums)
    vector = np.concatenate([
        quantize(values, weight=weight, clip_range=clip_range, frac_bits=frac_bits),
        encode_weight(weight),
        np.asarray(list(sums.values()), dtype=np.uint32),
    ])
    vector += prg_uint32(state.b_seed, length)
    for peer in group:
        if peer == me:
            continue
        mask = pairwise_mask(state.s_sk, state.s_pks[state.nodes.index(peer)],
                             server_round=server_round, me=me, peer=peer, length=length)
        if me < peer:
            vector += mask
        else:
            vector -= mask
    return replace(state, stage="masked", participants=group, held=held), vector


def client_unmask(
    state: ClientState,
    *,
    server_round: int,
    survivors: Sequence[int],
    dropped: Sequence[int],
) -> tuple[ClientState, dict[int, bytes], dict[int, bytes]]:
    """Stage 4: shares of ``b`` of the survivors and of ``s_sk`` of the dropped.

    Refuses unless the two lists are disjoint, together equal this client's participants,
    name this client as a survivor and reach the threshold. Answered once per round; the
    returned state no longer holds any secret.
    """
    state.require(server_round=server_round, stage="masked")
    alive, gone = set(survivors), set(dropped)
    both = sorted(alive & gone)
    if both:
        raise SecAggRefusal(
            f"secure aggregation: refusing to unmask: node(s) {both} are listed as both "
            "surviving and dropped (that would reveal their individual update)"
        )
    if len(alive) != len(survivors) or len(gone) != len(dropped):
        raise SecAggRefusal("secure aggregation: duplicate nodes in the unmask request")
    if alive | gone != set(state.participants):
        raise SecAggRefusal(
            "secure aggregation: survivors and dropped must together be exactly the "
            "participants this client masked with"
        )
    if state.node_id not in alive:
        raise SecAggRefusal("secure aggregation: this client is alive but not a survivor")
    if len(alive) < state.threshold:
        raise SecAggRefusal(
            f"secure aggregation: {len(alive)} survivors, below the threshold {state.threshold}"
        )
    held = {**state.held, state.node_id: state.own_shares}
    b_shares = {n: held[n][:SHARE_BYTES] for n in sorted(alive)}
    sk_shares = {n: held[n][SHARE_BYTES:] for n in sorted(gone)}
    forgotten = ClientState(node_id=state.node_id, server_round=state.server_round,
                            stage="unmasked")
    return forgotten, b_shares, sk_shares


# --- protocol: server side ---------------------------------------------------------------


class ServerRound:
    """The server's bookkeeping for one round; it never holds a client's secret until
    the unmask stage, and then only ``b`` of survivors and ``s_sk`` of dropped nodes."""

    def __init__(self, *, server_round: int, sampled: Sequence[int],
                 threshold_fraction: float) -> None:
        self.server_round = server_round
        self.sampled = tuple(sorted(set(sampled)))
        self.threshold = threshold_for(len(self.sampled), threshold_fraction)
        self.adverts: dict[int, KeyAdvert] = {}
        self.participants: tuple[int, ...] = ()
        self.survivors: tuple[int, ...] = ()
        self.dropped: tuple[int, ...] = ()

    def _enough(self, count: int, stage: str) -> None:
        if count < self.threshold:
            raise SecAggAbort(
                f"secure aggregation round {self.server_round}: {count} client(s) left at "
                f"the {stage} stage, the threshold is {self.threshold} of "
                f"{len(self.sampled)} sampled"
            )

    def receive_adverts(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, KeyAdvert]:
        """Keep the well-formed adverts of sampled nodes; they get the share-keys request."""
        self.adverts = {
            n: a for n, a in sorted(adverts.items())
            if n in self.sampled and len(a.c_pk) == KEY_BYTES and len(a.s_pk) == KEY_BYTES
            and len(a.b_commit) == 32
        }
        self._enough(len(self.adverts), "advertise-keys")
        return dict(self.adverts)

    def receive_shares(
        self, shares: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Route ciphertexts: for each participant, the shares addressed to it.

        A node is a participant if it advertised and sent one ciphertext to every other
        advertiser; ciphertexts from or to non-participants are discarded.
        """
        complete = sorted(
            n for n, to in shares.items()
            if n in self.adverts and set(to) == set(self.adverts) - {n}
        )
        self._enough(len(complete), "share-keys")
        self.participants = tuple(complete)
        return {v: {u: shares[u][v] for u in complete if u != v} for v in complete}

    def unmask_request(self, survivors: Sequence[int]) -> tuple[list[int], list[int]]:
        """(survivors, dropped) among the participants, given who sent a valid input."""
        self.survivors = tuple(n for n in self.participants if n in set(survivors))
        self.dropped = tuple(n for n in self.participants if n not in set(survivors))
        self._enough(len(self.survivors), "masked-input")
        return list(self.survivors), list(self.dropped)

    def unmasked_sum(
        self,
        masked: Mapping[int, np.ndarray],
        responses: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]],
    ) -> np.ndarray:
        """Sum of the survivors' unmasked inputs (uint32), from ``t`` or more responses.

        ``responses[holder] = (b shares by node, s_sk shares by node)``.
        """
        holders = sorted(n for n in responses if n in self.survivors)
        self._enough(len(holders), "unmask")
        length = len(next(iter(masked.values())))
        total = np.zeros(length, dtype=np.uint32)
        for node in self.survivors:
            total += masked[node]
        for node in self.survivors:
            b_seed = self._rebuild(node, [responses[h][0].get(node) for h in holders])
            if b_seed is None or commitment(
                b_seed, node_id=node, server_round=self.server_round
            ) != self.adverts[node].b_commit:
                raise SecAggAbort(f"self-mask seed of node {node} could not be rebuilt")
            total -= prg_uint32(b_seed, length)
        for gone in self.dropped:
            s_sk = self._rebuild(gone, [responses[h][1].get(gone) for h in holders])
            if s_sk is None or public_key_of(s_sk) != self.adverts[gone].s_pk:
                raise SecAggAbort(f"masking key of dropped node {gone} could not be rebuilt")
            for node in self.survivors:  # node added +mask if node < gone, else -mask
                mask = pairwise_mask(s_sk, self.adverts[node].s_pk,
                                     server_round=self.server_round, me=gone, peer=node,
                                     length=length)
                if node < gone:
                    total -= mask
                else:
                    total += mask
        return total

    def _rebuild(self, node: int, shares: Sequence[bytes | None]) -> bytes | None:
        usable = [s for s in shares if isinstance(s, bytes) and len(s) == SHARE_BYTES]
        if len(usable) < self.threshold:
            return None
        try:
            return shamir_combine(usable[: self.threshold])
        except ValueError:
            return None
