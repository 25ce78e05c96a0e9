"""The generated start scripts and the site registry: persistence, reconnection, honest
failures (no placeholder data path, no KeyError, no SuperNode on a missing file)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deployment import consortium as cons
from deployment import pki
from deployment.cli import main
from deployment.registry import register_site, revoke_site

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def consortium(tmp_path) -> cons.Consortium:
    return cons.create(tmp_path / "c", name="t", names=pki.Names(), sites=("a", "b"))


def _exec_line(script: Path) -> list[str]:
    """The words of the script's ``exec`` command (continuation lines joined)."""
    text = script.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("exec "))
    return shlex.split(line)[1:]


def _flag(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def _background(script: Path, program: str) -> list[str]:
    """The words of the script's ``program ... &`` line (continuation lines joined)."""
    text = script.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith(program + " "))
    assert line.endswith(" &"), line
    return shlex.split(line[:-2])


def test_the_superlink_keeps_its_state_in_the_consortium_folder(consortium):
    words = _background(consortium.root / "superlink/start-superlink.sh", "flower-superlink")

    assert _flag(words, "--database") == str(consortium.root / "superlink/state.db")
    assert consortium.state_db == consortium.root / "superlink/state.db"
    assert "--enable-supernode-auth" in words
    # Its own port on loopback only; the public port 8000 is the proxy's.
    assert (_flag(words, "--host"), _flag(words, "--port")) == ("127.0.0.1", "9093")


def test_a_supernode_retries_for_a_day_after_losing_the_superlink():
    command = cons.supernode_command(superlink="h:1", ca_cert="ca", private_key="k",
                                     data_path="/d.csv", site="a")
    assert _flag(command, "--max-wait-time") == "86400"
    assert "--max-retries" not in command  # no limit on the number of tries
    forever = cons.supernode_command(superlink="h:1", ca_cert="ca", private_key="k",
                                     data_path="/d.csv", site="a", max_wait_time=None)
    assert "--max-wait-time" not in forever


def test_bundle_port_gives_each_site_its_own_clientapp_port_and_flwr_home(consortium):
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/data/a.csv"]) == 0
    assert main(["bundle", str(consortium.root), "b", "--data-path", "/data/b.csv",
                 "--port", "9096", "--text-column", "body"]) == 0

    a = consortium.site_dir("a") / "start-supernode.sh"
    b = consortium.site_dir("b") / "start-supernode.sh"
    assert _flag(_exec_line(a), "--port") == "9094"
    assert _flag(_exec_line(b), "--port") == "9096"
    assert 'export FLWR_HOME="$HERE/flwr-home"' in b.read_text()
    assert _flag(_exec_line(b), "--node-config") == (
        'data-path="/data/b.csv" site-name="b" audit-egress=true text-column="body"')
    assert json.loads((consortium.site_dir("b") / "bundle.json").read_text()) == {
        "data-path": "/data/b.csv", "site-keys": {"text-column": "body"},
        "runtime-port": 9096, "task": "classification", "audit-egress": True,
        "superlink": "localhost:8000",
        "ca-sha256": pki.fingerprint(pki.load_cert(consortium.ca_cert))}


def test_bundle_sets_the_site_keys_of_the_sites_task_and_refuses_others(consortium, capsys):
    # Each task's site keys (TaskInfo.site_keys) are flags of `bundle`; an sft site
    # names its chat columns, which land in its node config and its data check.
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.jsonl",
                 "--task", "sft", "--chat-format", "messages",
                 "--messages-column", "chat"]) == 0
    script = consortium.site_dir("a") / "start-supernode.sh"
    node_config = ('data-path="/d.jsonl" site-name="a" audit-egress=true '
                   'chat-format="messages" messages-column="chat"')
    assert _flag(_exec_line(script), "--node-config") == node_config
    check = next(line for line in script.read_text().splitlines()
                 if "check-data" in line)
    assert "--task sft" in check and 'messages-column="chat"' in check
    # A key the task's sites do not set is refused, naming the ones they do; nothing
    # is rewritten.
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.jsonl",
                 "--text-column", "body"]) == 2
    err = capsys.readouterr().err
    assert "--text-column: a site of task sft does not set it" in err
    assert "--messages-column" in err
    assert _flag(_exec_line(script), "--node-config") == node_config
    # Back to classification: the chat keys are dropped, the given column is kept.
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.csv",
                 "--task", "classification", "--text-column", "body"]) == 0
    assert _flag(_exec_line(script), "--node-config").endswith(
        'audit-egress=true text-column="body"')
    # A value the node config cannot carry.
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.csv",
                 "--text-column", 'a" b']) == 2
    assert "must be non-empty, without quotes" in capsys.readouterr().err


