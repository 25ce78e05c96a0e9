"""The Deployment Engine on loopback: TLS, SuperNode authentication, a real run.

One rehearsal (module fixture) driven by docs/deployment.md's commands (the list is in
deployment/rehearsal.py's docstring): two sites holding different CSV files, a third
whose file is missing (its start script refuses it) and a fourth whose file holds a
class the federation does not have (its client's data check refuses to train, and the
server records why), all behind the proxy, while site-a
tries six Control API calls through the public address; the same run again with the
SuperLink killed after round 1, restarted and resumed; once more with site-b's SuperNode
killed after round 1 (the run goes on without it); then `fedsft export
--consortium` + `fedsft predict` on its result. Separate short-lived SuperLinks check
that unregistered, revoked and non-TLS SuperNodes are refused.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deployment.cli import main
from deployment.predict import PredictError, predict_file
from deployment.rehearsal import Rehearsal, Site, rehearse

pytestmark = pytest.mark.e2e


def _easy(n: int, seed: int) -> pd.DataFrame:
    """Two classes, each text carrying one cue word of its class among fillers."""
    rng = np.random.default_rng(seed)
    filler = ["the", "a", "report", "today", "item", "service", "order", "we", "it",
              "was", "and", "of", "for", "with", "on"]
    cues = {"negative": ["terrible", "awful", "broken"],
            "positive": ["excellent", "great", "wonderful"]}
    rows = []
    for _ in range(n):
        label = str(rng.choice(list(cues)))
        words = [*rng.choice(filler, size=6), str(rng.choice(cues[label]))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("rehearsal")
    _easy(200, seed=1).to_csv(tmp / "a.csv", index=False)
    # Site b names its columns differently: its node config says so.
    _easy(200, seed=2).rename(columns={"text": "body", "label": "y"}).to_csv(
        tmp / "b.csv", index=False)
    _easy(200, seed=3).to_csv(tmp / "eval.csv", index=False)
    # Site d: a readable file (its start script's check, which knows no label map,
    # passes it) with a class outside the run's `labels`: blocking at its client.
    unknown = _easy(60, seed=4)
    unknown.loc[::3, "label"] = "neutral"
    unknown.to_csv(tmp / "d.csv", index=False)
    sites = [Site("site-a", tmp / "a.csv"),
             Site("site-b", tmp / "b.csv", text_column="body", label_column="y"),
             Site("site-c", tmp / "missing.csv"), Site("site-d", tmp / "d.csv")]
    lines: list[str] = []
    result = rehearse(sites, {
        "model": str(tiny_model_dir), "method": "lora", "learning-rate": 0.03,
        "local-steps": 20, "batch-size": 16, "max-length": 32, "num-server-rounds": 2,
        "fraction-evaluate": 0.0, "eval-dataset": str(tmp / "eval.csv"),
        "labels": "negative,positive", "node-wait-timeout": 60.0, "round-timeout": 480.0,
        "output-dir": str(tmp / "out"), "run-name": "rehearsal",
    }, work_dir=tmp / "work", on_line=lines.append, timeout=900,  # a hang guard
        attacks=True, restart=True, kill_site="site-b")
    return result, lines, tmp


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


def test_rehearsal_runs_two_rounds_and_improves(run):
    result, lines, _ = run
    assert result.returncode == 0, "\n".join(lines[-60:])
    assert any("registered site site-a as node" in x for x in lines)
    # While it trained, site-a tried the Control API through the public address with
    # its bundle's ca.pem: the proxy refused every call, none reached the SuperLink.
    assert "[fedsft] admin calls through the site address: 6 attempted, 6 refused" in lines
    attempts = {a.name: a for a in result.admin_attempts}
    assert set(attempts) == {"register a key", "unregister another site", "submit a run",
                             "list runs", "read logs", "stop a run"}
    assert all(a.refused and a.returncode != 0 for a in attempts.values())
    assert attempts["stop a run"].refused_paths == ("/v1/control/stop-run",)
    assert attempts["submit a run"].refused_paths == ("/v1/control/start-run",)
    registry = json.loads((result.work_dir / "consortium/registry.json").read_text())
    # No rogue key admitted, site-c not unregistered.
    assert result.nodes_after == tuple(sorted(int(e["node-id"]) for e in registry.values()))
    assert len(result.nodes_after) == 4
    assert result.runs_after == 1  # the site's run was never started
    rows = _rows(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    site_d = int(registry["site-d"]["node-id"])
    for row in rows[1:]:
        clients = row["clients"]
        assert clients["sampled"] == 3 and clients["aggregated"] == 2, clients
        # Site d's client refused its file before training (the data check: a label
        # outside the federation's), and the server recorded which node and why.
        assert clients["failures"] == 1, clients
        (problem,) = clients["problems"]
        assert f"node {site_d}" in problem and "site data" in problem, problem
        assert "cannot be used" in problem, problem
        # Counts by site name (from each site's node config), not by node id.
        assert clients["examples"].keys() == {"site-a", "site-b"}
    losses = [r["central"]["loss"] for r in rows]
    assert losses[2] < losses[0], losses
    assert rows[2]["train"]["train_loss"] < rows[1]["train"]["train_loss"]
    assert (result.run_dir / "final/model/config.json").is_file()
    assert (result.run_dir / "final/adapter").is_dir()
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["labels"] == "negative,positive" and config["dataset"] == "builtin"
    # Site c's file is missing: its start-supernode.sh refused to start it (the data
    # check, exit 2, the file named) and it never came online; the run went on with 2.
    (refusal,) = result.refused_sites  # site d's script started it: its file is readable
    assert (refusal.site, refusal.returncode) == ("site-c", 2), refusal
    assert "data file not found" in refusal.reason and "missing.csv" in refusal.reason
    assert any(x.startswith("[fedsft] site site-c refused by its start-supernode.sh "
                            "(exit 2)") for x in lines)
    site_log = (result.work_dir / "logs/supernode-site-c.log").read_text()
    assert "missing.csv" in site_log and "Starting Flower SuperNode" not in site_log
    # The other sites' scripts checked the bundle's ca.pem against the fingerprint
    # `fedsft create` printed, and their data, before starting the SuperNode.
    for site in ("site-a", "site-b"):
        log = (result.work_dir / f"logs/supernode-{site}.log").read_text()
        assert "ca.pem matches the fingerprint" in log
        assert "result: no blocking problem" in log
        assert "Starting Flower SuperNode" in log


def test_a_superlink_killed_mid_run_resumes_to_the_uninterrupted_runs_weights(run):
    result, lines, _ = run
    restart = result.restart
    assert restart is not None, "\n".join(lines[-40:])
    # Killed with round 1 recorded and round 2 not: the kill came in the middle.
    assert restart.killed_after_round == 1 and restart.rounds == 2, restart
    # Resumed with the documented command, on the restarted SuperLink (same database).
    assert restart.resume_command[:4] == (
        "submit", str(result.work_dir / "consortium"), "--set",
        f'resume-from="{restart.run_dir}"'), restart.resume_command  # a TOML string
    assert restart.resume_returncode == 0, "\n".join(lines[-60:])
    assert restart.differing == () and restart.ok, restart
    # The second attempt really resumed (the ServerApp's own line, streamed by submit):
    # identical weights cannot come from a retrain from scratch.
    resumed = f"[fedsft] resuming {restart.run_dir} after round 1"
    assert any(resumed in line and "preflight" not in line for line in lines), lines[-60:]
    assert [r["round"] for r in _rows(restart.run_dir)] == [0, 1, 2]
    outcome = json.loads((restart.run_dir / "outcome.json").read_text())
    assert outcome["status"] == "completed" and outcome["rounds_aggregated"] == 2
    # Two attempts of one run: each recorded the signed app it ran.
    apps = json.loads((restart.run_dir / "app.json").read_text())["attempts"]
    assert len(apps) == 2 and apps[0]["run-id"] != apps[1]["run-id"]
    assert any(line.startswith("[fedsft] SuperLink killed after round 1 of 2") and
               "identical" in line for line in lines)


def test_a_supernode_killed_mid_run_is_recorded_under_its_site_name(run):
    result, lines, _ = run
    kill = result.site_kill
    assert kill is not None, "\n".join(lines[-40:])
    registry = json.loads((result.work_dir / "consortium/registry.json").read_text())
    assert (kill.site, kill.node_id) == ("site-b", int(registry["site-b"]["node-id"]))
    # Killed with round 1 recorded, of 3: the run went on with site-a (site-d's data is
    # refused every round) and completed.
    assert kill.killed_after_round == 1 and kill.rounds == 3, kill
    assert kill.status == "completed" and kill.ok, kill
    # A later round names it by site and node: Flower's error reply for a node that
    # stopped its heartbeats, or this run's own no-reply problem.
    assert kill.problems and all("site-b (node" in p for p in kill.problems), kill
    assert any(("Node Unavailable" in p or "no reply within round-timeout" in p)
               for p in kill.problems), kill.problems
    rows = _rows(kill.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["clients"]["aggregated"] >= 1 for r in rows[1:])
    assert any(line.startswith("[fedsft] SuperNode of site-b killed after round 1 of 3")
               for line in lines)


def test_the_sites_refuse_unsigned_and_foreign_apps_and_a_tampered_bundle(run):
    result, lines, _ = run
    names = {a.name: a for a in result.attacks}
    assert set(names) == {"unsigned-app", "foreign-signed-app",
                          "modified-app-genuine-signature", "tampered-bundle"}
    for attack in result.attacks:
        assert attack.refused, (attack, "\n".join(lines[-40:]))
    assert "[fedsft] attacks: 4 attempted, 4 refused" in lines
    # The SuperNodes ran the genuine, signed app, and refused the others themselves.
    for site in ("site-a", "site-b"):
        log = (result.work_dir / f"logs/supernode-{site}.log").read_text()
        assert "FAB verification failed" in log
        assert "App verification is not supported" in log  # the unsigned upload
    # No attack run reached a ClientApp: the ServerApp may record its round-0 evaluation
    # (it runs at the coordinator), but no site's update was ever aggregated.
    out = result.run_dir.parent
    for name in names:
        if name != "tampered-bundle":
            assert not _aggregated_any(out / f"attack-{name}" / "results.jsonl"), name


def test_rehearsal_leaves_no_process_running(run):
    import psutil

    result, _, _ = run
    marker = str(result.work_dir)
    left = [p for p in psutil.process_iter(["cmdline"])
            if any(marker in part for part in (p.info["cmdline"] or []))]
    assert left == []


def test_export_then_predict_reproduces_the_exported_rounds_central_accuracy(run, tmp_path):
    result, _, tmp = run
    # As the docs' coordinator block runs it (and without --consortium).
    assert main(["export", str(result.run_dir), str(tmp_path / "model")]) == 0
    model = tmp_path / "model"
    card = (model / "README.md").read_text()
    assert "differential privacy: off" in card
    assert "rounds: 2" in card and "sites: 2 took part" in card
    assert "- sites that took part: `site-a` (" in card and "`site-b` (" in card
    assert "method: lora" in card
    # The ServerApp recorded the FAB it ran; without the consortium the card says the
    # signature was not checked, with it the card names the verified signature's key.
    fab = json.loads((result.run_dir / "app.json").read_text())["attempts"][0]["fab-hash"]
    assert f"FAB sha256 `{fab}`; signature not checked" in card
    consortium = result.work_dir / "consortium"
    assert main(["export", str(result.run_dir), str(tmp_path / "signed"),
                 "--consortium", str(consortium)]) == 0
    signed = tmp_path / "signed"
    signed_card = (signed / "README.md").read_text()
    from deployment.app_signing import key_fingerprint, key_id, read_public_key

    public = read_public_key(consortium / "app-signing/app-signing.key.pub")
    assert (f"FAB sha256 `{fab}`; signed by the consortium's app-signing key "
            f"`{key_id(public)}` ({key_fingerprint(public)}, Ed25519) at ") in signed_card
    assert "signature verified" in signed_card
    meta = json.loads((model / "fedsft.json").read_text())
    assert meta["max-length"] == 32 and meta["labels"] == ["negative", "positive"]

    assert main(["predict", str(model), str(tmp / "eval.csv"),
                 "--output", str(tmp_path / "pred.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "pred.csv")
    accuracy = float((predicted["prediction"] == predicted["label"]).mean())
    # The export holds the round the run selected (select-model=best by default).
    selected = json.loads((result.run_dir / "outcome.json").read_text())["selection"]["round"]
    row = next(r for r in _rows(result.run_dir) if r["round"] == selected)
    assert accuracy == pytest.approx(row["central"]["accuracy"], abs=1e-6)

    out = predict_file(model, tmp / "eval.csv", tmp_path / "pred.jsonl", progress=False)
    assert len(out.read_text().splitlines()) == len(predicted)
    with pytest.raises(PredictError, match="input file not found"):
        predict_file(model, tmp / "nope.csv", tmp_path / "x.csv", progress=False)
    with pytest.raises(PredictError, match="missing text column 'body'"):
        predict_file(model, tmp / "eval.csv", tmp_path / "x.csv", text_column="body",
                     progress=False)


def _exits(proc: subprocess.Popen, timeout: float = 45) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc.poll()  # None: still running, i.e. connected


def test_unregistered_revoked_and_plaintext_supernodes_are_refused(tmp_path):
    data = tmp_path / "a.csv"
    _easy(20, seed=0).to_csv(data, index=False)
    with Rehearsal(tmp_path / "work", ["good", "stranger"]) as rehearsal:
        rehearsal.start_superlink()
        rehearsal.register("good")
        good = rehearsal.start_supernode(Site("good", data))
        stranger = rehearsal.start_supernode(Site("stranger", data), give_up_after=10)
        plaintext = rehearsal.start_supernode(Site("good", data), tls=False,
                                              give_up_after=10)
        rehearsal.wait_online(1)

        assert _exits(stranger) not in (None, 0)  # key not registered
        assert _exits(plaintext) not in (None, 0)  # no TLS
        assert good.poll() is None  # the registered site stays connected
        assert [n["status"] for n in rehearsal.nodes()] == ["online"]

        rehearsal.unregister("good")
        rehearsal.processes.stop(good)
        again = rehearsal.start_supernode(Site("good", data), give_up_after=10)
        assert _exits(again) not in (None, 0)  # revoked
        assert not any(n["status"] == "online" for n in rehearsal.nodes())
    log = (tmp_path / "work/logs/supernode-stranger.log").read_text()
    assert "Failed to activate SuperNode" in log or "Exit Code" in log


def test_registrations_survive_a_superlink_restart_and_the_supernode_reconnects(tmp_path):
    data = tmp_path / "a.csv"
    _easy(20, seed=0).to_csv(data, index=False)
    with Rehearsal(tmp_path / "work", ["good"]) as rehearsal:
        rehearsal.start_superlink()
        node_id = rehearsal.register("good")
        good = rehearsal.start_supernode(Site("good", data))
        rehearsal.wait_online(1)

        assert rehearsal.superlink is not None
        rehearsal.processes.stop(rehearsal.superlink)  # a crash or a maintenance restart
        time.sleep(3)
        rehearsal.start_superlink()  # same --database

        assert [int(n["node-id"]) for n in rehearsal.nodes()] == [node_id]
        rehearsal.wait_online(1)
        time.sleep(10)  # long enough for a refused SuperNode to have exited
        assert good.poll() is None  # reconnected instead of exiting on 401
        assert [n["status"] for n in rehearsal.nodes()] == ["online"]


def _aggregated_any(results: Path) -> bool:
    """Whether a run's results.jsonl (if any) records an aggregated site update."""
    if not results.exists():
        return False
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return any((row.get("clients") or {}).get("aggregated") for row in rows)
