"""Consortium creation: certificates verify against the CA, keys are private and kept."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from deployment import consortium as cons
from deployment import pki
from deployment.cli import main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_a_verifiable_tls_chain_and_site_keys(tmp_path):
    c = cons.create(tmp_path / "c", name="acme", sites=("site-a", "site-b"),
                    names=pki.split_names(["localhost", "link.example.org", "127.0.0.1",
                                           "10.1.2.3"]))

    ca, server = pki.load_cert(c.ca_cert), pki.load_cert(c.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    dns, ips = pki.san_names(server)
    assert dns == ["localhost", "link.example.org"]
    assert ips == ["127.0.0.1", "10.1.2.3"]
    assert c.address == "localhost:8000"
    assert pki.load_key(c.server_key).public_key() == server.public_key()
    for site in ("site-a", "site-b"):
        key = load_ssh_private_key(c.site_key(site).read_bytes(), None)
        public = load_ssh_public_key(c.site_pub(site).read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
        assert key.public_key() == public
        assert (c.site_dir(site) / "ca.pem").read_bytes() == c.ca_cert.read_bytes()
        script = (c.site_dir(site) / "start-supernode.sh").read_text()
        assert "--auth-supernode-private-key" in script and "--root-certificates" in script
        assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in script
    for key in (c.ca_key, c.server_key, c.site_key("site-a"), c.site_key("site-b")):
        assert _mode(key) == 0o600, key
    assert 'root-certificates = "' in (c.flwr_home / "config.toml").read_text()


def test_create_again_refuses_without_force_and_keeps_the_keys(tmp_path, capsys):
    root = tmp_path / "c"
    assert main(["create", str(root), "--site", "a"]) == 0
    keys = [root / "ca/ca.key", root / "superlink/server.key", root / "sites/a/supernode.key"]
    before = [k.read_bytes() for k in keys]

    assert main(["create", str(root), "--site", "a"]) == 2
    assert "use --force" in capsys.readouterr().err
    assert [k.read_bytes() for k in keys] == before

    assert main(["create", str(root), "--site", "a", "--force"]) == 0
    assert all(k.read_bytes() != b for k, b in zip(keys, before, strict=True))
    assert all(_mode(k) == 0o600 for k in keys)


def test_write_private_never_overwrites(tmp_path):
    path = tmp_path / "k"
    pki.write_private(path, b"one")
    with pytest.raises(pki.KeyExistsError):
        pki.write_private(path, b"two")
    assert path.read_bytes() == b"one" and _mode(path) == 0o600


def test_bad_names_are_rejected(tmp_path):
    with pytest.raises(cons.ConsortiumError, match="site name"):
        cons.create(tmp_path / "c", name="x", names=pki.Names(), sites=("../evil",))
    with pytest.raises(ValueError, match="at least one"):
        pki.Names(dns=(), ips=())
