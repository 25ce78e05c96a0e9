import numpy as np
import pytest

from common.encoding import (
    EncodingError,
    UpdateEncoding,
    decode_update,
    dequantize_int8,
    encode_update,
    quantize_int8,
)

RNG = np.random.default_rng(0)
BASE = {
    "a": RNG.normal(size=(16, 8)).astype(np.float32),
    "b": RNG.normal(size=5).astype(np.float32),
}
NEW = {k: v + RNG.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in BASE.items()}


def _nbytes(payload):
    return sum(v.nbytes for v in payload.values())


def test_fp32_is_exact_and_sends_values():
    payload, residual = encode_update(NEW, BASE, UpdateEncoding("fp32"))
    decoded = decode_update(payload, BASE, UpdateEncoding("fp32"))
    assert all(decoded[k].tobytes() == NEW[k].tobytes() for k in NEW) and residual == {}


def test_fp16_delta_halves_bytes_with_small_error():
    enc = UpdateEncoding("fp16")
    payload, _ = encode_update(NEW, BASE, enc)
    decoded = decode_update(payload, BASE, enc)
    assert _nbytes(payload) * 2 == sum(v.nbytes for v in NEW.values())
    for k in NEW:  # fp16 of a 0.01-sized delta: error ~1e-5, far below fp16 of the weights
        assert np.abs(decoded[k] - NEW[k]).max() < 2e-5


@pytest.mark.parametrize("block_size", [0, 4, 7, 256])
def test_int8_error_is_at_most_half_a_scale_per_value(block_size):
    values = RNG.normal(size=37).astype(np.float32)
    codes, scales = quantize_int8(values, block_size=block_size)
    restored = dequantize_int8(codes, scales, block_size=block_size)
    size = 37 if block_size == 0 else block_size
    bound = scales[np.arange(37) // size] / 2
    assert codes.dtype == np.int8 and (np.abs(restored - values) <= bound + 1e-7).all()


def test_int8_zero_block_stays_zero():
    codes, scales = quantize_int8(np.zeros(10, np.float32), block_size=4)
    assert (dequantize_int8(codes, scales, block_size=4) == 0).all()


def test_int8_update_round_trip_and_size():
    enc = UpdateEncoding("int8", block_size=32)
    payload, _ = encode_update(NEW, BASE, enc)
    decoded = decode_update(payload, BASE, enc)
    assert _nbytes(payload) < sum(v.nbytes for v in NEW.values()) / 3
    for k in NEW:
        assert np.abs(decoded[k] - NEW[k]).max() <= np.abs(NEW[k] - BASE[k]).max() / 254 + 1e-7


def test_topk_sends_the_largest_entries_and_keeps_the_rest_as_residual():
    enc = UpdateEncoding("fp32", topk_fraction=0.25)
    base = {"w": np.zeros(8, np.float32)}
    new = {"w": np.array([1, -8, 2, 7, 0.5, -3, 0, 4], np.float32)}
    payload, residual = encode_update(new, base, enc)
    assert payload["w::index"].tolist() == [1, 3]  # |-8| and |7|
    decoded = decode_update(payload, base, enc)
    assert decoded["w"].tolist() == [0, -8, 0, 7, 0, 0, 0, 0]
    np.testing.assert_array_equal(decoded["w"] + residual["w"], new["w"])


def test_error_feedback_delivers_everything_over_rounds():
    enc = UpdateEncoding("int8", block_size=0, topk_fraction=0.3)
    base = {"w": np.zeros(10, np.float32)}
    true_total = np.zeros(10, np.float32)
    sent_total = np.zeros(10, np.float32)
    residual = None
    for step in range(40):
        delta = np.random.default_rng(step).normal(size=10).astype(np.float32)
        true_total += delta
        payload, residual = encode_update({"w": base["w"] + delta}, base, enc, residual=residual)
        sent_total += decode_update(payload, base, enc)["w"]
    # Everything not yet sent is exactly the residual.
    np.testing.assert_allclose(sent_total + residual["w"], true_total, atol=1e-4)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: p.pop("b"), "missing"),
        (lambda p: p.update(extra=np.zeros(1)), "unexpected"),
        (lambda p: p.update(a=p["a"].astype(np.float32)), "expected int8"),
        (lambda p: p.update({"a::scale": -p["a::scale"]}), "negative"),
        (lambda p: p.update({"a::scale": p["a::scale"][:1]}), "shape"),
    ],
)
def test_decode_is_strict(tamper, message):
    enc = UpdateEncoding("int8", block_size=16)
    payload, _ = encode_update(NEW, BASE, enc)
    tamper(payload)
    with pytest.raises(EncodingError, match=message):
        decode_update(payload, BASE, enc)


def test_decode_rejects_bad_topk_indices():
    enc = UpdateEncoding("fp16", topk_fraction=0.5)
    payload, _ = encode_update(NEW, BASE, enc)
    payload["b::index"] = payload["b::index"].copy()
    payload["b::index"][-1] = 99
    with pytest.raises(EncodingError, match="out-of-range"):
        decode_update(payload, BASE, enc)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="scheme"):
        UpdateEncoding("int4")
    with pytest.raises(ValueError, match="topk_fraction"):
        UpdateEncoding("fp32", topk_fraction=1.0)
