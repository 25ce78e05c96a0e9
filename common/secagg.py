"""Secure aggregation math, without Flower: keys, masks, secret sharing, quantization.

The building blocks of the protocol in ``common/secagg_protocol.py``
(``docs/secure-aggregation.md`` describes both):

- X25519 key agreement through HKDF-SHA256 to 256-bit keys (:func:`agree`);
- masks: the ChaCha20 keystream of a 256-bit seed as uint32 values (:func:`prg_uint32`);
- Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1);
- AES-256-GCM encryption of shares, authenticated with round, sender and recipient;
- quantization to the ring Z_2^32 (uint32 arithmetic wraps for free), with the number
  of fractional bits chosen so that a sum of clients cannot overflow.

All randomness comes from ``os.urandom``/``secrets``. Flower's own helpers
(``flwr.common.secure_aggregation``) are not used: its PRG is ``np.random`` seeded
with 32 bits, its encryption is Fernet, its quantization draws from ``np.random``.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32  # self-mask seeds, pairwise seeds and AES keys are all 256-bit
KEY_BYTES = 32  # raw X25519 keys
PRIME = 2**521 - 1  # Mersenne prime > 2^256: a 32-byte secret is one field element
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 4 + _Y_BYTES  # x (uint32) || y
_NONCE_BYTES = 12
WEIGHT_WORDS = 2  # the weight travels as (w mod 2^16, w >> 16): both sums fit in 32 bits
RING = 2**32
INFO = b"fedsft-secagg/v1/"  # prefix of every KDF info / associated data / commitment


# --- primitives ------------------------------------------------------------------------


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw (private, public) bytes."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes_raw(),
        private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
    )


def public_key_of(private_key: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def agree(private_key: bytes, peer_public_key: bytes, *, info: bytes) -> bytes:
    """X25519 shared secret of two parties, through HKDF-SHA256 to a 256-bit key.

    Both ends get the same key: ``agree(a_sk, b_pk, info=i) == agree(b_sk, a_pk, info=i)``.
    ``info`` separates uses (pairwise mask vs share encryption) and binds round and pair.
    """
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public_key)
    )
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(
        shared
    )


def pair_info(purpose: str, *, server_round: int, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    return (
        INFO + purpose.encode() + server_round.to_bytes(8, "big")
        + low.to_bytes(8, "big") + high.to_bytes(8, "big")
    )


def prg_uint32(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 values: the ChaCha20 keystream of a 256-bit seed.

    Deterministic per seed (the nonce is fixed: every seed is used for one vector only).
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def shamir_split(secret: bytes, *, threshold: int, num_shares: int) -> list[bytes]:
    """Split a secret of at most 32 bytes into ``num_shares`` Shamir shares over GF(p).

    Share ``i`` (0-based) is the polynomial at x = i + 1, encoded as 4 bytes of x and 66
    bytes of y. Any ``threshold`` shares rebuild the secret; fewer reveal nothing.
    """
    if len(secret) > SEED_BYTES:
        raise ValueError(f"a secret must be at most {SEED_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got {threshold}, {num_shares}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(x.to_bytes(4, "big") + y.to_bytes(_Y_BYTES, "big"))
    return shares


def shamir_combine(shares: Sequence[bytes], *, secret_bytes: int = SEED_BYTES) -> bytes:
    """Rebuild a secret from shares by Lagrange interpolation at 0.

    Too few shares give a random field element, which is rejected (ValueError) when it
    does not fit in ``secret_bytes``: with t - 1 shares that happens with probability
    1 - 2^-265. Callers that can, verify the result (public key, commitment).
    """
    points: dict[int, int] = {}
    for share in shares:
        if len(share) != SHARE_BYTES:
            raise ValueError(f"a share must be {SHARE_BYTES} bytes, got {len(share)}")
        x, y = int.from_bytes(share[:4], "big"), int.from_bytes(share[4:], "big")
        if x == 0 or y >= PRIME or points.get(x, y) != y:
            raise ValueError(f"invalid or conflicting share at x={x}")
        points[x] = y
    if not points:
        raise ValueError("no shares to combine")
    secret = 0
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 256**secret_bytes:
        raise ValueError("shares do not rebuild a secret (too few or corrupted shares)")
    return secret.to_bytes(secret_bytes, "big")


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AES-256-GCM with a random 96-bit nonce: nonce || ciphertext || tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; raises ``cryptography.exceptions.InvalidTag`` if the
    ciphertext, the key or the associated data was changed."""
    return AESGCM(key).decrypt(
        ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated_data
    )


