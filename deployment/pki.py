"""Keys and certificates of a consortium, made with ``cryptography`` (no openssl).

Two kinds of key material, each in the format Flower 1.42 reads:

- TLS: a consortium CA (self-signed, EC P-384) and the SuperLink's server certificate
  signed by it, PEM. ``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``
  serves its HTTPS API with them; SuperNodes and the ``flwr`` CLI trust the CA
  (``--root-certificates`` / ``root-certificates`` in ``config.toml``).
- SuperNode authentication: one EC key pair per site (NIST P-384), the private key in
  OpenSSH format (``flower-supernode --auth-supernode-private-key`` loads it with
  ``load_ssh_private_key``) and the public key as an OpenSSH line (``flwr supernode
  register`` loads it with ``load_ssh_public_key``).

Private keys are created with ``O_CREAT | O_EXCL`` and mode 0600, so they are never
readable by others, not even briefly, and an existing key is never overwritten unless
the caller removes it first (``--force``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CURVE = ec.SECP384R1  # the curve Flower's docs use for SuperNode keys; fine for TLS too
CA_DAYS = 3650  # the CA outlives many server certificates
SERVER_DAYS = 825  # the longest validity common TLS clients accept


class KeyExistsError(FileExistsError):
    """A key or certificate file exists and ``force`` was not given."""


@dataclass(frozen=True)
class Names:
    """The subject alternative names of the SuperLink certificate."""

    dns: tuple[str, ...] = ("localhost",)
    ips: tuple[str, ...] = ("127.0.0.1",)

    def __post_init__(self) -> None:
        for ip in self.ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as error:
                raise ValueError(f"not an IP address for the certificate: {ip!r}") from error
        if not self.dns and not self.ips:
            raise ValueError("the SuperLink certificate needs at least one DNS name or IP")


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write secret bytes to a new file with mode 0600 (never world-readable).

    Raises
    ------
    KeyExistsError
        If ``path`` exists and ``force`` is false.
    """
    if force and path.exists():
        path.unlink()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as error:
        raise KeyExistsError(f"{path} exists; use --force to replace it") from error
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # in case the umask was stricter than needed: keep it exact


def write_public(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a public file (certificate, public key) with mode 0644."""
    if path.exists() and not force:
        raise KeyExistsError(f"{path} exists; use --force to replace it")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-384 private key."""
    return ec.generate_private_key(_CURVE())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the TLS key ``flower-superlink`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key, unencrypted (``--auth-supernode-private-key``)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def ssh_public(key: ec.EllipticCurvePrivateKey, *, comment: str = "") -> bytes:
    """OpenSSH public key line (``flwr supernode register``), with an optional comment."""
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line + (f" {comment}".encode() if comment else b"") + b"\n"


def make_ca(
    key: ec.EllipticCurvePrivateKey, *, name: str, now: dt.datetime | None = None
) -> x509.Certificate:
    """A self-signed CA certificate that may sign server certificates only."""
    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Names,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The SuperLink's TLS certificate for ``names``, signed by the CA."""
    now = now or dt.datetime.now(dt.UTC)
    common_name = names.dns[0] if names.dns else names.ips[0]
    alt: list[x509.GeneralName] = [x509.DNSName(d) for d in names.dns]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in names.ips]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of a certificate (its DER), as ``openssl x509 -fingerprint
    -sha256`` prints it: upper-case hex pairs joined by ``:``."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as typed by a person: ``sha256 Fingerprint=`` / ``SHA256:`` prefix,
    case, colons and spaces do not matter. Returns the :func:`fingerprint` form.

    Raises
    ------
    ValueError
        If what is left is not 64 hex digits.
    """
    value = text.strip()
    for prefix in ("sha256 fingerprint=", "sha256:"):
        if value.lower().startswith(prefix):
            value = value[len(prefix):]
    digits = "".join(ch for ch in value if ch not in ": \t").lower()
    if len(digits) != 64 or any(ch not in "0123456789abcdef" for ch in digits):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return bytes.fromhex(digits).hex(":").upper()


def load_cert(path: Path) -> x509.Certificate:
    """Read a PEM certificate."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a PEM (PKCS#8) EC private key."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def san_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses of a certificate's subject alternative names."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (san.get_values_for_type(x509.DNSName),
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def split_names(values: Sequence[str]) -> Names:
    """Sort ``--name`` values into DNS names and IP addresses."""
    dns, ips = [], []
    for value in values:
        try:
            ipaddress.ip_address(value)
            ips.append(value)
        except ValueError:
            dns.append(value)
    return Names(dns=tuple(dns), ips=tuple(ips))