def test_a_bundle_json_from_before_site_keys_keeps_its_columns(consortium):
    folder = consortium.site_dir("a")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bundle.json").write_text(json.dumps({
        "data-path": "/d.csv", "text-column": "note", "label-column": None,
        "runtime-port": 9094, "task": "classification", "audit-egress": True}))
    settings = cons.bundle_settings(consortium, "a")
    assert settings.site_keys == (("text-column", "note"),)
    # An sft bundle of then ignored its text-column; a key rotation still works.
    (folder / "bundle.json").write_text(json.dumps({
        "data-path": "/d.jsonl", "text-column": "prompt", "task": "sft"}))
    assert cons.bundle_settings(consortium, "a").site_keys == ()


def test_bundle_refuses_the_app_index_port_on_a_loopback_consortium(consortium, capsys):
    # localhost:8000: the site shares the SuperLink's host, where `fedsft submit` serves
    # the signed app on the app-index port (9095 by default).
    assert consortium.app_index_port == 9095
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.csv",
                 "--port", "9095"]) == 2
    err = capsys.readouterr().err
    assert "--port 9095 is the app index" in err and "pick another --port" in err
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.csv",
                 "--port", "9093"]) == 2  # the SuperLink's own port
    assert _flag(_exec_line(consortium.site_dir("a") / "start-supernode.sh"),
                 "--port") == "9094"  # nothing was rewritten


def test_bundle_warns_of_the_app_index_port_when_the_host_is_unknown(tmp_path, capsys):
    c = cons.create(tmp_path / "c", name="t", names=pki.Names(dns=("link.example.org",)),
                    sites=("a",))
    assert main(["bundle", str(c.root), "a", "--data-path", "/d.csv", "--port", "9095"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("fedsft: warning: --port 9095 is the app index")
    assert "if this site runs on that host" in err


def test_bundle_refuses_a_port_that_is_no_port(consortium, capsys):
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/d.csv",
                 "--port", "70000"]) == 2
    assert "--port must be a TCP port (1-65535), got 70000" in capsys.readouterr().err


def test_key_rotation_keeps_the_sites_data_path_columns_and_port(consortium):
    assert main(["bundle", str(consortium.root), "a", "--data-path", "/data/a.csv",
                 "--label-column", "y", "--port", "9100"]) == 0
    script = consortium.site_dir("a") / "start-supernode.sh"
    before_key = consortium.site_key("a").read_bytes()
    before = _exec_line(script)

    assert main(["add-site", str(consortium.root), "a", "--force"]) == 0

    assert consortium.site_key("a").read_bytes() != before_key
    assert _exec_line(script) == before
    assert cons.PLACEHOLDER_DATA_PATH not in script.read_text()


def test_a_new_site_without_a_data_path_gets_the_placeholder(consortium):
    assert main(["add-site", str(consortium.root), "c"]) == 0
    words = _exec_line(consortium.site_dir("c") / "start-supernode.sh")
    assert f'data-path="{cons.PLACEHOLDER_DATA_PATH}"' in _flag(words, "--node-config")


