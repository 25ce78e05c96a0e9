# ruff: noqa: F811 (the fixtures of test_consortium, imported to be shared)
"""The site's side: its own key pair, the bundle's CA fingerprint checked before it
connects, the app-signing key it trusts, and the coordinator registering and revoking
a key it never held."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest
import requests
import yaml
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from deployment import app_signing, pki
from deployment import consortium as cons
from deployment.cli import main
from deployment.registry import register_site, revoke_site
from deployment.site import BundleError, site_init, verify_bundle
from deployment.site_attacks import Attack, modified_fab, summary
from tests.deployment.test_consortium import (  # noqa: F401 (pytest fixtures)
    _exec_line,
    _flag,
    _start,
    consortium,
    fake_flwr,
    site_tools,
)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- site-made keys ------------------------------------------------------------------

def test_site_init_makes_the_key_pair_at_the_site_with_safe_permissions(tmp_path, capsys):
    folder = tmp_path / "hospital-a"
    assert main(["site", "init", str(folder), "--site", "hospital-a"]) == 0

    out = capsys.readouterr().out
    public = (folder / "supernode.pub").read_text()
    assert public.strip() in out  # printed to send to the coordinator
    assert "BEGIN" not in out  # never the private key
    assert _mode(folder) == 0o700 and _mode(folder / "supernode.key") == 0o600
    assert _mode(folder / "supernode.pub") == 0o644
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.strip().endswith("hospital-a")
    # An existing key is never replaced silently.
    assert main(["site", "init", str(folder), "--site", "hospital-a"]) == 2
    assert "exists" in capsys.readouterr().err


def test_add_site_with_a_public_key_bundles_no_private_key_and_revoke_works(
        consortium, fake_flwr, tmp_path, capsys):
    keys = site_init(tmp_path / "site-c", site="c")
    assert main(["add-site", str(consortium.root), "c", "--public-key", str(keys.public_key),
                 "--data-path", "/data/c.csv", "--register"]) == 0
    out = capsys.readouterr().out
    assert "registered c as node 101" in out and "no private key" in out
    bundle = consortium.site_dir("c")
    assert not (bundle / "supernode.key").exists()
    assert (bundle / "supernode.pub").read_text() == keys.public_key.read_text()

    assert main(["revoke", str(consortium.root), "c"]) == 0  # not "not registered"
    assert consortium.registry()["c"]["revoked"] is True
    # Re-admission with a new site-made key; the rotation keeps the data path.
    new = site_init(tmp_path / "site-c2", site="c")
    assert main(["add-site", str(consortium.root), "c", "--public-key", str(new.public_key),
                 "--force", "--register"]) == 0
    assert consortium.registry()["c"]["node-id"] == 102
    assert "revoked" not in consortium.registry()["c"]
    assert 'data-path="/data/c.csv"' in _flag(_exec_line(bundle / "start-supernode.sh"),
                                              "--node-config")


def test_add_site_refuses_a_key_flower_would_not_accept(consortium, tmp_path, capsys):
    private = tmp_path / "oops.key"
    private.write_bytes(pki.ssh_private(pki.new_key()))  # the private key, by mistake
    assert main(["add-site", str(consortium.root), "c", "--public-key", str(private)]) == 2
    assert "not an OpenSSH public key" in capsys.readouterr().err
    ed = tmp_path / "ed.pub"
    ed.write_text(app_signing.public_line(app_signing.new_signing_key()))
    with pytest.raises(cons.ConsortiumError, match="expected an EC P-384 key"):
        cons.add_site(consortium, "c", public_key=ed)
    assert not consortium.site_pub("c").exists()


def test_register_then_revoke_a_site_made_key_through_the_python_api(consortium, fake_flwr,
                                                                    tmp_path):
    keys = site_init(tmp_path / "s", site="d")
    cons.add_site(consortium, "d", public_key=keys.public_key)
    assert register_site(consortium, "d") == 101
    assert revoke_site(consortium, "d") == 101


# --- the bundle's fingerprint and address -----------------------------------------------

def test_create_and_bundle_print_the_ca_fingerprint(tmp_path, capsys):
    assert main(["create", str(tmp_path / "c"), "--site", "a"]) == 0
    out = capsys.readouterr().out
    fp = pki.fingerprint(pki.load_cert(tmp_path / "c/ca/ca.pem"))
    assert f"CA SHA-256 fingerprint: {fp}" in out
    # openssl's form: 32 upper-case hex pairs; and the bundle records it with the address.
    assert len(fp.split(":")) == 32 and fp == fp.upper()
    recorded = json.loads((tmp_path / "c/sites/a/bundle.json").read_text())
    assert recorded["ca-sha256"] == fp and recorded["superlink"] == "localhost:8000"
    assert main(["bundle", str(tmp_path / "c"), "a", "--data-path", "/d.csv"]) == 0
    assert fp in capsys.readouterr().out


def test_a_fingerprint_is_read_however_a_person_types_it(consortium):
    fp = pki.fingerprint(pki.load_cert(consortium.ca_cert))
    folder = consortium.site_dir("a")
    for typed in (fp, fp.lower().replace(":", ""), f"sha256 Fingerprint={fp}",
                  "SHA256:" + fp.replace(":", " ")):
        assert verify_bundle(folder, fingerprint=typed) == fp
    with pytest.raises(BundleError, match="64 hex digits"):
        verify_bundle(folder, fingerprint="12:34")


def test_a_tampered_ca_or_address_or_no_fingerprint_is_refused(consortium):
    fp = pki.fingerprint(pki.load_cert(consortium.ca_cert))
    folder = consortium.site_dir("a")
    with pytest.raises(BundleError, match="FEDSFT_CA_FINGERPRINT"):
        verify_bundle(folder, fingerprint=None)  # a check one can skip protects nothing
    with pytest.raises(BundleError, match="start script connects to evil:1"):
        verify_bundle(folder, fingerprint=fp, address="evil:1")
    with pytest.raises(BundleError, match="expected other:8000"):
        verify_bundle(folder, fingerprint=fp, expected_address="other:8000")
    (folder / "ca.pem").write_bytes(pki.cert_pem(pki.make_ca(pki.new_key(), name="rogue")))
    with pytest.raises(BundleError, match="is not the consortium CA"):
        verify_bundle(folder, fingerprint=fp)


def test_the_start_script_refuses_a_tampered_bundle_before_the_supernode_starts(
        consortium, site_tools, tmp_path):
    data = tmp_path / "site.csv"
    data.write_text("text,label\n" + "".join(f"note {i},{i % 2}\n" for i in range(6)))
    assert main(["bundle", str(consortium.root), "a", "--data-path", str(data)]) == 0
    script = consortium.site_dir("a") / "start-supernode.sh"
    genuine = pki.fingerprint(pki.load_cert(consortium.ca_cert))
    (consortium.site_dir("a") / "ca.pem").write_bytes(
        pki.cert_pem(pki.make_ca(pki.new_key(), name="rogue")))

    result = _start(script, site_tools, tmp_path / "started.json", fingerprint=genuine)

    assert result.returncode == 2
    assert "is not the consortium CA you were told about" in result.stderr
    assert not (tmp_path / "started.json").exists()
    unset = _start(script, site_tools, tmp_path / "started.json", fingerprint="")
    assert unset.returncode == 2 and "FEDSFT_CA_FINGERPRINT" in unset.stderr
    assert not (tmp_path / "started.json").exists()


# --- app signing -------------------------------------------------------------------------

def test_every_site_trusts_the_coordinators_app_signing_key(consortium):
    words = _exec_line(consortium.site_dir("a") / "start-supernode.sh")
    assert _flag(words, "--trusted-entities") == "$HERE/trusted-entities.yaml"
    entities = yaml.safe_load((consortium.site_dir("a") / "trusted-entities.yaml").read_text())
    public = load_ssh_public_key((consortium.app_signing_key.parent /
                                  "app-signing.key.pub").read_bytes())
    assert entities == {app_signing.key_id(public): app_signing.public_line(public)}
    assert list(entities)[0].startswith("fpk_")
    assert _mode(consortium.app_signing_key) == 0o600
    # The SuperLink fetches signed apps from fedsft submit's index on its loopback.
    text = (consortium.root / "superlink/start-superlink.sh").read_text()
    assert (f"export FLWR_SUPERGRID_API_URL=http://127.0.0.1:"
            f"{app_signing.APP_INDEX_PORT}/v1") in text


def _as_superlink_stores_it(fab: bytes, signatures) -> Fab:
    """The FAB as the SuperLink hands it to SuperNodes after fetching it from a Hub."""
    verifications = {s.public_key_id: json.dumps({"signature": s.signature,
                                                  "signed_at": s.signed_at})
                     for s in signatures}
    return Fab(hashlib.sha256(fab).hexdigest(), fab, {**verifications,
                                                      "valid_license": "Valid"})


def test_flowers_own_verification_accepts_our_signature_and_only_ours():
    fab = app_signing.build_fab(app_signing.Path(__file__).resolve().parents[2])
    key = app_signing.new_signing_key()
    trusted = app_signing.trusted_entities(keys=(key.public_key(),))
    signature = app_signing.sign_fab(fab, key)

    assert _verify_fab(_as_superlink_stores_it(fab, [signature]), trusted)
    foreign = app_signing.sign_fab(fab, app_signing.new_signing_key())
    assert not _verify_fab(_as_superlink_stores_it(fab, [foreign]), trusted)
    # The genuine signature on a modified app (its audit switched off) does not verify.
    assert not _verify_fab(_as_superlink_stores_it(modified_fab(fab), [signature]), trusted)
    # A forged signature under the trusted key id does not verify either.
    forged = app_signing.Signature(signature.public_key_id, foreign.signature,
                                   foreign.signed_at)
    assert not _verify_fab(_as_superlink_stores_it(fab, [forged]), trusted)


def test_the_app_index_answers_the_superlinks_hub_request():
    from flwr.supercore.utils import request_download_link

    fab = app_signing.build_fab(app_signing.Path(__file__).resolve().parents[2])
    signature = app_signing.sign_fab(fab, app_signing.new_signing_key(), signed_at=1)
    with app_signing.AppIndex(fab, (signature,), port=0) as index:
        assert index.spec == "@fedsft/fedsft==0.1.0" == app_signing.app_spec(fab)
        url, verifications, _ = request_download_link(
            "@fedsft/fedsft", "0.1.0", f"{index.url}/hub/fetch-fab", "fab_url")
        assert verifications == [signature.to_hub()]
        assert requests.get(url, timeout=10).content == fab
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@other/app", "1.0.0", f"{index.url}/hub/fetch-fab",
                                  "fab_url")


def test_the_attack_summary_counts_and_names_what_got_through():
    assert summary([Attack("a", True, ""), Attack("b", True, "")]) == \
        "attacks: 2 attempted, 2 refused"
    assert summary([Attack("a", True, ""), Attack("b", False, "")]) == \
        "attacks: 2 attempted, 1 refused (NOT refused: b)"
