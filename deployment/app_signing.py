"""App signing with Flower's own mechanism: the coordinator signs, each site verifies.

What Flower 1.42 does (read from its source):

- ``flower-supernode --trusted-entities FILE.yaml`` takes a YAML mapping of public key
  ids to Ed25519 OpenSSH public keys (``{fpk_<id>: "ssh-ed25519 AAAA..."}``). With it,
  the SuperNode refuses (``FAB_VERIFICATION_ERROR`` reply, no ClientApp started) every
  app (FAB) that carries no valid signature of one of those keys
  (``flwr.supernode.start_client_internal._verify_fab``).
- A signature is Ed25519 over ``signed_at`` (8 bytes, big-endian) followed by the
  SHA-256 of the FAB (``flwr.supercore.primitives.asymmetric_ed25519
  .create_message_to_sign``); ``flwr app review`` makes one this way.
- The SuperLink attaches signatures to a FAB **only** when it fetches the app from a
  Flower Hub (``flwr run @publisher/app==x.y.z``: ``POST {FLWR_SUPERGRID_API_URL}
  /hub/fetch-fab`` answers a download URL and the signatures); a FAB uploaded with
  ``flwr run <folder>`` always reaches SuperNodes unsigned (``verifications={}``).
  So Flower 1.42 has no way to upload a local FAB together with its signature.

What fedsft ships on top: :class:`AppIndex`, a one-app index that answers the Hub's
``fetch-fab`` call on the SuperLink's loopback (``FLWR_SUPERGRID_API_URL`` in
``start-superlink.sh``) while ``fedsft submit`` runs. It is transport only, trusted with
nothing: a SuperNode accepts the app because the signature verifies against the key the
site pinned, not because of where the FAB came from. ``flwr run <folder>`` still works
for anyone who can reach the Control API, but SuperNodes with ``--trusted-entities``
refuse what it submits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    decode_base64url,
    sign_message,
    verify_signature,
)

from deployment import pki

HUB_PATH = "/v1"  # FLWR_SUPERGRID_API_URL ends here; Flower appends /hub/fetch-fab
APP_INDEX_PORT = 9095  # the index's loopback port on the SuperLink host (default)


class SigningError(RuntimeError):
    """A signing key or an app cannot be used for a signed submission."""


def new_signing_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 key (the only kind ``--trusted-entities`` accepts)."""
    return ed25519.Ed25519PrivateKey.generate()