@pytest.fixture
def site_tools(tmp_path) -> Path:
    """A PATH folder: `fedsft` runs this checkout's CLI; `flower-supernode` records its
    arguments instead of connecting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fedsft").write_text(
        f'#!/bin/sh\ncd {shlex.quote(str(REPO))} && exec {shlex.quote(sys.executable)} '
        f'-m deployment.cli "$@"\n')
    (bin_dir / "flower-supernode").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        open(os.environ["STARTED"], "w").write(json.dumps(
            {{"argv": sys.argv[1:], "flwr_home": os.environ.get("FLWR_HOME")}}))
        """))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _start(script: Path, site_tools: Path, started: Path,
           fingerprint: str | None = None) -> subprocess.CompletedProcess:
    """Run a site's start script with the CA fingerprint its admin was told."""
    if fingerprint is None:
        fingerprint = pki.fingerprint(pki.load_cert(script.parent / "ca.pem"))
    env = {**os.environ, "PATH": f"{site_tools}{os.pathsep}{os.environ['PATH']}",
           "STARTED": str(started), "FEDSFT_CA_FINGERPRINT": fingerprint}
    return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_supernode_does_not_start_on_a_missing_data_file(consortium, site_tools,
                                                              tmp_path):
    missing = tmp_path / "gone.csv"
    assert main(["bundle", str(consortium.root), "a", "--data-path", str(missing)]) == 0

    result = _start(consortium.site_dir("a") / "start-supernode.sh", site_tools,
                    tmp_path / "started.json")

    assert result.returncode == 2
    assert f"data file not found: {missing}" in result.stderr
    assert not (tmp_path / "started.json").exists()


def test_the_supernode_does_not_start_on_an_unusable_data_file(consortium, site_tools,
                                                                tmp_path):
    data = tmp_path / "site.csv"
    data.write_text("note,triage\nfirst patient note,urgent\n")  # no column `text`
    assert main(["bundle", str(consortium.root), "a", "--data-path", str(data)]) == 0

    result = _start(consortium.site_dir("a") / "start-supernode.sh", site_tools,
                    tmp_path / "started.json")

    assert result.returncode == 2
    assert f"{data}: missing column 'text'" in result.stderr
    assert not (tmp_path / "started.json").exists()


def test_the_supernode_starts_after_its_data_passes_the_check(consortium, site_tools,
                                                               tmp_path):
    data = tmp_path / "site.csv"
    data.write_text("note,triage\n" + "".join(
        f"patient note number {i},{'urgent' if i % 2 else 'routine'}\n" for i in range(6)))
    assert main(["bundle", str(consortium.root), "a", "--data-path", str(data),
                 "--text-column", "note", "--label-column", "triage"]) == 0

    result = _start(consortium.site_dir("a") / "start-supernode.sh", site_tools,
                    tmp_path / "started.json")

    assert result.returncode == 0, result.stderr
    assert "result: no blocking problem" in result.stdout
    started = json.loads((tmp_path / "started.json").read_text())
    assert started["flwr_home"] == str(consortium.site_dir("a") / "flwr-home")
    assert _flag(started["argv"], "--auth-supernode-private-key") == str(
        consortium.site_key("a"))


def test_the_supernode_does_not_start_on_a_label_unknown_to_the_federation(
        tmp_path, site_tools, capsys):
    root = tmp_path / "c"
    assert main(["create", str(root), "--site", "a", "--labels", "routine, urgent"]) == 0
    assert "the federation's labels: routine, urgent" in capsys.readouterr().out
    c = cons.Consortium(root)
    data = tmp_path / "site.csv"
    data.write_text("note,triage\n" + "".join(
        f"patient note number {i},{'later' if i % 2 else 'routine'}\n" for i in range(6)))
    assert main(["bundle", str(root), "a", "--data-path", str(data),
                 "--text-column", "note", "--label-column", "triage"]) == 0
    script = c.site_dir("a") / "start-supernode.sh"
    check = next(shlex.split(line) for line in script.read_text().splitlines()
                 if line.startswith("fedsft check-data "))

    result = _start(script, site_tools, tmp_path / "started.json")

    assert (c.labels, c.label_case_fold) == (("routine", "urgent"), False)
    assert _flag(check, "--labels") == "routine,urgent"
    assert "--label-case-fold" not in check
    assert result.returncode == 1, result.stderr
    assert ("BLOCKING: label(s) 'later' not in the federation's labels ('routine', "
            "'urgent')") in result.stdout
    assert not (tmp_path / "started.json").exists()


