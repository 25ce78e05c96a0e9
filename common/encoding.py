"""How a client's update is encoded on the wire, and decoded on the server.

Communication is what partner sites pay for, so the uplink can be compressed:

- ``fp32``: the new values, exactly (the default);
- ``fp16``: the *delta* (new - global) in half precision;
- ``int8``: the delta quantized to int8 with a float32 scale per tensor
  (``int8-block-size`` 0) or per block of that many values; symmetric rounding, so
  each value's error is at most half its block's scale (``max|delta| / 254``);
- ``topk-fraction`` > 0 (with any of the above): only that fraction of each tensor's
  delta entries, the largest in magnitude, is sent (int32 indices + values); what is
  not sent is kept by the client and added to its next delta (error feedback), so
  nothing is lost, only delayed.

Lossy encodings send deltas because a delta is small next to the weights: the same
relative precision costs far less absolute error. Pure numpy, no Flower; the wire form
is a flat ``name -> array`` dict whose extra entries are suffixed ``::scale``,
``::index``. The server decodes strictly: anything but the expected keys, dtypes
and shapes is an :class:`EncodingError`, and the reply is dropped.

These are our own because no library does int8/top-k with error feedback over a
``dict[str, ndarray]`` state (torch's quantization targets modules, not updates).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ENCODINGS = ("fp32", "fp16", "int8")
SCALE = "::scale"
INDEX = "::index"

State = Mapping[str, np.ndarray]


class EncodingError(ValueError):
    """An encoded update does not match what the server expects."""


@dataclass(frozen=True)
class UpdateEncoding:
    """The uplink encoding settings (from ``update-encoding``, ``int8-block-size``,
    ``topk-fraction``)."""

    scheme: str = "fp32"
    block_size: int = 256
    topk_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.scheme not in ENCODINGS:
            raise ValueError(f"scheme must be one of {ENCODINGS}, got {self.scheme!r}")
        if self.block_size < 0:
            raise ValueError(f"block_size must be >= 0, got {self.block_size}")
        if not 0.0 <= self.topk_fraction < 1.0:
            raise ValueError(f"topk_fraction must be in [0, 1), got {self.topk_fraction}")

    @property
    def sends_delta(self) -> bool:
        """Lossy encodings send new - global; fp32 dense sends the new values."""
        return self.scheme != "fp32" or self.topk_fraction > 0


# --- int8 ---------------------------------------------------------------------------


def quantize_int8(values: np.ndarray, *, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a flat float vector; one scale per block.

    ``block_size`` 0 means one scale for the whole vector. Returns (int8 codes, float32
    scales); ``dequantize_int8`` inverts it with error <= scale / 2 per value.
    """
    flat = np.asarray(values, dtype=np.float32).ravel()
    size = len(flat) if block_size == 0 else block_size
    num_blocks = max(1, -(-len(flat) // max(size, 1)))
    padded = np.zeros(num_blocks * max(size, 1), dtype=np.float32)
    padded[: len(flat)] = flat
    blocks = padded.reshape(num_blocks, -1)
    scales = np.abs(blocks).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
    return codes.ravel()[: len(flat)], scales.astype(np.float32)


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, *, block_size: int) -> np.ndarray:
    """Float32 values of int8 ``codes`` with their per-block ``scales``."""
    size = len(codes) if block_size == 0 else block_size
    block_of = np.arange(len(codes)) // max(size, 1)
    return codes.astype(np.float32) * scales[block_of]


# --- encode / decode -----------------------------------------------------------------


def _encode_values(name: str, values: np.ndarray, enc: UpdateEncoding) -> dict[str, np.ndarray]:
    if enc.scheme == "fp16":
        return {name: values.astype(np.float16)}
    if enc.scheme == "int8":
        codes, scales = quantize_int8(values, block_size=enc.block_size)
        return {name: codes, name + SCALE: scales}
    return {name: values.astype(np.float32)}


def encode_update(
    new: State,
    base: State,
    enc: UpdateEncoding,
    *,
    residual: State | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode a client's new state against the global ``base`` it started from.

    Returns the wire payload and the new error-feedback residual (empty unless top-k
    is on). ``residual`` is the previous round's residual of this client.
    """
    if not enc.sends_delta:
        return {k: np.asarray(v, dtype=np.float32) for k, v in new.items()}, {}
    payload: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, value in new.items():
        delta = (np.asarray(value, np.float32) - np.asarray(base[name], np.float32)).ravel()
        if enc.topk_fraction > 0:
            if residual is not None and name in residual:
                delta = delta + residual[name].ravel()
            k = max(1, int(round(enc.topk_fraction * delta.size)))
            index = np.sort(np.argpartition(np.abs(delta), -k)[-k:]).astype(np.int32)
            kept = delta[index]
            sent = _encode_values(name, kept, enc)
            # What the server will reconstruct for the kept entries (lossy schemes too).
            received = _decode_values(name, sent, len(kept), enc)
            remainder = delta.copy()
            remainder[index] -= received
            new_residual[name] = remainder.reshape(np.shape(value))
            payload.update(sent)
            payload[name + INDEX] = index
        else:
            payload.update(_encode_values(name, delta.reshape(np.shape(value)), enc))
    return payload, new_residual


def _decode_values(
    name: str, payload: Mapping[str, np.ndarray], count: int, enc: UpdateEncoding
) -> np.ndarray:
    values = payload[name]
    expected = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[enc.scheme]
    if values.dtype != expected or values.size != count:
        raise EncodingError(
            f"{name!r} is {values.dtype} with {values.size} values, "
            f"expected {np.dtype(expected)} with {count}"
        )
    if enc.scheme != "int8":
        return values.astype(np.float32).ravel()
    scales = payload.get(name + SCALE)
    blocks = 1 if enc.block_size == 0 else max(1, -(-count // enc.block_size))
    if scales is None or scales.dtype != np.float32 or scales.shape != (blocks,):
        raise EncodingError(f"{name + SCALE!r} must be float32 of shape ({blocks},)")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise EncodingError(f"{name + SCALE!r} holds negative or non-finite scales")
    return dequantize_int8(values.ravel(), scales, block_size=enc.block_size)


def expected_keys(base: State, enc: UpdateEncoding) -> set[str]:
    """The wire keys a valid payload for ``base`` carries under ``enc``."""
    keys = set(base)
    if enc.scheme == "int8":
        keys |= {k + SCALE for k in base}
    if enc.topk_fraction > 0:
        keys |= {k + INDEX for k in base}
    return keys


def decode_update(payload: State, base: State, enc: UpdateEncoding) -> dict[str, np.ndarray]:
    """The full new state (float32, base's shapes) from a client's wire payload.

    Raises :class:`EncodingError` when the payload's keys, dtypes, shapes or indices are
    not exactly what ``encode_update`` produces for ``base``.
    """
    keys = expected_keys(base, enc)
    if set(payload) != keys:
        missing, extra = sorted(keys - set(payload)), sorted(set(payload) - keys)
        raise EncodingError(f"payload keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    if not enc.sends_delta:
        return {k: np.asarray(payload[k]) for k in base}
    decoded: dict[str, np.ndarray] = {}
    for name, value in base.items():
        base_flat = np.asarray(value, np.float32).ravel()
        if enc.topk_fraction > 0:
            index = payload[name + INDEX]
            k = max(1, int(round(enc.topk_fraction * base_flat.size)))
            if index.dtype != np.int32 or index.shape != (k,):
                raise EncodingError(f"{name + INDEX!r} must be int32 of shape ({k},)")
            if len(index) and (index.min() < 0 or index.max() >= base_flat.size
                               or (np.diff(index) <= 0).any()):
                raise EncodingError(f"{name + INDEX!r} holds out-of-range or repeated indices")
            delta = np.zeros_like(base_flat)
            delta[index] = _decode_values(name, payload, k, enc)
        else:
            delta = _decode_values(name, payload, base_flat.size, enc)
        decoded[name] = (base_flat + delta).reshape(np.shape(value))
    return decoded
