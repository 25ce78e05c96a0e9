"""The fedsft command: light to import, one clear line per error, a true exit code for submit."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deployment import cli, pki
from deployment import consortium as cons
from deployment.cli import main
from deployment.processes import ProcessError, parse_run_status, started_run_id

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_cli_loads_no_heavy_library():
    heavy = ["torch", "transformers", "datasets", "pandas"]
    code = (f"import json, sys, deployment.cli; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == []


@pytest.fixture
def files(tmp_path) -> Path:
    """A model folder without weights, a complete-looking one, inputs good and bad."""
    tokenizer = {"tokenizer.json": "{}", "tokenizer_config.json": "{}"}
    classifier = {"architectures": ["BertForSequenceClassification"]}
    for name, weights in (("no-weights", False), ("model", True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(classifier))
        for file, text in tokenizer.items():
            (folder / file).write_text(text)
        if weights:  # never loaded: every case below fails before the model is
            (folder / "model.safetensors").write_bytes(b"")
        (folder / "fedsft.json").write_text(json.dumps({"max-length": 16}))
    (tmp_path / "in.csv").write_text("text\nhello\n")
    (tmp_path / "body.csv").write_text("body,label\nhello,a\n")
    (tmp_path / "a-folder.csv").mkdir()
    return tmp_path


@pytest.fixture
def consortium(tmp_path) -> Path:
    return cons.create(tmp_path / "c", name="t", names=pki.Names(), sites=("a",)).root


BAD = {
    "unknown subcommand": (["bogus"], "invalid choice: 'bogus'"),
    "predict, no model folder": (
        ["predict", "{t}/nope", "{t}/in.csv", "--output", "{t}/p.csv"],
        "model folder not found: {t}/nope"),
    "predict, folder without weights": (
        ["predict", "{t}/no-weights", "{t}/in.csv", "--output", "{t}/p.csv"],
        "{t}/no-weights is not an exported model (make one with `fedsft export RUN_DIR OUT`):"
        " missing weights (*.safetensors or *.bin)"),
    "predict, missing input": (
        ["predict", "{t}/model", "{t}/missing.csv", "--output", "{t}/p.csv"],
        "input file not found: {t}/missing.csv"),
    "predict, input is a folder": (
        ["predict", "{t}/model", "{t}/a-folder.csv", "--output", "{t}/p.csv"],
        "input {t}/a-folder.csv is a folder"),
    "predict, no text column": (
        ["predict", "{t}/model", "{t}/body.csv", "--output", "{t}/p.csv"],
        "{t}/body.csv: missing text column 'text'; columns found: 'body', 'label'"),
    "predict over its input": (
        ["predict", "{t}/model", "{t}/in.csv", "--output", "{t}/./in.csv"],
        "is the input file"),
    "export of a missing run": (
        ["export", "{t}/no-run", "{t}/out"],
        "{t}/no-run is not a finished fedsft run: config.json is missing"),
    "submit, not a consortium": (
        ["submit", "{t}", "--set", "num-server-rounds=2"],
        "is not a consortium folder (no consortium.json)"),
    "submit, unknown --set key": (
        ["submit", "{t}/c", "--set", "num-server-round=2"],
        "unknown run-config key(s) 'num-server-round'"),
    "submit, bad --set value": (
        ["submit", "{t}/c", "--set", "learning-rate=-1"],
        "learning-rate"),
    "submit, preflight: missing eval file": (
        ["submit", "{t}/c", "--set", "labels=neg,pos", "--set", "eval-dataset={t}/gone.csv"],
        "data file not found: {t}/gone.csv"),
    "submit, preflight: missing resume folder": (
        ["submit", "{t}/c", "--set", "resume-from={t}/no-run"],
        "`resume-from` folder {t}/no-run does not exist"),
}


@pytest.mark.parametrize("argv, fragment", BAD.values(), ids=BAD.keys())
def test_bad_invocations_exit_2_with_one_clear_message(argv, fragment, files, consortium,
                                                        capsys):
    code = main([a.format(t=files) for a in argv])

    captured = capsys.readouterr()
    assert code == 2
    assert fragment.format(t=files) in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert (files / "in.csv").read_text() == "text\nhello\n"
    assert not (files / "p.csv").exists()


def _boom(*args, **kwargs):
    raise OSError("disk on fire")


def test_unexpected_errors_name_their_type_and_hint_at_debug(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("deployment.export.export_run", _boom)

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 1

    err = capsys.readouterr().err
    assert err.strip() == ("fedsft: error: OSError: disk on fire "
                           "(run with --debug for the traceback)")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("deployment.export.export_run", _boom)
    command = ["export", str(tmp_path / "run"), str(tmp_path / "out")]
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]

    assert main(argv) == 1

    err = capsys.readouterr().err
    assert "Traceback" in err and "in _boom" in err
    assert err.strip().splitlines()[-1] == "fedsft: error: OSError: disk on fire"


def test_help_exits_0_without_an_error(capsys):
    assert main(["export", "--help"]) == 0
    assert "run_dir" in capsys.readouterr().out


# --- submit: the run's real outcome ------------------------------------------------

def _flwr_list_json(run_id: int, status: str, sub_status: str, details: str) -> str:
    """What `flwr list --run-id N --format json` prints, made by flwr's own code."""
    from flwr.cli.ls import _to_json
    from flwr.cli.run_utils import format_runs
    from flwr.supercore.run import Run, RunStatus

    run = dataclasses.replace(
        Run.create_empty(run_id), status=RunStatus(status, sub_status, details),
        pending_at="2026-01-01T00:00:00+00:00", running_at="2026-01-01T00:00:01+00:00",
        finished_at="2026-01-01T00:00:09+00:00" if status == "finished" else "")
    return _to_json(format_runs([run], "2026-01-01T00:00:10+00:00"))