def test_the_data_check_gets_labels_only_when_known_and_the_task_has_classes():
    settings = cons.BundleSettings(data_path="/d.csv")
    assert "--labels" not in cons.site_check_command(settings, "a")  # none known
    folded = cons.site_check_command(settings, "a", labels=("x", "y"), label_case_fold=True)
    assert folded[-3:] == ["--labels", "x,y", "--label-case-fold"]
    sft = cons.BundleSettings(data_path="/d.jsonl", task="sft")
    assert "--labels" not in cons.site_check_command(sft, "a", labels=("x", "y"))


@pytest.mark.parametrize("labels", ["only", "", "a,a"])
def test_create_refuses_labels_a_run_would_refuse(labels, tmp_path, capsys):
    assert main(["create", str(tmp_path / "c"), "--labels", labels]) == 2
    err = capsys.readouterr().err
    assert "must name at least 2 distinct classes" in err
    assert err.startswith("fedsft: error: --labels")  # the flag, not only the run's key
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_create_refuses_label_case_fold_without_labels(tmp_path, capsys):
    assert main(["create", str(tmp_path / "c"), "--label-case-fold"]) == 2
    err = capsys.readouterr().err
    assert "--label-case-fold needs --labels" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def _edit_settings(c: cons.Consortium, **changes: object) -> None:
    """Edit consortium.json by hand, as a coordinator may."""
    path = c.root / "consortium.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("labels, fold, expected", [
    (None, None, ((), False)),  # not given: no labels, no folding
    ([], False, ((), False)),
    (["routine", " urgent"], True, (("routine", "urgent"), True)),
])
def test_labels_read_from_consortium_json(consortium, labels, fold, expected):
    changes = {"labels": labels} if labels is not None else {}
    if fold is not None:
        changes["label-case-fold"] = fold
    _edit_settings(consortium, **changes)
    assert (consortium.labels, consortium.label_case_fold) == expected


@pytest.mark.parametrize("key, value, allowed", [
    ("labels", "routine,urgent", "a list of at least 2 distinct"),  # a string, not a list
    ("labels", ["routine"], "a list of at least 2 distinct"),
    ("labels", ["routine", "routine"], "a list of at least 2 distinct"),
    ("labels", ["routine", ""], "non-empty class names"),
    ("labels", ["routine", "a,b"], "without commas"),
    ("labels", ["routine", 3], "a list of at least 2 distinct"),
    ("label-case-fold", "yes", "true or false"),
    ("label-case-fold", 1, "true or false"),
])
def test_an_edited_consortium_json_with_bad_labels_is_refused_by_name(
        consortium, key, value, allowed):
    _edit_settings(consortium, **{key: value, **({} if key == "labels" else
                                                 {"labels": ["x", "y"]})})
    with pytest.raises(cons.ConsortiumError) as caught:
        _ = consortium.labels, consortium.label_case_fold
    message = str(caught.value)
    assert str(consortium.root / "consortium.json") in message and repr(key) in message
    assert allowed in message and json.dumps(value) in message


def test_labels_equal_once_case_folded_are_refused_when_the_runs_fold(consortium):
    _edit_settings(consortium, labels=["Urgent", "urgent"], **{"label-case-fold": False})
    assert consortium.labels == ("Urgent", "urgent")
    _edit_settings(consortium, **{"label-case-fold": True})
    with pytest.raises(cons.ConsortiumError, match="2 distinct"):
        _ = consortium.labels


# --- the registry ------------------------------------------------------------------------

