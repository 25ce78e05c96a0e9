"""What a site does on its own machine: make its key pair, check a bundle before use.

``fedsft site init DIR`` makes the site's SuperNode key pair at the site (the private
key never leaves it); the coordinator registers the public key (``fedsft add-site
CONSORTIUM SITE --public-key supernode.pub``) and sends back a bundle without a key.
``fedsft site verify BUNDLE`` (run by ``start-supernode.sh`` before it connects) checks
the bundle's ``ca.pem`` against the CA fingerprint the site admin read out of band
(``FEDSFT_CA_FINGERPRINT``) and the address the script connects to against
``bundle.json``: a bundle whose CA and address were swapped for a rogue SuperLink's is
refused before anything connects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deployment import pki

FINGERPRINT_ENV = "FEDSFT_CA_FINGERPRINT"  # the CA fingerprint, read out of band
ADDRESS_ENV = "FEDSFT_SUPERLINK"  # optional: the SuperLink address, read out of band


class BundleError(RuntimeError):
    """A site bundle does not match what the site admin was told out of band."""


@dataclass(frozen=True)
class SiteKeys:
    """The key files ``fedsft site init`` wrote."""

    private_key: Path  # 0600, stays at the site
    public_key: Path  # send this one to the coordinator


def site_init(folder: Path, *, site: str, force: bool = False) -> SiteKeys:
    """Make the site's SuperNode key pair (EC P-384, OpenSSH) in ``folder``.

    ``folder`` is created 0700; ``supernode.key`` is 0600 and never overwritten unless
    ``force``; ``supernode.pub`` is the line to send to the coordinator.

    Raises
    ------
    KeyExistsError
        If ``supernode.key`` exists and ``force`` is false.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = SiteKeys(folder / "supernode.key", folder / "supernode.pub")
    key = pki.new_key()
    pki.write_private(keys.private_key, pki.ssh_private(key), force=force)
    pki.write_public(keys.public_key, pki.ssh_public(key, comment=f"fedsft-{site}"),
                     force=True)
    return keys


def verify_bundle(folder: Path, *, fingerprint: str | None,
                  address: str | None = None, expected_address: str | None = None) -> str:
    """Check a bundle before the SuperNode connects; returns the verified fingerprint.

    ``fingerprint``: the CA fingerprint the site admin read out of band (required: a
    check that can be skipped by leaving it out protects nothing). ``address``: the
    address the start script connects to; it must be the bundle's (``bundle.json``).
    ``expected_address``: the address read out of band, when the admin has one.

    Raises
    ------
    BundleError
        If no fingerprint is given, ``ca.pem`` does not match it, or an address differs.
    """
    if not fingerprint:
        raise BundleError(
            f"no CA fingerprint to check {folder / 'ca.pem'} against: set "
            f"{FINGERPRINT_ENV} to the fingerprint the coordinator gave you out of band "
            "(phone, letter, in person), as `fedsft create` / `fedsft bundle` print it")
    try:
        wanted = pki.normalize_fingerprint(fingerprint)
    except ValueError as error:
        raise BundleError(f"{FINGERPRINT_ENV}: {error}") from error
    ca = folder / "ca.pem"
    try:
        actual = pki.fingerprint(pki.load_cert(ca))
    except (OSError, ValueError) as error:
        raise BundleError(f"{ca}: not a readable PEM certificate: {error}") from error
    if actual != wanted:
        raise BundleError(
            f"{ca} is not the consortium CA you were told about: its SHA-256 fingerprint "
            f"is {actual}, expected {wanted}. The bundle may have been tampered with; do "
            "not start the SuperNode, ask the coordinator for the bundle again")
    try:
        recorded = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BundleError(f"{folder / 'bundle.json'}: cannot read it: {error}") from error
    bundle_address = str(recorded.get("superlink", ""))
    if address is not None and address != bundle_address:
        raise BundleError(f"the start script connects to {address} but the bundle "
                          f"records {bundle_address!r}: the bundle was edited")
    if expected_address and expected_address != (address or bundle_address):
        raise BundleError(f"the bundle connects to {address or bundle_address}, "
                          f"expected {expected_address} ({ADDRESS_ENV})")
    return actual


def fingerprint_from_env() -> str | None:
    """``FEDSFT_CA_FINGERPRINT``, or None when unset or empty."""
    return os.environ.get(FINGERPRINT_ENV) or None