STATUSES = {
    "completed": (("finished", "completed", ""), True, True,
                  "run 7 finished with status completed"),
    "failed": (("finished", "failed", "ServerApp failed with exception: boom"), False, True,
               "run 7 finished with status failed: ServerApp failed with exception: boom; "
               "see `flwr log 7`"),
    "stopped": (("finished", "stopped", ""), False, True,
                "run 7 finished with status stopped; see `flwr log 7`"),
    "running": (("running", "", ""), False, False,
                "run 7 has not finished (status running); follow it with `flwr log 7`"),
    "pending": (("pending", "", ""), False, False, "(status pending)"),
}


@pytest.mark.parametrize("status, completed, finished, text", STATUSES.values(),
                         ids=STATUSES.keys())
def test_parse_run_status(status, completed, finished, text):
    reply = json.loads(_flwr_list_json(7, *status))

    parsed = parse_run_status(reply, 7)

    assert (parsed.completed, parsed.finished) == (completed, finished)
    assert text in parsed.describe()


def test_parse_run_status_refuses_errors_and_other_runs(capsys):
    from flwr.supercore.logger import print_json_error

    print_json_error("", Exception("Connection to the SuperLink is unavailable."))
    error_reply = json.loads(capsys.readouterr().out)
    with pytest.raises(ProcessError, match="SuperLink is unavailable"):
        parse_run_status(error_reply, 7)
    with pytest.raises(ProcessError, match="does not list run 8"):
        parse_run_status(json.loads(_flwr_list_json(7, "finished", "completed", "")), 8)


