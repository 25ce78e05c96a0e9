"""Secure aggregation math and protocol stages, without Flower (common/secagg.py,
common/secagg_protocol.py)."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from scipy import stats

from common.secagg import (
    SEED_BYTES,
    agree,
    decode_weight,
    decrypt,
    dequantize_sum,
    encode_weight,
    encrypt,
    frac_bits_for,
    generate_key_pair,
    mean_error_bound,
    prg_uint32,
    quantize,
    shamir_combine,
    shamir_split,
)
from common.secagg_protocol import (
    ClientState,
    SecAggAbort,
    SecAggRefusal,
    ServerRound,
    client_advertise,
    client_mask,
    client_share_keys,
    client_unmask,
    max_summed_value,
    pairwise_mask,
    split_total,
    summed_values,
    threshold_for,
)

CLIP = 0.5
MAX_WEIGHT = 1000

# --- primitives --------------------------------------------------------------------------


def test_prg_is_deterministic_per_seed_and_differs_across_seeds():
    seed, other = bytes(range(32)), bytes(range(1, 33))

    first, again = prg_uint32(seed, 1000), prg_uint32(seed, 1000)
    different = prg_uint32(other, 1000)

    assert first.dtype == np.uint32 and first.shape == (1000,)
    np.testing.assert_array_equal(first, again)
    assert np.mean(first == different) < 0.01
    np.testing.assert_array_equal(prg_uint32(seed, 10), first[:10])  # a stream prefix


def test_prg_uses_the_whole_256_bit_seed():
    seed = bytearray(32)
    flipped = bytearray(seed)
    flipped[31] ^= 1  # a 32-bit folding of the seed (Flower's legacy PRG) would miss bits

    assert not np.array_equal(prg_uint32(bytes(seed), 8), prg_uint32(bytes(flipped), 8))
    with pytest.raises(ValueError, match="32 bytes"):
        prg_uint32(bytes(16), 8)


def test_key_agreement_is_symmetric_and_bound_to_info():
    a_sk, a_pk = generate_key_pair()
    b_sk, b_pk = generate_key_pair()

    key = agree(a_sk, b_pk, info=b"x")

    assert len(key) == SEED_BYTES
    assert key == agree(b_sk, a_pk, info=b"x")
    assert key != agree(b_sk, a_pk, info=b"y")


@pytest.mark.parametrize(("threshold", "num"), [(2, 3), (3, 5), (6, 10)])
def test_shamir_rebuilds_from_any_threshold_shares(threshold, num):
    secret = bytes(range(100, 132))
    shares = shamir_split(secret, threshold=threshold, num_shares=num)
    rng = np.random.default_rng(0)

    for _ in range(5):
        subset = rng.choice(num, size=threshold, replace=False)
        assert shamir_combine([shares[i] for i in subset]) == secret
    assert shamir_combine(shares) == secret  # more than enough is fine too


def test_shamir_with_one_share_too_few_does_not_rebuild():
    secret = bytes(range(32))
    shares = shamir_split(secret, threshold=4, num_shares=6)

    with pytest.raises(ValueError, match="do not rebuild"):
        shamir_combine(shares[:3])


def test_aes_gcm_round_trip_and_tamper_detection():
    key = bytes(range(32))
    ciphertext = encrypt(key, b"share bytes", associated_data=b"round 1, 3 -> 5")

    assert decrypt(key, ciphertext, associated_data=b"round 1, 3 -> 5") == b"share bytes"
    tampered = bytearray(ciphertext)
    tampered[-20] ^= 1
    with pytest.raises(InvalidTag):
        decrypt(key, bytes(tampered), associated_data=b"round 1, 3 -> 5")
    with pytest.raises(InvalidTag):  # a ciphertext replayed for another pair or round
        decrypt(key, ciphertext, associated_data=b"round 2, 3 -> 5")
    with pytest.raises(InvalidTag):
        decrypt(bytes(32), ciphertext, associated_data=b"round 1, 3 -> 5")


# --- quantization ------------------------------------------------------------------------


def test_frac_bits_by_hand():
    # 10 clients x weight 1000 x clip 0.5 = 5000 -> 2^31 / 5000 = 429496 -> f = 18
    assert frac_bits_for(num_clients=10, max_weight=1000, clip_range=0.5) == 18
    assert frac_bits_for(num_clients=1, max_weight=1, clip_range=1.0) == 30


def test_quantization_error_within_bound():
    rng = np.random.default_rng(1)
    n, f = 10, frac_bits_for(num_clients=10, max_weight=MAX_WEIGHT, clip_range=CLIP)
    values = rng.uniform(-0.6, 0.6, size=(n, 5000))  # some beyond the clip range
    weights = rng.integers(1, MAX_WEIGHT + 1, size=n)

    total = sum(quantize(v, weight=int(w), clip_range=CLIP, frac_bits=f)
                for v, w in zip(values, weights, strict=True))
    decoded = dequantize_sum(total, frac_bits=f) / weights.sum()

    exact = (np.clip(values, -CLIP, CLIP) * weights[:, None]).sum(0) / weights.sum()
    bound = mean_error_bound(num_clients=n, frac_bits=f, total_weight=int(weights.sum()))
    assert np.abs(decoded - exact).max() <= bound
    assert bound < 1e-6


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize(("n", "max_weight"), [(50, 10**4), (10, 10**9), (2, 1)])
def test_no_overflow_at_documented_maxima(sign, n, max_weight):
    f = frac_bits_for(num_clients=n, max_weight=max_weight, clip_range=CLIP)
    value = np.full(3, sign * CLIP)

    total = sum(quantize(value, weight=max_weight, clip_range=CLIP, frac_bits=f)
                for _ in range(n))
    weight_total = sum(encode_weight(max_weight) for _ in range(n))

    np.testing.assert_allclose(dequantize_sum(total, frac_bits=f),
                               sign * CLIP * n * max_weight, rtol=1e-6)
    assert decode_weight(weight_total) == n * max_weight


# --- the protocol in memory --------------------------------------------------------------


def run_round(
    updates, weights, *, fraction=0.6, server_round=1, drop=None, states=None, unmask=None,
    keep=None, sums=None, summed=None,
):
    """One round: ``drop[stage]`` lists nodes that vanish at that stage ("advertise",
    "share", "mask", "unmask"). ``unmask(server, node) -> (survivors, dropped)`` replaces
    the honest server's unmask request; ``keep[node]`` then gets (survivors, dropped,
    b shares, s_sk shares) of each answer. ``sums[node]`` (key -> int, the same keys in
    the same order for every node) are masked after the weight; ``summed`` then gets
    the unmasked sums. Returns (mean, weight, server, states)."""
    drop = drop or {}
    states = dict(states or {})
    server = ServerRound(server_round=server_round, sampled=list(updates),
                         threshold_fraction=fraction)
    adverts = {}
    for node in updates:
        last = states[node].server_round if node in states else None
        states[node], advert = client_advertise(node_id=node, server_round=server_round,
                                                last_round=last)
        if node not in drop.get("advertise", ()):
            adverts[node] = advert
    adverts = server.receive_adverts(adverts)
    shares = {}
    for node in adverts:
        states[node], cts = client_share_keys(states[node], server_round=server_round,
                                              adverts=adverts, threshold=server.threshold)
        if node not in drop.get("share", ()):
            shares[node] = cts
    routed = server.receive_shares(shares)
    f = frac_bits_for(num_clients=len(routed), max_weight=MAX_WEIGHT, clip_range=CLIP)
    masked = {}
    for node, incoming in routed.items():
        states[node], vector = client_mask(
            states[node], server_round=server_round, participants=server.participants,
            incoming=incoming, values=updates[node], weight=weights[node], clip_range=CLIP,
            frac_bits=f, max_weight=MAX_WEIGHT, sums=(sums or {}).get(node))
        if node not in drop.get("mask", ()):
            masked[node] = vector
    survivors, dropped = server.unmask_request(sorted(masked))
    responses = {}
    for node in survivors:
        alive, gone = unmask(server, node) if unmask else (survivors, dropped)
        try:
            states[node], b, sk = client_unmask(states[node], server_round=server_round,
                                                survivors=alive, dropped=gone)
        except SecAggRefusal:
            continue
        if keep is not None:
            keep[node] = (alive, gone, b, sk)
        if node not in drop.get("unmask", ()):
            responses[node] = (b, sk)
    total = server.unmasked_sum({n: masked[n] for n in survivors}, responses)
    keys = list(next(iter(sums.values()))) if sums else []
    model, weight, unmasked = split_total(total, keys)
    if summed is not None:
        summed.update(unmasked)
    return dequantize_sum(model, frac_bits=f) / weight, weight, server, states


def clients(n, length=300, seed=0):
    rng = np.random.default_rng(seed)
    # Flower node ids are random uint64 values; include the largest one.
    nodes = [2**64 - 1] + [int(x) for x in rng.integers(1, 2**62, size=n - 1)]
    updates = {node: rng.normal(0, 0.05, size=length) for node in nodes}
    weights = {node: int(rng.integers(1, MAX_WEIGHT + 1)) for node in nodes}
    return updates, weights


def plain_mean(updates, weights, nodes):
    total = sum(weights[n] for n in nodes)
    return sum(weights[n] * np.clip(updates[n], -CLIP, CLIP) for n in nodes) / total, total


def test_protocol_sum_equals_plaintext_weighted_mean():
    updates, weights = clients(8)

    mean, weight, server, _ = run_round(updates, weights)

    expected, expected_weight = plain_mean(updates, weights, list(updates))
    f = frac_bits_for(num_clients=8, max_weight=MAX_WEIGHT, clip_range=CLIP)
    assert weight == expected_weight
    assert np.abs(mean - expected).max() <= mean_error_bound(
        num_clients=8, frac_bits=f, total_weight=weight)
    assert server.dropped == ()


@pytest.mark.parametrize("stage", ["advertise", "share", "mask", "unmask"])
def test_dropouts_up_to_the_threshold_at_each_stage(stage):
    updates, weights = clients(10)
    nodes = sorted(updates)
    assert threshold_for(10, 0.6) == 6
    gone = nodes[2:6]  # 4 of 10 drop: 6 remain, exactly the threshold

    mean, weight, server, _ = run_round(updates, weights, drop={stage: gone})

    contributors = nodes if stage == "unmask" else [n for n in nodes if n not in gone]
    expected, expected_weight = plain_mean(updates, weights, contributors)
    assert weight == expected_weight
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    assert len(server.survivors) == (10 if stage == "unmask" else 6)


def test_dropouts_spread_over_all_stages():
    updates, weights = clients(10)
    nodes = sorted(updates)
    drop = {"advertise": [nodes[0]], "share": [nodes[1]], "mask": [nodes[2]],
            "unmask": [nodes[3]]}

    mean, _, server, _ = run_round(updates, weights, drop=drop)

    expected, _ = plain_mean(updates, weights, nodes[3:])
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    assert server.dropped == (nodes[2],)


@pytest.mark.parametrize("stage", ["advertise", "share", "mask", "unmask"])
def test_one_dropout_beyond_the_threshold_aborts(stage):
    updates, weights = clients(10)

    with pytest.raises(SecAggAbort, match="threshold is 6"):
        run_round(updates, weights, drop={stage: sorted(updates)[:5]})


def test_clients_refuse_a_node_listed_as_both_surviving_and_dropped():
    nodes = [1, 2, 3, 4, 5, 6]
    state = ClientState(node_id=2, server_round=1, stage="masked", threshold=4,
                        participants=tuple(nodes))

    with pytest.raises(SecAggRefusal, match=r"node\(s\) \[1\] are listed as both"):
        client_unmask(state, server_round=1, survivors=nodes, dropped=[1])


def test_the_both_lists_attack_cannot_recover_an_individual_update():
    # The server claims `target` both survived (to get b) and dropped (to get s_sk).
    updates, weights = clients(6)
    target = sorted(updates)[0]
    answers = {}

    def attack(server, node):
        return list(server.survivors), [target]

    with pytest.raises(SecAggAbort, match="unmask stage"):
        run_round(updates, weights, unmask=attack, keep=answers)
    assert answers == {}  # every honest client refused: no share of either secret left


def test_split_lists_attack_cannot_collect_both_secrets():
    # Consistent lists, but different ones per client: half A is told that `target`
    # survived (they reveal shares of its b), half B that it dropped (shares of its s_sk).
    # The threshold is above n/2, so one half is always short of it.
    updates, weights = clients(7)
    nodes = sorted(updates)
    target, others = nodes[0], nodes[1:]
    half_a = {target, *others[:3]}
    answers = {}

    def split(server, node):
        if node in half_a:
            return [n for n in nodes if n != others[-1]], [others[-1]]
        return others, [target]

    def record(server, node):
        alive, gone = split(server, node)
        answers[node] = (alive, gone)
        return alive, gone

    with pytest.raises(SecAggAbort):  # no consistent survivor set: the round fails
        run_round(updates, weights, fraction=0.5, unmask=record, keep=answers)
    b_shares = [answers[n][2].get(target) for n in half_a]
    sk_shares = [answers[n][3].get(target) for n in set(nodes) - half_a]
    assert len(b_shares) == 4 and len(sk_shares) == 3  # threshold_for(7, 0.5) == 4
    assert all(s is not None for s in b_shares + sk_shares)
    with pytest.raises(ValueError, match="do not rebuild"):
        shamir_combine(sk_shares)  # 3 < 4 shares of s_sk: nothing


def test_unmask_request_is_answered_once_and_only_for_the_current_round():
    updates, weights = clients(4)
    _, _, _, states = run_round(updates, weights, fraction=1.0)
    node = sorted(updates)[0]

    with pytest.raises(SecAggRefusal, match="expected 'masked'"):  # second unmask, round 1
        client_unmask(states[node], server_round=1, survivors=sorted(updates), dropped=[])
    with pytest.raises(SecAggRefusal, match="stale or replayed"):
        client_unmask(states[node], server_round=0, survivors=sorted(updates), dropped=[])
    with pytest.raises(SecAggRefusal, match="not after round 1"):
        client_advertise(node_id=node, server_round=1, last_round=states[node].server_round)
    assert states[node].s_sk == b"" and states[node].b_seed == b""  # secrets wiped


def setup_round(nodes, *, threshold_fraction=1.0):
    """Advertise and share keys among ``nodes``: (server, client states, routed shares)."""
    server = ServerRound(server_round=1, sampled=nodes, threshold_fraction=threshold_fraction)
    states, adverts, shares = {}, {}, {}
    for node in nodes:
        states[node], adverts[node] = client_advertise(node_id=node, server_round=1,
                                                       last_round=None)
    adverts = server.receive_adverts(adverts)
    for node in nodes:
        states[node], shares[node] = client_share_keys(
            states[node], server_round=1, adverts=adverts, threshold=server.threshold)
    return server, states, server.receive_shares(shares)


def test_masked_vector_of_zeros_looks_uniform():
    nodes = [3, 7, 11]
    server, states, routed = setup_round(nodes)

    _, masked = client_mask(states[3], server_round=1, participants=nodes,
                            incoming=routed[3], values=np.zeros(50_000), weight=10,
                            clip_range=CLIP, frac_bits=10, max_weight=MAX_WEIGHT)

    vector = masked[:-2]
    assert stats.kstest(vector / 2.0**32, "uniform").pvalue > 1e-4
    counts = np.bincount(vector.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    bits = np.unpackbits(vector.view(np.uint8)).reshape(-1, 32).mean(0)
    assert np.abs(bits - 0.5).max() < 0.02  # every bit position is a fair coin


def test_self_mask_hides_an_input_whose_pairwise_masks_are_known():
    # A server that falsely declares node 3 dropped rebuilds its s_sk, hence every
    # pairwise mask of node 3; what is left of node 3's input must still be noise.
    nodes = [3, 7, 11]
    _, states, routed = setup_round(nodes)
    state = states[3]
    _, masked = client_mask(state, server_round=1, participants=nodes, incoming=routed[3],
                            values=np.zeros(50_000), weight=10, clip_range=CLIP, frac_bits=10,
                            max_weight=MAX_WEIGHT)

    residual = masked.copy()
    for peer in (7, 11):
        residual -= pairwise_mask(state.s_sk, state.s_pks[state.nodes.index(peer)],
                                  server_round=1, me=3, peer=peer, length=len(masked))

    self_mask = prg_uint32(state.b_seed, len(masked))
    np.testing.assert_array_equal(residual[:-2], self_mask[:-2])  # zeros + self mask
    np.testing.assert_array_equal(residual[-2:], self_mask[-2:] + encode_weight(10))
    assert stats.kstest(residual[:-2] / 2.0**32, "uniform").pvalue > 1e-4


def test_public_keys_are_fresh_every_round():
    state1, advert1 = client_advertise(node_id=5, server_round=1, last_round=None)
    state2, advert2 = client_advertise(node_id=5, server_round=2, last_round=1)

    assert advert1.c_pk != advert2.c_pk and advert1.s_pk != advert2.s_pk
    assert advert1.b_commit != advert2.b_commit and state1.b_seed != state2.b_seed


def test_client_refuses_an_unsafe_threshold_or_an_altered_own_key():
    states, adverts = {}, {}
    for node in (1, 2, 3, 4):
        states[node], adverts[node] = client_advertise(node_id=node, server_round=1,
                                                       last_round=None)

    with pytest.raises(SecAggRefusal, match="more than half"):
        client_share_keys(states[1], server_round=1, adverts=adverts, threshold=2)
    forged = {**adverts, 1: adverts[2]}
    with pytest.raises(SecAggRefusal, match="alters this client's keys"):
        client_share_keys(states[1], server_round=1, adverts=forged, threshold=3)


def test_tampered_share_is_refused_at_masking():
    nodes = [3, 7, 11]
    _, states, routed = setup_round(nodes)
    swapped = {**routed[3], 7: routed[11][7]}  # a ciphertext meant for another node

    with pytest.raises(SecAggRefusal, match="from participant 7 do not decrypt"):
        client_mask(states[3], server_round=1, participants=nodes, incoming=swapped,
                    values=np.zeros(4), weight=1, clip_range=CLIP, frac_bits=10,
                    max_weight=MAX_WEIGHT)


# --- integer site statistics in the masked sum ------------------------------------------

COUNTS = ("label-count-0", "label-count-1", "label-count-2")


def _three_sites():
    updates, weights = clients(3, length=40)
    nodes = sorted(updates)
    per_site = [(7, 0, 3), (2, 5, 0), (0, 1, 9)]
    sums = {node: dict(zip(COUNTS, c, strict=True)) for node, c in zip(nodes, per_site,
                                                                        strict=True)}
    return updates, weights, nodes, sums


def test_summed_statistics_are_exact_and_leave_the_model_sum_unchanged():
    updates, weights, nodes, sums = _three_sites()
    summed = {}

    mean, weight, server, _ = run_round(updates, weights, sums=sums, summed=summed)
    plain_mean_, plain_weight, _, _ = run_round(updates, weights)

    assert summed == {"label-count-0": 9, "label-count-1": 6, "label-count-2": 12}
    assert list(summed) == list(COUNTS)  # in the order the clients appended them
    # the model part and the weight are the very numbers of a round without the words
    assert weight == plain_weight == sum(weights.values())
    np.testing.assert_array_equal(mean, plain_mean_)
    assert server.dropped == ()


def test_summed_statistics_of_the_survivors_after_a_dropout_at_masking():
    updates, weights, nodes, sums = _three_sites()
    assert threshold_for(3, 0.6) == 2
    summed = {}

    mean, weight, server, _ = run_round(updates, weights, sums=sums, summed=summed,
                                        drop={"mask": [nodes[0]]})

    # the dropped site's pairwise masks are rebuilt from shares; its counts are not in
    assert server.dropped == (nodes[0],)
    assert summed == {"label-count-0": 2, "label-count-1": 6, "label-count-2": 9}
    assert weight == weights[nodes[1]] + weights[nodes[2]]
    expected, _ = plain_mean(updates, weights, nodes[1:])
    np.testing.assert_allclose(mean, expected, atol=1e-5)


def test_summed_values_refuse_a_missing_or_non_integer_statistic():
    site = {"label-count-0": 3, "label-count-1": 1, "train-loss": 0.5, "flag": True}

    assert summed_values(site, ["label-count-1", "label-count-0"]) == [1, 3]
    assert summed_values(site, []) == []
    with pytest.raises(SecAggRefusal, match="sum of `label-count-2`, which this site's "
                                            "statistics do not have"):
        summed_values(site, ["label-count-0", "label-count-2"])
    for key in ("train-loss", "flag"):
        with pytest.raises(SecAggRefusal, match=f"`{key}` must be a non-negative int"):
            summed_values(site, [key])
    with pytest.raises(SecAggRefusal, match="must be a non-negative int"):
        summed_values({"k": -1}, ["k"])
    with pytest.raises(SecAggRefusal, match="duplicate summed keys"):
        summed_values(site, ["label-count-0", "label-count-0"])


def test_a_statistic_that_could_overflow_the_sum_is_refused():
    # 3 participants: each value at most floor((2^32 - 1) / 3) = 1431655765
    assert max_summed_value(3) == 1431655765
    updates, weights, nodes, _ = _three_sites()
    at_max = {node: {"k": 1431655765} for node in nodes}
    summed = {}

    run_round(updates, weights, sums=at_max, summed=summed)
    assert summed == {"k": 3 * 1431655765} == {"k": 2**32 - 1}  # exact, no wrap

    over = {**at_max, nodes[1]: {"k": 1431655766}}
    with pytest.raises(SecAggRefusal, match="`k` is 1431655766; it must be an int in "
                                            r"\[0, 1431655765\].*could overflow"):
        run_round(updates, weights, sums=over)


def test_split_total_by_hand():
    total = np.array([5, 7, 3, 1, 11, 0], dtype=np.uint32)  # 2 model words, weight, sums

    model, weight, sums = split_total(total, ["a", "b"])

    assert model.tolist() == [5, 7]
    assert weight == 3 + (1 << 16)
    assert sums == {"a": 11, "b": 0}
    with pytest.raises(SecAggAbort, match="cannot hold the weight and 9 summed"):
        split_total(total, [str(i) for i in range(9)])