@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    """A `flwr` whose `supernode register` hands out node ids 101, 102, ... and refuses a
    public key it saw before (as Flower does, also after `unregister`)."""
    state = tmp_path / "flwr-state.json"
    state.write_text(json.dumps({"next": 101, "keys": []}))
    script = tmp_path / "flwr"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        state = json.load(open({str(state)!r}))
        args = sys.argv[1:]
        if args[:2] == ["supernode", "register"]:
            key = open(args[2]).read()
            if key in state["keys"]:
                print(json.dumps({{"success": False,
                                   "error-message": "Public key already in use"}}))
                sys.exit(0)
            state["keys"].append(key)
            print(json.dumps({{"success": True, "node-id": state["next"]}}))
            state["next"] += 1
        json.dump(state, open({str(state)!r}, "w"))
        """))
    script.chmod(0o755)
    monkeypatch.setattr("deployment.processes.executable",
                        lambda name: str(script) if name == "flwr" else name)


def test_register_of_a_revoked_site_names_the_way_back_and_it_works(consortium, fake_flwr,
                                                                    capsys):
    assert register_site(consortium, "a") == 101
    assert revoke_site(consortium, "a") == 101
    assert consortium.registry()["a"]["revoked"] is True

    assert main(["register", str(consortium.root), "a"]) == 2
    err = capsys.readouterr().err
    assert "its key was revoked (node 101)" in err
    assert f"fedsft add-site {consortium.root} a --force --register" in err
    assert "KeyError" not in err

    assert main(["add-site", str(consortium.root), "a", "--force", "--register"]) == 0
    assert "registered a as node 102" in capsys.readouterr().out
    entry = consortium.registry()["a"]
    assert entry["node-id"] == 102 and "revoked" not in entry
    assert "replaced-node-ids" not in entry  # the old node is already unregistered


def test_rotation_remembers_the_old_node_id_to_unregister(consortium, fake_flwr, capsys):
    register_site(consortium, "a")

    assert main(["add-site", str(consortium.root), "a", "--force", "--register"]) == 0

    assert consortium.registry()["a"]["replaced-node-ids"] == [101]
    out = capsys.readouterr().out
    assert "still registered as node 101" in out and "flwr supernode unregister 101" in out


def test_a_register_reply_without_node_id_is_a_clear_error(consortium, monkeypatch):
    monkeypatch.setattr("deployment.registry.flwr_json", lambda *a, **k: {"success": True})
    with pytest.raises(cons.ConsortiumError, match="gave no node id"):
        register_site(consortium, "a")


def test_revoking_twice_or_an_unknown_site_is_refused(consortium, fake_flwr):
    with pytest.raises(cons.ConsortiumError, match="is not registered"):
        revoke_site(consortium, "a")
    register_site(consortium, "a")
    revoke_site(consortium, "a")
    with pytest.raises(cons.ConsortiumError, match="already revoked"):
        revoke_site(consortium, "a")


def test_each_signed_submission_is_logged_with_a_signature_that_verifies(tmp_path):
    from deployment import app_signing
    from deployment.processes import free_port

    consortium = cons.create(tmp_path / "c", name="t", names=pki.Names(), sites=("a",),
                             app_index_port=free_port())
    public = app_signing.read_public_key(
        consortium.app_signing_key.with_name("app-signing.key.pub"))
    with cons.signed_app_index(consortium, REPO) as first:  # each serves, then frees the port
        pass
    with cons.signed_app_index(consortium, REPO) as second:
        pass
    logged = app_signing.read_signed_apps(consortium.signed_apps_log)
    assert [e.fab_sha256 for e in logged] == [first.sha, second.sha]
    assert logged[0].app == first.spec and logged[0].signature == first.signatures[0]
    assert all(app_signing.signature_valid(public, e.fab_sha256, e.signature) for e in logged)
    # The signature covers the FAB: another FAB's digest does not verify.
    assert not app_signing.signature_valid(public, "00" * 32, logged[0].signature)
    consortium.signed_apps_log.write_text("not json\n")
    with pytest.raises(app_signing.SigningError, match="line 1"):
        app_signing.read_signed_apps(consortium.signed_apps_log)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_the_signing_key_fingerprint_is_the_one_ssh_keygen_prints(consortium):
    from deployment import app_signing

    pub = consortium.app_signing_key.with_name("app-signing.key.pub")
    printed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True,
                             text=True, check=True).stdout.split()[1]
    assert app_signing.key_fingerprint(app_signing.read_public_key(pub)) == printed
