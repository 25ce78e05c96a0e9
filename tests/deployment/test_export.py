"""``fedsft export``: what it writes, and that it never replaces a run or foreign files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import deployment.export as export_module
from deployment.export import EXPORT_KIND, EXPORT_META, ExportError, export_run
from server.results import ResultsRow
from server.run_outputs import outcome_of, write_outcome

ROWS = [
    {"round": 0, "central": {"accuracy": 0.5, "f1_macro": 0.4, "loss": 0.7}, "clients": {}},
    {"round": 1, "central": {"accuracy": 0.8, "f1_macro": 0.7, "loss": 0.5},
     "clients": {"sampled": 2, "aggregated": 2}},
]


def _run(folder: Path) -> Path:
    """A finished run folder as the server leaves it (fake weights: export copies bytes)."""
    model = folder / "final" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (model / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text(json.dumps({"model": "minilm", "max-length": 32,
                                                    "method": "lora"}))
    (folder / "label_map.json").write_text(json.dumps({"0": "neg", "1": "pos"}))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "round-0001.safetensors").write_bytes(b"checkpoint")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_copies_the_model_and_marks_itself(tmp_path):
    run = _run(tmp_path / "outputs" / "run")
    out = export_run(run, tmp_path / "model")
    assert (out / "model.safetensors").read_bytes() == b"weights"
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["kind"] == EXPORT_KIND and meta["labels"] == ["neg", "pos"]
    assert meta["run"] == str(run.resolve()) and meta["rounds"] == 1
    assert "# run: federated fine-tuned" in (out / "README.md").read_text()


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("target", [".", "final", "final/model", "exported", "checkpoints"])
def test_a_target_inside_the_run_is_refused_and_the_run_survives(tmp_path, target, force):
    run = _run(tmp_path / "outputs" / "run")
    before = _files(run)
    with pytest.raises(ExportError, match="inside the run folder") as err:
        export_run(run, run / target, force=force)
    assert str(run) in str(err.value)
    assert _files(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["final", "config.json", "label_map.json", "results.jsonl", "checkpoints"])


@pytest.mark.parametrize("force", [False, True])
def test_a_parent_of_the_run_is_refused_and_every_sibling_run_survives(tmp_path, force):
    outputs = tmp_path / "outputs"
    run, sibling = _run(outputs / "run"), _run(outputs / "other-run")
    before = _files(tmp_path)
    for parent in (outputs, tmp_path):
        with pytest.raises(ExportError, match="contains the run folder"):
            export_run(run, parent, force=force)
    assert _files(tmp_path) == before and sibling.is_dir()


def test_a_symlink_into_the_run_is_refused(tmp_path):
    run = _run(tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run / "final", target_is_directory=True)
    before = _files(run)
    with pytest.raises(ExportError, match="inside the run folder"):
        export_run(run, link, force=True)
    assert _files(run) == before


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_that_is_no_export_is_never_replaced(tmp_path, force):
    run = _run(tmp_path / "outputs" / "run")
    other = _run(tmp_path / "outputs" / "another-run")  # e.g. a second run, by mistake
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    before = _files(tmp_path)
    for target in (other, notes):
        with pytest.raises(ExportError, match="not an earlier fedsft export") as err:
            export_run(run, target, force=force)
        assert str(target) in str(err.value) and "not even with --force" in str(err.value)
    assert _files(tmp_path) == before


def test_an_existing_file_is_refused(tmp_path):
    run = _run(tmp_path / "run")
    (tmp_path / "model").write_text("a file")
    with pytest.raises(ExportError, match="not a folder"):
        export_run(run, tmp_path / "model", force=True)
    assert (tmp_path / "model").read_text() == "a file"


def test_an_empty_folder_is_used(tmp_path):
    run = _run(tmp_path / "run")
    (tmp_path / "model").mkdir()
    export_run(run, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"


def test_an_earlier_export_needs_force_and_is_then_replaced(tmp_path):
    run = _run(tmp_path / "run")
    out = export_run(run, tmp_path / "model")
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["files"] == ["README.md", "config.json", "model.safetensors"]  # + itself
    # A file the earlier export wrote (its list says so) that the new one will not write.
    (out / "stale.bin").write_text("from the earlier export")
    (out / EXPORT_META).write_text(json.dumps({**meta, "files": [*meta["files"], "stale.bin"]}))
    (run / "final" / "model" / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(ExportError, match="use --force"):
        export_run(run, out)
    assert (out / "stale.bin").exists()
    export_run(run, out, force=True)
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert not (out / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]  # nothing left over


@pytest.mark.parametrize("placed", ["preds.csv", "notes/today.txt"])
def test_force_never_deletes_a_file_the_export_did_not_write(tmp_path, placed):
    run = _run(tmp_path / "run")
    out = export_run(run, tmp_path / "model")
    (out / placed).parent.mkdir(parents=True, exist_ok=True)
    (out / placed).write_text("the user's own file")
    before = _files(out)

    with pytest.raises(ExportError, match=f"holds files the export did not write \\({placed}\\)"):
        export_run(run, out, force=True)
    assert _files(out) == before


def test_an_export_from_before_the_kind_field_is_recognised(tmp_path):
    run = _run(tmp_path / "run")
    old = tmp_path / "model"
    old.mkdir()
    (old / EXPORT_META).write_text(json.dumps({"run": "/x", "labels": ["a"], "max-length": 8}))
    export_run(run, old, force=True)
    assert json.loads((old / EXPORT_META).read_text())["kind"] == EXPORT_KIND


def test_a_failure_mid_copy_keeps_the_earlier_export_and_leaves_no_temporary_folder(
    tmp_path, monkeypatch
):
    run = _run(tmp_path / "run")
    out = export_run(run, tmp_path / "model")
    before = _files(out)

    def copy_then_fail(src, dst, **kwargs):
        shutil.copy2(Path(src) / "config.json", Path(dst) / "config.json")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_run(run, out, force=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]


@pytest.mark.parametrize("missing", ["final/model/model.safetensors", "final/model/config.json",
                                     "label_map.json", "results.jsonl"])
def test_a_run_without_weights_or_config_is_a_clear_error(tmp_path, missing):
    run = _run(tmp_path / "run")
    (run / missing).unlink()
    with pytest.raises(ExportError, match="is not a finished fedsft run"):
        export_run(run, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_the_card_names_the_exported_round_and_its_metrics(tmp_path):
    run = _run(tmp_path / "run")
    rows = [*ROWS, {"round": 2, "central": {"accuracy": 0.6, "f1_macro": 0.5, "loss": 0.9},
                    "clients": {"sampled": 2, "aggregated": 2}}]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    selection = {"rule": "best", "round": 1, "last_round": 2, "metric": "accuracy",
                 "split": "validation", "value": 0.84,
                 "note": "best validation accuracy 0.8400 at round 1 of 2"}
    typed = [ResultsRow.from_json(r) for r in rows]
    write_outcome(run, outcome_of(typed, status="completed", message="ok", final_model=True,
                                  selection=selection))
    out = export_run(run, tmp_path / "model")
    card = (out / "README.md").read_text()
    assert ("- exported model: round 1 of 2 (best validation accuracy 0.8400 at round 1 of 2)"
            in card)
    assert "- central evaluation of the exported model: accuracy 0.8000" in card  # round 1's
    assert json.loads((out / EXPORT_META).read_text())["selection"]["round"] == 1


def test_the_card_gives_each_sites_epsilon_and_calibrated_noise(tmp_path):
    # Site b trained only in round 1 (fraction-train < 1): its last report is round 1's.
    config = {"dp-sgd-target-epsilon": 8.0, "dp-sgd-noise-multiplier": 0.0,
              "dp-sgd-delta": 1e-5}
    rows = [
        {"round": 0, "central": {"accuracy": 0.5}},
        {"round": 1, "dp_sgd": {"epsilon_max": 5.0, "delta": 1e-5, "sites": {
            "b": {"epsilon": 5.0, "noise_multiplier": 0.9},
            "a": {"epsilon": 4.0, "noise_multiplier": 0.8}}}},
        {"round": 2, "dp_sgd": {"epsilon_max": 7.5, "delta": 1e-5, "sites": {
            "a": {"epsilon": 7.5, "noise_multiplier": 0.8}}}},
    ]

    privacy = export_module.privacy_summary(config, [ResultsRow.from_json(r) for r in rows])
    card = "\n".join(export_module._privacy_lines(privacy))

    assert privacy["sample-level"]["sites"] == {
        "a": {"epsilon": 7.5, "noise_multiplier": 0.8},
        "b": {"epsilon": 5.0, "noise_multiplier": 0.9}}
    assert "epsilon = 7.5 at delta = 1e-05" in card
    assert "`dp-sgd-noise-multiplier` = calibrated per site" in card
    assert "  - site `a`: epsilon = 7.5, noise multiplier 0.8\n" in card
    assert card.endswith("  - site `b`: epsilon = 5, noise multiplier 0.9")


def test_an_sft_card_is_a_chat_models_with_generation_usage_and_retention(tmp_path):
    run = _run(tmp_path / "sft-run")
    (run / "config.json").write_text(json.dumps({
        "task": "sft", "model": "", "max-length": 256, "method": "lora",
        "strategy": "fedavg", "max-new-tokens": 32, "system-prompt": "Be brief."}))
    (run / "label_map.json").write_text("{}")
    rows = [
        {"round": 0, "central": {"exact_match": 0.0, "token_f1": 0.1, "loss": 2.0,
                                 "perplexity": 7.39, "num_examples": 40},
         "retention": {"loss": 1.5, "exact_match": 0.5}},
        {"round": 1, "central": {"loss": 1.4, "perplexity": 4.06, "num_examples": 40},
         "retention": {"loss": 1.6}, "clients": {"sampled": 2, "aggregated": 2}},
        {"round": 2, "central": {"exact_match": 0.25, "token_f1": 0.4, "loss": 1.2,
                                 "perplexity": 3.32, "num_examples": 40},
         "retention": {"loss": 1.62, "exact_match": 0.45},
         "clients": {"sampled": 2, "aggregated": 2}},
    ]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    card = (export_run(run, tmp_path / "model") / "README.md").read_text()

    assert "pipeline_tag: text-generation" in card
    assert "- base model: HuggingFaceTB/SmolLM2-135M-Instruct (packaged as GGUF" in card
    assert "# sft-run: federated fine-tuned chat model" in card
    assert ("- final central evaluation: exact match 0.2500, token F1 0.4000, "
            "assistant-token loss 1.2000, perplexity 3.3200 on 40 examples") in card
    assert ("- forgetting monitor (`retention-dataset`), change since round 0: "
            "exact match -0.0500, assistant-token loss +0.1200") in card
    assert "- labels:" not in card
    assert "AutoModelForCausalLM.from_pretrained('PATH/TO/THIS/FOLDER')" in card
    assert "{'role': 'system', 'content': 'Be brief.'}," in card
    assert "tokenizer.apply_chat_template(messages, add_generation_prompt=True," in card
    assert "max_new_tokens=32, do_sample=False" in card
    assert "`fedsft predict PATH/TO/THIS/FOLDER prompts.jsonl --output answers.jsonl`" in card
    assert "pipeline('text-classification'" not in card


def test_the_card_names_the_sites_with_their_example_counts_and_what_dp_covers():
    rows = [ResultsRow.from_json(r) for r in [
        {"round": 0, "clients": {}},
        {"round": 1, "clients": {"sampled": 3, "aggregated": 2,
                                 "examples": {"site-b": 180, "site-a": 200}}},
        # Site b's local split grew (a re-read file): the card gives its largest count.
        {"round": 2, "clients": {"sampled": 3, "aggregated": 2,
                                 "examples": {"site-a": 200, "site-b": 190}}},
        {"round": 3, "clients": {"aggregated": 2}, "privacy": {
            "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 1.0, "clipping_norm": 1.0,
            "clipping": "fixed", "side": "server", "sampling_rate": 1.0,
            "accountant": "rdp"}},
    ]]
    summary = export_module.summarize({"dp-delta": 1e-5, "dp-noise-multiplier": 1.0}, rows)

    lines = export_module.participation_lines(summary)

    assert summary["site-examples"] == {"site-a": 200, "site-b": 190}
    assert lines[0] == ("- sites that took part: `site-a` (200 training examples), "
                        "`site-b` (190 training examples)")
    assert lines[1].startswith("- what client-level DP over 2 sites protects:")
    assert "does not hide anything from the coordinator" in lines[1]
    assert len(lines) == 2  # no sample-level DP-SGD in this run


def test_the_card_says_what_no_dp_and_dp_sgd_mean():
    off = export_module.summarize({}, [ResultsRow.from_json({"round": 1})])
    dp_sgd = export_module.summarize({}, [ResultsRow.from_json(
        {"round": 1, "dp_sgd": {"epsilon_max": 2.0, "delta": 1e-5, "sites": {}}})])

    assert export_module.participation_lines(off) == [
        "- without differential privacy, the updates and the model may reveal "
        "information about individual training records"]
    assert export_module.participation_lines(dp_sgd)[0].startswith(
        "- what sample-level DP-SGD protects: at each site, any one training record")


def _signed_consortium(tmp_path: Path, fab_sha: str, *, key=None):
    """A consortium whose signing log holds a signature of ``fab_sha`` (by ``key``, else
    by the consortium's own app-signing key)."""
    import base64

    from deployment import app_signing, pki
    from deployment import consortium as cons

    c = cons.create(tmp_path / "c", name="t", names=pki.Names(), sites=("a",))
    signer = key or app_signing.load_signing_key(c.app_signing_key)
    digest = bytes.fromhex(fab_sha)
    message = app_signing.create_message_to_sign(digest, 1_700_000_000)
    raw = app_signing.sign_message(signer, message)
    signature = app_signing.Signature(
        public_key_id=app_signing.key_id(signer), signed_at=1_700_000_000,
        signature=base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    app_signing.record_signed_app(c.signed_apps_log, app_signing.SignedApp(
        app="@fedsft/fedsft==1.0.0", fab_sha256=fab_sha, signature=signature))
    return c


def _with_app(run: Path, fab_sha: str, run_ids=(7,)) -> Path:
    from server.run_outputs import AppRecord, RunOutputs

    outputs = RunOutputs(run, keep_checkpoints=0)
    for run_id in run_ids:
        outputs.record_app(AppRecord(fab_id="fedsft/fedsft", fab_version="1.0.0",
                                     fab_hash=fab_sha, run_id=run_id))
    return run


def test_the_card_tells_a_simulation_run_it_has_no_signature_to_check(tmp_path):
    bare = _run(tmp_path / "outputs" / "bare")  # no app.json
    card = (export_run(bare, tmp_path / "bare-model") / "README.md").read_text()
    assert "- app: not recorded (the run names no Flower App bundle)" in card

    sha = "cd" * 32
    simulated = _with_app(_run(tmp_path / "outputs" / "sim"), sha)
    (simulated / "simulation.json").write_text(json.dumps({"num-supernodes": 2}))
    card = (export_run(simulated, tmp_path / "sim-model") / "README.md").read_text()
    assert (f"FAB sha256 `{sha}`; signature not checked: a simulation run (its "
            "simulation.json); only a deployment's `fedsft submit` signs the app") in card
    assert "--consortium" not in card


def test_the_card_names_the_app_and_its_verified_signature(tmp_path):
    from deployment import app_signing

    sha = "ab" * 32
    run = _with_app(_run(tmp_path / "outputs" / "run"), sha, run_ids=(3, 4))  # a resume
    c = _signed_consortium(tmp_path, sha)
    card = (export_run(run, tmp_path / "plain") / "README.md").read_text()
    assert (f"- app: `@fedsft/fedsft==1.0.0`, FAB sha256 `{sha}`; signature not checked "
            "(for a deployment's run, export with `--consortium DIR`") in card
    out = export_run(run, tmp_path / "model", consortium=c.root)
    public = app_signing.read_public_key(c.app_signing_key.with_name("app-signing.key.pub"))
    fingerprint = app_signing.key_fingerprint(public)
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 50
    card = (out / "README.md").read_text()
    assert card.count("- app: ") == 1  # two attempts, one FAB
    assert (f"signed by the consortium's app-signing key `{app_signing.key_id(public)}` "
            f"({fingerprint}, Ed25519) at 2023-11-14 22:13:20 UTC: signature verified") in card
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["apps"][0]["run-ids"] == [3, 4] and meta["apps"][0]["signature"]["verified"]


def test_a_foreign_signature_or_another_fab_is_not_the_consortiums(tmp_path):
    from deployment import app_signing

    sha = "cd" * 32
    run = _with_app(_run(tmp_path / "outputs" / "run"), sha)
    c = _signed_consortium(tmp_path, sha, key=app_signing.new_signing_key())
    card = (export_run(run, tmp_path / "m1", consortium=c.root) / "README.md").read_text()
    assert "NOT signed by the consortium's app-signing key" in card
    assert "signature verified" not in card
    other = _with_app(_run(tmp_path / "outputs" / "other"), "ef" * 32)  # signed: "cd"*32
    card = (export_run(other, tmp_path / "m2", consortium=c.root) / "README.md").read_text()
    assert "NOT signed by the consortium's app-signing key" in card


def test_a_run_without_app_record_says_so_and_a_bad_consortium_is_an_error(tmp_path):
    run = _run(tmp_path / "outputs" / "run")
    card = (export_run(run, tmp_path / "m") / "README.md").read_text()
    assert "- app: not recorded" in card
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="--consortium"):
        export_run(run, tmp_path / "m2", consortium=tmp_path / "empty")


def test_a_fedsa_card_says_the_model_is_the_shared_part_and_gives_the_sites_spread():
    rows = [ResultsRow.from_json(r) for r in [
        {"round": 0, "clients": {}},
        {"round": 1, "clients": {"eval_headline": [0.5, 0.7],
                                 "eval_headline_spread": {"min": 0.5, "median": 0.6}}},
        {"round": 2, "clients": {"eval_headline": [0.6, 0.9],
                                 "eval_headline_spread": {"min": 0.6, "median": 0.75}}},
    ]]
    fedsa = export_module.summarize({"lora-aggregation": "fedsa"}, rows)
    fedavg = export_module.summarize({}, rows)

    lines = export_module._fedsa_lines(fedsa)

    assert fedsa["site-eval-spread"] == {"min": 0.6, "median": 0.75}  # the last round's
    assert len(lines) == 1 and "this model holds the shared part only" in lines[0]
    assert lines[0].endswith("in the last round: min 0.6000, median 0.7500")
    assert fedavg["lora-aggregation"] == "fedavg" and export_module._fedsa_lines(fedavg) == []