def commitment(seed: bytes, *, node_id: int, server_round: int) -> bytes:
    """SHA-256 commitment to a self-mask seed (the seed is 256-bit random: hiding)."""
    return hashlib.sha256(
        INFO + b"commit" + server_round.to_bytes(8, "big") + node_id.to_bytes(8, "big") + seed
    ).digest()


# --- quantization to Z_2^32 ------------------------------------------------------------


def frac_bits_for(*, num_clients: int, max_weight: int, clip_range: float) -> int:
    """Largest ``f`` such that the sum of ``num_clients`` quantized values cannot overflow.

    Each client sends ``round(w * clip(x, -c, c) * 2^f)`` with ``w <= max_weight``, so
    ``|sum| <= n * (W * c * 2^f + 1/2)``, which must stay below 2^31 to be decoded as a
    signed int32. ``f`` may be negative for huge ``n * W * c``.
    """
    if num_clients < 1 or max_weight < 1 or not clip_range > 0:
        raise ValueError(
            f"need num_clients >= 1, max_weight >= 1, clip_range > 0, got "
            f"{num_clients}, {max_weight}, {clip_range}"
        )
    if num_clients * 65535 >= RING or num_clients * (max_weight >> 16) >= RING:
        raise ValueError(f"{num_clients} clients x weight {max_weight} overflow the weight sum")
    budget = 2**31 - 1 - num_clients / 2
    f = math.floor(math.log2(budget / (num_clients * max_weight * clip_range)))
    while num_clients * (max_weight * clip_range * 2.0**f + 0.5) > 2**31 - 1:
        f -= 1
    return f


def mean_error_bound(*, num_clients: int, frac_bits: int, total_weight: float) -> float:
    """Bound on |decoded weighted mean - weighted mean of the clipped deltas| per value.

    Nearest rounding errs by at most 2^-f / 2 per client and value before the division by
    the total weight (float32 output adds a relative 2^-24 on top).
    """
    return num_clients * 2.0 ** (-frac_bits - 1) / total_weight


def quantize(
    values: np.ndarray, *, weight: int, clip_range: float, frac_bits: int
) -> np.ndarray:
    """``round(weight * clip(values) * 2^frac_bits)`` as uint32 (two's complement)."""
    scaled = np.clip(np.asarray(values, dtype=np.float64), -clip_range, clip_range)
    scaled *= weight * 2.0**frac_bits
    return (np.rint(scaled).astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)


def dequantize_sum(total: np.ndarray, *, frac_bits: int) -> np.ndarray:
    """The float64 sum of ``weight * clip(values)`` from a sum of :func:`quantize` outputs."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / 2.0**frac_bits


def encode_weight(weight: int) -> np.ndarray:
    """A weight as two uint32 words (low 16 bits, the rest); sums of each fit in 32 bits."""
    return np.array([weight & 0xFFFF, weight >> 16], dtype=np.uint32)


def decode_weight(words: np.ndarray) -> int:
    """Inverse of :func:`encode_weight`, also for sums of encoded weights."""
    return int(words[0]) + (int(words[1]) << 16)


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector, in sorted-name order."""
    if not arrays:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(arrays[n], np.float64).ravel() for n in sorted(arrays)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` for the given name -> shape spec."""
    out, start = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out[name] = vector[start : start + size].reshape(shapes[name])
        start += size
    if start != len(vector):
        raise ValueError(f"vector has {len(vector)} values, the spec {start}")
    return out