def public_line(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> str:
    """The OpenSSH public key line (``ssh-ed25519 AAAA...``)."""
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode("ascii")


def key_id(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> str:
    """The key's id in trusted entities and signatures: ``fpk_`` + a UUID of the key.

    Derived from the public key (not random) so that the coordinator and a site that
    only has the public key compute the same id.
    """
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"fpk_{uuid.UUID(bytes=hashlib.sha256(raw).digest()[:16])}"


def write_signing_key(key_path: Path, key: ed25519.Ed25519PrivateKey, *,
                      force: bool = False) -> Path:
    """Write the private key (OpenSSH, 0600) and ``<key>.pub`` next to it; returns the .pub."""
    pki.write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), force=force)
    pub = key_path.with_name(key_path.name + ".pub")
    pki.write_public(pub, (public_line(key) + " fedsft-app-signing\n").encode(), force=True)
    return pub


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read an OpenSSH Ed25519 private key.

    Raises
    ------
    SigningError
        If the file is missing or not an unencrypted Ed25519 key.
    """
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise SigningError(f"app-signing key {path}: cannot read it: {error}") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"app-signing key {path}: not an Ed25519 key "
                           "(flower-supernode --trusted-entities accepts Ed25519 only)")
    return key


def trusted_entities(public_lines: Mapping[str, str] | None = None, *,
                     keys: tuple[ed25519.Ed25519PublicKey, ...] = ()) -> dict[str, str]:
    """The ``--trusted-entities`` mapping: key id -> OpenSSH public key line."""
    entities = dict(public_lines or {})
    for public in keys:
        entities[key_id(public)] = public_line(public)
    return entities


def trusted_entities_yaml(entities: Mapping[str, str]) -> str:
    """The YAML text ``flower-supernode --trusted-entities`` reads (``yaml.safe_load``)."""
    return yaml.safe_dump(dict(entities), default_flow_style=False, sort_keys=True)


def read_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """Read an OpenSSH Ed25519 public key line (``<key>.pub``)."""
    public = serialization.load_ssh_public_key(path.read_bytes())
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise SigningError(f"{path}: not an Ed25519 public key")
    return public


@dataclass(frozen=True)
class Signature:
    """One signature of a FAB, as Flower's Hub hands it to the SuperLink."""

    public_key_id: str
    signature: str  # base64url without padding, as ``flwr app review`` submits it
    signed_at: int  # seconds since the epoch, part of the signed message

    def to_hub(self) -> dict[str, Any]:
        return {"public_key_id": self.public_key_id, "signature": self.signature,
                "signed_at": self.signed_at}


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, *,
             signed_at: int | None = None) -> Signature:
    """Sign a FAB as ``flwr app review`` does (Flower's message: time + SHA-256 of the FAB)."""
    signed_at = int(time.time()) if signed_at is None else signed_at
    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    raw = sign_message(key, message)
    return Signature(public_key_id=key_id(key), signed_at=signed_at,
                     signature=base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"))


def signature_valid(public: ed25519.Ed25519PublicKey, fab_sha256: str,
                    signature: Signature) -> bool:
    """Whether ``signature`` is ``public``'s over the FAB with this SHA-256 (hex), as the
    SuperNode checks it (Flower's message: signing time + the FAB's digest)."""
    try:
        digest, raw = bytes.fromhex(fab_sha256), decode_base64url(signature.signature)
    except ValueError:
        return False
    return verify_signature(public, create_message_to_sign(digest, signature.signed_at), raw)


def key_fingerprint(public: ed25519.Ed25519PublicKey) -> str:
    """``SHA256:<base64>``, the fingerprint ``ssh-keygen -lf <key>.pub`` prints."""
    blob = base64.b64decode(public_line(public).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class SignedApp:
    """One app the coordinator signed for a submission: a line of the signing log.

    ``<consortium>/app-signing/signed-apps.jsonl`` holds one JSON object per signed
    submission: ``{"app": "@publisher/name==version", "fab-sha256": hex,
    "public-key-id": "fpk_...", "signature": base64url, "signed-at": seconds}``. A run
    folder's app.json names the FAB's SHA-256 that ran; this log names its signature.
    """

    app: str
    fab_sha256: str
    signature: Signature

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "fab-sha256": self.fab_sha256,
                "public-key-id": self.signature.public_key_id,
                "signature": self.signature.signature,
                "signed-at": self.signature.signed_at}


def record_signed_app(log: Path, signed: SignedApp) -> None:
    """Append one signed submission to the signing log (made if absent)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps(signed.to_json(), sort_keys=True) + "\n")


def read_signed_apps(log: Path) -> list[SignedApp]:
    """The signing log's entries, oldest first (none when it is absent).

    Raises
    ------
    SigningError
        If a line is not a signing-log entry (named by its line number).
    """
    if not log.exists():
        return []
    entries = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            entries.append(SignedApp(app=str(obj["app"]), fab_sha256=str(obj["fab-sha256"]),
                                     signature=Signature(
                                         public_key_id=str(obj["public-key-id"]),
                                         signature=str(obj["signature"]),
                                         signed_at=int(obj["signed-at"]))))
        except (ValueError, KeyError, TypeError) as error:
            raise SigningError(f"{log} line {number}: not a signing-log entry "
                               f"({error})") from error
    return entries


def build_fab(app_dir: Path) -> bytes:
    """The FAB of an app folder, built as ``flwr run``/``flwr build`` build it."""
    # Imported here: flwr.cli.build costs seconds (FastAPI), which every `fedsft`
    # command importing the consortium module would pay.
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def _fab_metadata(fab: bytes) -> tuple[str, str]:
    """The FAB's ``(publisher/name, version)`` from its pyproject.toml."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    return str(fab_id), str(version)


def app_spec(fab: bytes) -> str:
    """The ``flwr run`` app spec of a FAB: ``@publisher/name==version``."""
    fab_id, version = _fab_metadata(fab)
    return f"@{fab_id}=={version}"


class AppIndex:
    """Serve one signed FAB the way the SuperLink fetches a Hub app; a context manager.

    ``POST <url>/hub/fetch-fab`` with ``{"app_id", "app_version"}`` answers
    ``{"fab_url", "verifications"}`` for the app it holds (404 otherwise), and
    ``GET /fab/<sha256>.fab`` answers the FAB. Listens on 127.0.0.1 only.
    """

    def __init__(self, fab: bytes, signatures: tuple[Signature, ...], *,
                 port: int = APP_INDEX_PORT) -> None:
        self.fab = fab
        self.signatures = signatures
        fab_id, self.version = _fab_metadata(fab)
        self.app_id = f"@{fab_id}"
        self.sha = hashlib.sha256(fab).hexdigest()
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: submit prints its own log
                pass

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    asked = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    asked = {}
                if self.path != f"{HUB_PATH}/hub/fetch-fab" or \
                        asked.get("app_id") != index.app_id or \
                        asked.get("app_version") not in (None, index.version):
                    self._send(404, json.dumps({"detail": {
                        "available_app_versions": [index.version]}}).encode(),
                        "application/json")
                    return
                self._send(200, json.dumps({
                    "fab_url": f"http://127.0.0.1:{index.port}/fab/{index.sha}.fab",
                    "verifications": [s.to_hub() for s in index.signatures],
                }).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802
                if self.path == f"/fab/{index.sha}.fab":
                    self._send(200, index.fab, "application/octet-stream")
                else:
                    self._send(404, b"", "text/plain")

        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as error:
            raise SigningError(f"cannot serve the signed app on 127.0.0.1:{port} ({error}); "
                               "is another `fedsft submit` running?") from error
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The ``FLWR_SUPERGRID_API_URL`` the SuperLink must have."""
        return f"http://127.0.0.1:{self.port}{HUB_PATH}"

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"

    def __enter__(self) -> AppIndex:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