def test_the_run_id_is_read_from_flwr_runs_own_message():
    # The line parsed below is the one the installed flwr prints (its module, not the
    # function of the same name that flwr.cli.run exports).
    flwr_run = importlib.import_module("flwr.cli.run.run")
    assert 'f"Successfully started run {res.run_id}"' in inspect.getsource(flwr_run)
    assert started_run_id("Successfully started run 1234567890123") == 1234567890123
    assert started_run_id("Successfully started run 12 in federation @acme/x") == 12
    assert started_run_id("INFO :      Starting logstream for run_id `12`") is None


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    """A `flwr` that records its arguments, prints a canned `run` log and `list` reply."""
    script = tmp_path / "flwr"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open(os.environ["FAKE_CALLS"], "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        if sys.argv[1] == "run":
            print(open(os.environ["FAKE_RUN_OUT"]).read(), end="")
            sys.exit(int(os.environ.get("FAKE_RUN_CODE", "0")))
        print(open(os.environ["FAKE_LIST_OUT"]).read())
        """))
    script.chmod(0o755)
    monkeypatch.setattr("deployment.processes.executable",
                        lambda name: str(script) if name == "flwr" else name)
    monkeypatch.setattr(cli, "_STATUS_WAIT_S", 0.0)
    env = {"FAKE_CALLS": tmp_path / "calls.jsonl", "FAKE_RUN_OUT": tmp_path / "run.txt",
           "FAKE_LIST_OUT": tmp_path / "list.json"}
    for key, path in env.items():
        monkeypatch.setenv(key, str(path))
    return env


def _calls(fake_flwr) -> list[list[str]]:
    return [json.loads(x) for x in fake_flwr["FAKE_CALLS"].read_text().splitlines()]


SUBMITS = {
    "completed": (("finished", "completed", ""), 0,
                  "[fedsft] run 42 finished with status completed"),
    "failed": (("finished", "failed", "ServerApp failed with exception: no labels"), 1,
               "fedsft: error: run 42 finished with status failed: ServerApp failed with "
               "exception: no labels; see `flwr log 42`"),
    "still running": (("running", "", ""), 1,
                      "fedsft: error: run 42 has not finished (status running); "
                      "follow it with `flwr log 42`"),
}


@pytest.mark.parametrize("status, code, last", SUBMITS.values(), ids=SUBMITS.keys())
def test_submit_exits_with_the_runs_outcome(status, code, last, fake_flwr, consortium,
                                            capsys):
    fake_flwr["FAKE_RUN_OUT"].write_text("Successfully started run 42\nINFO : round 1\n")
    fake_flwr["FAKE_LIST_OUT"].write_text(_flwr_list_json(42, *status))

    assert main(["submit", str(consortium), "--set", "num-server-rounds=3"]) == code

    captured = capsys.readouterr()
    assert "INFO : round 1" in captured.out  # the log is streamed through
    assert (captured.out + captured.err).strip().splitlines()[-1] == last
    run_call, list_call = _calls(fake_flwr)
    # The app is submitted signed: the SuperLink fetches it by its spec (app_signing.py).
    assert run_call[:4] == ["run", "@fedsft/fedsft==0.1.0", cons.CONNECTION, "--stream"]
    assert "signed @fedsft/fedsft==0.1.0" in captured.out
    assert run_call[-2:] == ["--run-config", "num-server-rounds=3 output-dir="
                             f"{json.dumps(str(Path('outputs').resolve()))}"]
    assert list_call[:4] == ["list", cons.CONNECTION, "--run-id", "42"]


def test_submit_sends_an_sft_run_without_the_sites_data_to_the_coordinator(tmp_path):
    app = cli._app_dir(None)
    out = str(tmp_path / "out")
    sft = cli.submit_run_config(app, ["task=sft", f"output-dir={out}"])
    assert sft["dataset"] == "none"  # never the built-in examples on the coordinator
    own = cli.submit_run_config(app, ["task=sft", "dataset=/srv/coordinator.jsonl",
                                      f"output-dir={out}"])
    assert own["dataset"] == "/srv/coordinator.jsonl"  # an explicit value is kept
    classification = cli.submit_run_config(app, ["labels=neg,pos", f"output-dir={out}"])
    assert "dataset" not in classification  # `labels` already keeps it off `dataset`


def test_submit_drops_dataset_for_any_task_whose_entry_says_so(tmp_path):
    # The registry field decides, not the task's name (a made-up task here).
    from common.tasks import TASK_METRICS, TaskInfo, task_registered

    app, out = cli._app_dir(None), str(tmp_path / "out")
    info = TaskInfo(module=__name__, metrics=TASK_METRICS["sft"], default_model="x")
    with task_registered("chat2", info):
        assert "dataset" not in cli.submit_run_config(app, ["task=chat2", f"output-dir={out}"])
    with task_registered("chat2", dataclasses.replace(info, deploy_without_dataset=True)):
        sent = cli.submit_run_config(app, ["task=chat2", f"output-dir={out}"])
        assert sent["dataset"] == "none"


def test_submit_that_starts_no_run_is_an_error(fake_flwr, consortium, monkeypatch, capsys):
    fake_flwr["FAKE_RUN_OUT"].write_text("Error: SuperLink unavailable\n")
    monkeypatch.setenv("FAKE_RUN_CODE", "1")

    assert main(["submit", str(consortium)]) == 2

    assert "`flwr run` exited 1 without starting a run" in capsys.readouterr().err
    assert [c[0] for c in _calls(fake_flwr)] == ["run"]


# --- check-data: a site's data before it joins ---------------------------------------

CLEAN_SITE = "note,triage\n" + "".join(
    f"patient note number {i},{'urgent' if i % 2 else 'routine'}\n" for i in range(6))
CHECK_DATA = {
    "clean": (["{t}/site.csv", "--text-column", "note", "--label-column", "triage",
               "--labels", "routine,urgent"], 0, "result: no blocking problem, 0 warning(s)"),
    "label unknown to the federation": (
        ["{t}/site.csv", "--text-column", "note", "--label-column", "triage",
         "--labels", "routine,later"],
        1, "BLOCKING: label(s) 'urgent' not in the federation's labels ('routine', 'later')"),
    "missing file": (["{t}/gone.csv"], 2, "fedsft: error: data file not found: {t}/gone.csv"),
    "wrong column": (["{t}/site.csv"], 2, "missing column 'text'; columns found: 'note'"),
    "neither FILE nor data-path": ([], 2, "check-data needs a FILE or a --site-config"),
    "bad --site-config item": (["{t}/site.csv", "--site-config", "data-path"], 2,
                               "--site-config expects KEY=VALUE or a .toml file"),
    "bad --labels": (["{t}/site.csv", "--labels", "only"], 2,
                     "`labels` must name at least 2 distinct classes"),
}


@pytest.mark.parametrize("argv, code, line", CHECK_DATA.values(), ids=CHECK_DATA.keys())
def test_check_data_exit_codes(argv, code, line, tmp_path, capsys):
    (tmp_path / "site.csv").write_text(CLEAN_SITE)

    assert main(["check-data", *(a.format(t=tmp_path) for a in argv)]) == code

    captured = capsys.readouterr()
    assert line.format(t=tmp_path) in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_check_data_runs_the_site_check_of_the_task_it_is_given(tmp_path, monkeypatch,
                                                                capsys):
    # A task besides classification and sft (here classification's registry entry under
    # another name): check-data runs that task's site check, on a config of that task.
    import common.tasks as tasks

    monkeypatch.setitem(tasks._TASKS, "triage", tasks._TASKS["classification"])
    asked = []
    real = tasks.get_site_check

    def get_site_check(name: str):
        asked.append(name)
        check = real("classification")

        def check_site(path, *, encoding, **kwargs):
            asked.append(encoding.task)
            return check(path, encoding=encoding, **kwargs)
        return check_site

    monkeypatch.setattr(tasks, "get_site_check", get_site_check)
    (tmp_path / "site.csv").write_text(CLEAN_SITE)

    assert main(["check-data", str(tmp_path / "site.csv"), "--task", "triage",
                 "--text-column", "note", "--label-column", "triage"]) == 0
    assert asked == ["triage", "triage"]
    assert "result: no blocking problem" in capsys.readouterr().out


@pytest.mark.parametrize("site_config", [
    ['data-path="{t}/site.csv" text-column="note"', "label-column=triage"],
    ["{t}/node.toml"],
], ids=["key=value items", "toml file"])
def test_check_data_reads_the_sites_node_config(site_config, tmp_path, capsys):
    (tmp_path / "site.csv").write_text(CLEAN_SITE + "patient note number 0,routine\n")
    (tmp_path / "node.toml").write_text(
        f'data-path = "{tmp_path}/site.csv"\ntext-column = "note"\nlabel-column = "triage"\n'
        f'site-name = "hospital-a"\n')
    out = tmp_path / "report.json"

    items = [arg for item in site_config for arg in ("--site-config", item.format(t=tmp_path))]

    code = main(["check-data", *items, "--json", str(out)])

    assert code == 0  # a duplicate is a warning
    assert "WARNING: 1 duplicate texts (1 exact)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["rows-read"], report["exact-duplicates"], report["blocking"]) == (7, 1, False)
    assert report["label-counts"] == {"routine": 4, "urgent": 3}


def test_check_data_counts_classification_tokens_with_the_models_tokenizer(
        tmp_path, tiny_model_dir, capsys):
    # "patient note number 3": 4 words, 6 tokens ([CLS] and [SEP] added, as training
    # encodes), so max-length 5 truncates every row, which the word count cannot see.
    (tmp_path / "site.csv").write_text(CLEAN_SITE)
    argv = ["check-data", str(tmp_path / "site.csv"), "--text-column", "note",
            "--label-column", "triage", "--max-length", "5", "--json"]
    reports = {}
    for name, extra in (("words", []), ("tokens", ["--model", str(tiny_model_dir)])):
        out = tmp_path / f"{name}.json"
        assert main([*argv, str(out), *extra]) == 0  # truncation is a warning
        reports[name] = json.loads(out.read_text(encoding="utf-8"))

    assert (reports["words"]["too-long"], reports["words"]["length-measure"]) == (
        0, "estimated by whitespace words, a lower bound")
    assert (reports["tokens"]["too-long"], reports["tokens"]["length-measure"]) == (
        6, "counted by the tokenizer")
    assert "longer than max-length 5 tokens (counted by the tokenizer): 6 (100.0% " \
           "truncated)" in capsys.readouterr().out


def test_parse_site_config():
    assert cli.parse_site_config(['data-path="/d/a b.csv" share-data-stats=true',
                                  "max=3", "data-path=/d/c.csv"]) == {
        "data-path": "/d/c.csv", "share-data-stats": True, "max": 3}


# --- check-data --task sft: the federation's chat columns -----------------------------

def _gsm8k_style(path) -> None:
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}"}
            for i in range(6)]
    rows[4]["answer"] = "   "  # no assistant turn: refused, and counted as such
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_check_data_sft_takes_the_chat_columns_from_flags_or_node_config(tmp_path, capsys):
    site = tmp_path / "gsm8k.jsonl"
    _gsm8k_style(site)
    out = tmp_path / "report.json"

    # The run's default columns (prompt / response) are not in the file: unusable.
    assert main(["check-data", str(site), "--task", "sft"]) == 2
    assert "no chat columns" in capsys.readouterr().err

    code = main(["check-data", "--task", "sft", "--site-config",
                 f'data-path="{site}" prompt-column="question"',
                 "--response-column", "answer", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1  # one row without an answer: training would refuse the file
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["conversations"], report["refused"], report["no-assistant"]) == (6, 1, 1)
    assert report["no-assistant-share"] == pytest.approx(1 / 6)
    assert "row 5, column 'answer'" in report["problems"][0]
    assert "rows refused: 1 (1 without an assistant turn: 16.7%)" in text
    assert "tokens per conversation: not counted" in text


def test_check_data_sft_counts_tokens_with_the_model(tmp_path, tiny_llama_dir, capsys):
    site = tmp_path / "gsm8k.jsonl"
    _gsm8k_style(site)
    lines = site.read_text(encoding="utf-8").splitlines()
    site.write_text("\n".join(lines[:4] + lines[5:]) + "\n", encoding="utf-8")
    out = tmp_path / "report.json"

    code = main(["check-data", str(site), "--task", "sft", "--prompt-column", "question",
                 "--response-column", "answer", "--model", str(tiny_llama_dir),
                 "--max-length", "40", "--json", str(out)])

    text = capsys.readouterr().out
    assert code == 0, text  # truncation is a warning, not a blocking problem
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["conversations"], report["refused"], report["tokens-measured"]) == (5, 0, True)
    # Byte-level tokens: each rendered conversation is longer than 40, so all truncated.
    assert report["max-tokens"] > 40 and (report["kept"], report["truncated"]) == (5, 5)
    assert 0 < report["median-tokens"] <= report["p90-tokens"] <= report["max-tokens"]
    assert "WARNING: 5 of 5 conversations are longer than `max-length` 40" in text


def test_check_data_sft_counts_duplicates_and_the_eval_files_overlap(tmp_path, capsys):
    site, evaluation = tmp_path / "site.jsonl", tmp_path / "eval.jsonl"
    site.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in (
        ("Hi", "Hello"), ("Hi", "Hello"), ("hi!", "hello"), ("Bye", "See you"))))
    evaluation.write_text(json.dumps({"prompt": "HI", "response": "Hello."}) + "\n"
                          + json.dumps({"prompt": "Why?", "response": "Because"}) + "\n")
    out = tmp_path / "report.json"

    code = main(["check-data", str(site), "--task", "sft", "--eval", str(evaluation),
                 "--json", str(out)])

    assert code == 0  # duplicates and overlap are warnings
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["exact-duplicates"], report["normalized-duplicates"]) == (1, 2)
    assert (report["eval-rows"], report["eval-overlap"]) == (2, 1)
    assert "WARNING: 1 of 2 eval conversations are also in the data" in \
        capsys.readouterr().out


@pytest.mark.parametrize("task", ["classification", "sft"])
def test_check_data_reads_every_site_key_from_the_node_config(task, capsys):
    # `site_check_config` takes a site key from --site-config when its flag is absent:
    # every one the client reads (the registry's site_keys) must be a check key, and
    # a flag of the command.
    from common.tasks import task_info
    from deployment import cli

    info = task_info(task)
    assert set(info.site_keys) <= set(info.check_keys)
    assert cli.main(["check-data", "--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"--{key}" in usage for key in info.check_keys)
    parser = cli.build_parser()
    args = parser.parse_args(["check-data", "x.jsonl", "--task", task])
    if task == "sft":
        cfg = cli.site_check_config(args, {"messages-column": "chat", "chat-format": "messages",
                                           "system-prompt": "not a site key"})
        options = cfg.task_options
        assert options.messages_column == "chat" and options.system_prompt != "not a site key"
    else:
        cfg = cli.site_check_config(args, {"text-column": "note", "label-column": "y",
                                           "labels": "not,a,site,key"})
        assert (cfg.text_column, cfg.label_column, cfg.labels) == ("note", "y", "")
    # a flag wins over the node config
    flagged = parser.parse_args(["check-data", "x", "--task", task, "--max-length", "7"])
    assert cli.site_check_config(flagged, {"max-length": 99}).max_length == 7


def test_check_data_has_a_flag_for_each_check_key_of_every_task(capsys):
    # A task's check keys are its registry entry's; the command lists none by hand.
    from common.tasks import CheckFlag, MetricInfo, TaskInfo, task_registered
    from deployment import cli

    info = TaskInfo(module="unused", default_model="minilm",
                    metrics=(MetricInfo("loss", "loss", higher_is_better=False),),
                    check_flags=(CheckFlag("tag-column", "the tags' column"),
                                 CheckFlag("lowercase", switch=True)))
    with task_registered("tagging", info):
        parser = cli.build_parser()
        args = parser.parse_args(["check-data", "x", "--task", "tagging",
                                  "--tag-column", "t", "--lowercase"])
        assert (args.tag_column, args.lowercase) == ("t", True)
        assert parser.parse_args(["check-data", "x"]).lowercase is None
        assert cli.main(["check-data", "--help"]) == 0
        usage = capsys.readouterr().out
        assert "tagging: the tags' column" in usage
        assert "tagging: the run's `lowercase`" in usage
    # A switch is None unless given, so the node config's value or the default applies.
    parser = cli.build_parser()
    assert parser.parse_args(["check-data", "x", "--label-case-fold"]).label_case_fold is True
    assert parser.parse_args(["check-data", "x"]).label_case_fold is None
    with pytest.raises(SystemExit):
        parser.parse_args(["check-data", "x", "--tag-column", "t"])  # not registered now


def test_submit_resolves_a_relative_resume_from_where_submit_runs(tmp_path, monkeypatch):
    # The ServerApp runs in the SuperLink's working directory: a relative path must be
    # made absolute here, against the caller's directory, before it is sent.
    app = cli._app_dir(None)
    caller = tmp_path / "coordinator"
    caller.mkdir()
    monkeypatch.chdir(caller)
    config = cli.submit_run_config(app, ["labels=neg,pos", "resume-from=outputs/first",
                                         "output-dir=outputs"])
    assert config["resume-from"] == str(caller / "outputs" / "first")
    assert config["output-dir"] == str(caller / "outputs")
