"""`python -m simulations`: exit statuses, error messages and where runs go (no Flower)."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest

from server.results import ResultsRow
from server.run_verdict import last_exception_line, run_verdict
from simulations import __main__ as cli
from simulations import sweep
from simulations.runner import SimulationResult
from simulations.scenarios import load_scenario
from tests.simulations.test_scenarios import _fake_runner

TINY = "num-supernodes = 2\n[run-config]\nbuiltin-examples = 200\nnum-server-rounds = 1\n"


def _run_folder(folder: Path, nodes: int = 2) -> Path:
    """A run folder as an interrupted harness run leaves it (round 1 done)."""
    _resumable_run(folder, **{"num-server-rounds": 1})
    (folder / "simulation.json").write_text(json.dumps({"num-supernodes": nodes}))
    return folder


def _case_nodes_zero(tmp_path):
    return ["run", "quickstart", "--num-supernodes", "0", "--output-dir", str(tmp_path)]


def _case_nodes_negative_sweep(tmp_path):
    return ["sweep", "quickstart", "--num-supernodes", "-3", "--output-dir", str(tmp_path)]


def _case_output_dir_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return ["run", "quickstart", "--output-dir", str(tmp_path / "afile")]


def _case_output_dir_under_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return ["sweep", "quickstart", "--output-dir", str(tmp_path / "afile" / "sub")]


def _case_resources_not_table(tmp_path):
    (tmp_path / "s.toml").write_text("num-supernodes = 2\nresources = 4\n")
    return ["run", str(tmp_path / "s.toml"), "--output-dir", str(tmp_path)]


def _case_not_utf8(tmp_path):
    (tmp_path / "s.toml").write_bytes(b"description = 'caf\xe9'\nnum-supernodes = 2\n")
    return ["run", str(tmp_path / "s.toml"), "--output-dir", str(tmp_path)]


def _case_resume_missing(tmp_path):
    return ["run", "quickstart", "--set", f"resume-from={tmp_path / 'gone'}"]


def _case_resume_unrelated(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("meow")
    return ["run", "quickstart", "--set", f"resume-from={tmp_path / 'photos'}"]


def _case_resume_other_nodes(tmp_path):
    run = _run_folder(tmp_path / "run", nodes=2)
    (tmp_path / "s.toml").write_text(TINY)
    return ["run", str(tmp_path / "s.toml"), "--num-supernodes", "3",
            "--set", f"resume-from={run}"]


def _case_resume_without_simulation_file(tmp_path):
    run = _resumable_run(tmp_path / "run", **{"num-server-rounds": 1})
    (run / "simulation.json").unlink()
    (tmp_path / "s.toml").write_text(TINY)
    return ["run", str(tmp_path / "s.toml"), "--set", f"resume-from={run}"]


def _case_two_output_dirs(tmp_path):
    return ["run", "quickstart", "--output-dir", str(tmp_path / "a"),
            "--set", f"output-dir={tmp_path / 'b'}"]


def _case_bad_value(tmp_path):
    return ["run", "quickstart", "--set", "fraction-train=2", "--output-dir", str(tmp_path)]


def _quick(tmp_path, *sets: str, nodes: int = 2) -> list[str]:
    """`run quickstart` on 200 built-in rows with ``--set`` items."""
    argv = ["run", "quickstart", "--output-dir", str(tmp_path / "out"),
            "--num-supernodes", str(nodes), "--set", "builtin-examples=200"]
    for item in sets:
        argv += ["--set", item]
    return argv


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _case_partition_column_missing(tmp_path):
    return _quick(tmp_path, "partitioner=column:hospital")


def _case_pathological_infeasible(tmp_path):
    return _quick(tmp_path, "partitioner=pathological", "classes-per-client=5")


def _case_fewer_rows_than_clients(tmp_path):
    data = _write(tmp_path / "d.csv", "text,label\n" + "".join(
        f"row {i},{'ab'[i % 2]}\n" for i in range(12)))
    return _quick(tmp_path, f"dataset={data}", nodes=20)


def _case_max_length_beyond_the_model(tmp_path):
    return _quick(tmp_path, "max-length=100000")


def _case_unknown_model(tmp_path):
    return _quick(tmp_path, "model=no-such-model-xyz")


def _case_float_labels(tmp_path):
    data = _write(tmp_path / "d.csv", "text,label\n" + "".join(
        f"row {i},{i / 7:.3f}\n" for i in range(40)))
    return _quick(tmp_path, f"dataset={data}")


def _case_numeric_text_column(tmp_path):
    data = _write(tmp_path / "d.csv", "text,label\n" + "".join(
        f"{i * 1.5},{'ab'[i % 2]}\n" for i in range(40)))
    return _quick(tmp_path, f"dataset={data}")


def _case_dataset_is_a_folder(tmp_path):
    (tmp_path / "data.csv").mkdir()
    return _quick(tmp_path, f"dataset={tmp_path / 'data.csv'}")


def _case_csv_that_is_tab_separated(tmp_path):
    data = _write(tmp_path / "d.csv", "text\tlabel\n" + "".join(
        f"row, {i}\t{'ab'[i % 2]}\n" for i in range(40)))
    return _quick(tmp_path, f"dataset={data}")


def _resumable_run(folder: Path, **config) -> Path:
    """A run folder as an interrupted run leaves it: round 1 recorded and checkpointed."""
    import numpy as np

    from common.config import RunConfig
    from server.run_outputs import RunOutputs

    outputs = RunOutputs(folder, keep_checkpoints=0)
    outputs.start(RunConfig.from_flower({"builtin-examples": 200, **config}), ["a", "b"])
    outputs.save_checkpoint(1, {"w": np.zeros(2, dtype=np.float32)}, {})
    outputs.append_result(ResultsRow.from_json({"round": 1, "clients": {"aggregated": 1}}))
    if not (folder / "simulation.json").exists():
        (folder / "simulation.json").write_text(json.dumps({"num-supernodes": 2}))
    return folder


def _case_resume_with_changed_settings(tmp_path):
    run = _resumable_run(tmp_path / "run", **{"num-server-rounds": 1, "learning-rate": 0.003})
    (tmp_path / "s.toml").write_text(TINY)
    return ["run", str(tmp_path / "s.toml"), "--set", "learning-rate=0.01",
            "--set", f"resume-from={run}"]


def _case_new_run_into_an_earlier_run(tmp_path):
    _resumable_run(tmp_path / "out" / "mine")
    return _quick(tmp_path, "run-name=mine")


BAD_INPUTS = [
    (_case_nodes_zero, "--num-supernodes must be >= 1, got 0"),
    (_case_nodes_negative_sweep, "--num-supernodes must be >= 1, got -3"),
    (_case_output_dir_file, "afile cannot be a folder"),
    (_case_output_dir_under_file, "is a file"),
    (_case_resources_not_table, "[resources] must be a table"),
    (_case_not_utf8, "not UTF-8 text (byte offset 18"),
    (_case_resume_missing, "gone does not exist"),
    (_case_resume_unrelated, "is not a fedsft run: config.json and results.jsonl are missing"),
    (_case_resume_other_nodes, "with 3 virtual clients: it ran with 2"),
    (_case_resume_without_simulation_file, "has no readable simulation.json"),
    (_case_two_output_dirs, "disagree; give the folder once, with --output-dir"),
    (_case_bad_value, "`fraction-train`"),
    (_case_partition_column_missing, "partition column 'hospital' not found; columns:"),
    (_case_pathological_infeasible,
     "`classes-per-client` is 5 but the training data has only 3 classes"),
    (_case_fewer_rows_than_clients, "20 clients"),
    (_case_max_length_beyond_the_model,
     "`max-length` 100000 exceeds the model's maximum of 512 positions"),
    (_case_unknown_model, "`model` 'no-such-model-xyz' is not a local model folder and is "
                          "not in the Hugging Face cache"),
    (_case_float_labels, "distinct non-integer float values"),
    (_case_numeric_text_column, "holds numbers, not text"),
    (_case_dataset_is_a_folder, "data.csv is a directory, not a file"),
    (_case_csv_that_is_tab_separated, ".tsv"),
    (_case_resume_with_changed_settings, "changed settings (learning-rate: 0.003 -> 0.01)"),
    (_case_new_run_into_an_earlier_run, "already holds a run"),
]


@pytest.mark.parametrize(("case", "fragment"), BAD_INPUTS,
                         ids=[case.__name__[6:] for case, _ in BAD_INPUTS])
def test_bad_inputs_are_one_paragraph_errors_before_anything_starts(
        tmp_path, capsys, monkeypatch, case, fragment):
    started = []
    monkeypatch.setattr(sweep, "run_scenario", functools.partial(
        sweep.run_scenario, run_fn=lambda *a, **k: started.append(a)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the preflight judges it off
    argv = case(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    status = cli.main(argv)

    out, err = capsys.readouterr()
    assert status == 2
    assert fragment in err and err.startswith("error: ")
    assert "Traceback" not in out + err
    assert started == []
    # Nothing was written: no run folder, no flwr.log in a folder given to resume from.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_dir_that_is_not_writable_is_named(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)

    assert cli.main(["run", "quickstart", "--output-dir", str(locked / "out")]) == 2
    assert f"`output-dir` {locked / 'out'} is not writable" in capsys.readouterr().err


def _record_runs(monkeypatch) -> list[dict]:
    """Swap Flower for a fake runner in the CLI; returns the run configs it was given."""
    fake, _ = _fake_runner(fail_names=set(), raise_names=set())
    configs = []

    def run(run_config, **kwargs):
        configs.append(dict(run_config))
        return fake(run_config, **kwargs)

    monkeypatch.setattr(sweep, "run_scenario",
                        functools.partial(sweep.run_scenario, run_fn=run))
    return configs


def test_set_output_dir_and_run_name_are_honoured(tmp_path, capsys, monkeypatch):
    configs = _record_runs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(TINY)

    status = cli.main(["run", str(tmp_path / "s.toml"), "--quiet", "--set", "seed=1", "--set",
                       f"output-dir={tmp_path / 'elsewhere'}", "--set", "run-name=mine"])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert configs[0]["output-dir"] == str(tmp_path / "elsewhere")
    assert configs[0]["run-name"] == "mine"
    assert (tmp_path / "elsewhere" / "mine" / "simulation.json").is_file()
    assert not (tmp_path / "outputs").exists()
    assert out.splitlines()[-1].startswith("[fedsft] done in ")
    # The same folder twice is no conflict.
    assert cli.main(["run", str(tmp_path / "s.toml"), "--quiet", "--set=seed=1", "--output-dir",
                     str(tmp_path / "elsewhere"), "--set", f"output-dir={tmp_path}/elsewhere",
                     "--set", "run-name=again"]) == 0


def test_a_run_without_an_outcome_exits_1_with_the_reason_last(tmp_path, capsys,
                                                                monkeypatch):
    def crashed(run_config, **kwargs):
        run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
        log = run_dir / "flwr.log"
        log.write_text("==== fedsft attempt 1, now, flwr run ====\nTraceback (most recent "
                       "call last):\n  File \"x.py\", line 1\ncommon.data.DataError: "
                       "train.tsv: missing column 'text'\n")
        return SimulationResult(run_dir=run_dir, returncode=0, log_path=log)

    monkeypatch.setattr(sweep, "run_scenario",
                        functools.partial(sweep.run_scenario, run_fn=crashed))
    (tmp_path / "s.toml").write_text(TINY)

    status = cli.main(["run", str(tmp_path / "s.toml"), "--quiet",
                       "--output-dir", str(tmp_path)])

    last = capsys.readouterr().err.splitlines()[-1]
    assert status == 1
    assert "the ServerApp failed before writing its outcome; see " in last
    assert "flwr.log (last error in the log: common.data.DataError: train.tsv: missing " \
           "column 'text')" in last


def test_unexpected_errors_say_their_type_and_debug_gives_the_traceback(
        tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "load_scenario", broken)

    assert cli.main(["run", "quickstart"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: RuntimeError: disk on fire",
                                "run with --debug for the traceback"]
    assert cli.main(["--debug", "run", "quickstart"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "error: RuntimeError: disk on fire"


def test_an_interrupt_exits_130_with_the_resume_command(tmp_path, capsys, monkeypatch):
    def interrupted(run_config, **kwargs):
        run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
        _resumable_run(run_dir, **{"num-server-rounds": 1})  # round 1 was saved
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_scenario",
                        functools.partial(sweep.run_scenario, run_fn=interrupted))
    (tmp_path / "s.toml").write_text(TINY)

    status = cli.main(["run", str(tmp_path / "s.toml"), "--set", "run-name=r",
                       "--output-dir", str(tmp_path)])

    assert status == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "[fedsft] interrupted; stopped the simulation after round 1; resume with "
        f"--set resume-from={tmp_path.resolve() / 'r'}")


def test_an_interrupt_before_any_saved_round_offers_no_resume(tmp_path, capsys, monkeypatch):
    def interrupted(run_config, **kwargs):
        run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
        (run_dir / "config.json").write_text("{}")  # written before round 0 is saved
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_scenario",
                        functools.partial(sweep.run_scenario, run_fn=interrupted))
    (tmp_path / "s.toml").write_text(TINY)

    status = cli.main(["run", str(tmp_path / "s.toml"), "--set", "run-name=r",
                       "--output-dir", str(tmp_path)])

    assert status == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "[fedsft] interrupted; stopped the simulation before its first round was saved; "
        f"nothing to resume in {tmp_path.resolve() / 'r'}")


def test_resume_keeps_the_recorded_clients_and_simulation_file(tmp_path, capsys,
                                                              monkeypatch):
    configs = []
    monkeypatch.setattr(sweep, "run_scenario", functools.partial(
        sweep.run_scenario, run_fn=lambda rc, **k: configs.append(k["num_supernodes"])
        or SimulationResult(run_dir=tmp_path, returncode=1, log_path=tmp_path / "none")))
    monkeypatch.chdir(tmp_path)
    run = _run_folder(tmp_path / "run", nodes=2)
    before = (run / "simulation.json").read_text()
    (tmp_path / "s.toml").write_text(TINY.replace("num-supernodes = 2", "num-supernodes = 5"))

    status = cli.main(["run", str(tmp_path / "s.toml"), "--set", f"resume-from={run}"])

    assert status == 1, capsys.readouterr().err
    assert configs == [2]  # not the scenario's 5: the partitions stay those of the run
    assert (run / "simulation.json").read_text() == before


# --- honest exits: did the run do what was asked? -----------------------------------------

COMPLETED = {"status": "completed", "message": "", "rounds_done": 2,
             "rounds_aggregated": 2, "final_model": True, "stopped_early": None}
CRASH_LOG = ("INFO : [fedsft] round 2/2 central accuracy 0.5\n"
             "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n"
             "Traceback (most recent call last):\n"
             "    raise ValueError('first')\n"
             "ValueError: first\n"
             "During handling of the above exception, another exception occurred:\n"
             "server.export.ExportError: cannot write final/model: disk full\n")


@pytest.mark.parametrize(("returncode", "outcome", "final", "log", "ok", "fragment"), [
    (0, COMPLETED, True, "", True, ""),
    # flwr run --stream exits 0 although the ServerApp crashed: no outcome.
    (0, None, False, CRASH_LOG, False,
     "the ServerApp failed before writing its outcome; see run/flwr.log (last error in "
     "the log: server.export.ExportError: cannot write final/model: disk full)"),
    # The log reached the last round, the final model is there, but no outcome.
    (0, None, True, "[fedsft] round 2/2  accuracy 0.9\n", False,
     "the ServerApp failed before writing its outcome; see run/flwr.log"),
    (1, None, False, "", False, "(flwr run exit code 1)"),
    (0, {**COMPLETED, "status": "failed", "message": "only 1 node(s) connected"}, False,
     "", False, "only 1 node(s) connected (log: run/flwr.log)"),
    (0, {**COMPLETED, "status": "failed", "message": ""}, False, "", False,
     "the run ended with status 'failed'"),
    (0, COMPLETED, False, "", False, "its final model is missing"),
    (2, COMPLETED, True, "", False, "`flwr run` exited with code 2"),
    (0, {"status": "running"}, True, "", False, "status 'running'"),
])
def test_run_verdict(returncode, outcome, final, log, ok, fragment):
    verdict = run_verdict(returncode=returncode, outcome=outcome, final_model=final,
                          log_text=log, log_path="run/flwr.log")

    assert verdict[0] is ok
    assert fragment in verdict[1] and (verdict[1] == "") is ok


def test_last_exception_line_skips_code_and_strips_log_prefixes():
    assert last_exception_line("    raise ValueError('x')\nall fine\n") is None
    assert last_exception_line("ERROR :  KeyError: 'label'\nINFO : bye\n") == \
        "KeyError: 'label'"
    assert last_exception_line(CRASH_LOG).startswith("server.export.ExportError")


def test_an_outcome_from_an_earlier_attempt_does_not_count(tmp_path):
    """A resumed run that crashes before writing its own outcome.json is not done."""
    run = _run_folder(tmp_path / "run")
    (run / "outcome.json").write_text(json.dumps(COMPLETED))
    (run / "final" / "model").mkdir(parents=True)
    (run / "final" / "model" / "config.json").write_text("{}")
    (tmp_path / "s.toml").write_text(TINY)
    outcome = sweep.run_scenario(
        load_scenario(str(tmp_path / "s.toml")), {"resume-from": str(run)},
        output_dir=tmp_path, run_name="x",
        run_fn=lambda rc, **k: SimulationResult(run_dir=run, returncode=0,
                                                log_path=run / "flwr.log"))

    assert not outcome.ok
    assert "failed before writing its outcome" in outcome.message


# --- end to end: SIGTERM to the harness stops the whole simulation -----------------------


@pytest.mark.e2e
def test_sigterm_to_the_harness_stops_the_simulation_and_frees_the_ports(
        tmp_path, tiny_model_dir):
    import queue
    import signal
    import subprocess
    import sys
    import threading

    import psutil

    from simulations.runner import LOCAL_SUPERLINK_PORTS, MACHINE_LOCK, _port_in_use

    (tmp_path / "tiny.toml").write_text(f"""
description = "tiny BERT, 2 clients, 3 rounds"
num-supernodes = 2
[run-config]
model = "{tiny_model_dir}"
num-server-rounds = 3
builtin-examples = 200
max-length = 24
batch-size = 4
local-steps = 2
node-wait-timeout = 60
""")
    harness = subprocess.Popen(
        [sys.executable, "-m", "simulations", "run", str(tmp_path / "tiny.toml"),
         "--output-dir", str(tmp_path / "out"), "--set", "run-name=r"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in harness.stdout],
                     daemon=True).start()
    try:
        # Round 0 is the initial model; the signal comes while round 1 trains.
        while "[fedsft] round 0/3" not in lines.get(timeout=900):  # may wait for the lock
            pass
        harness.send_signal(signal.SIGTERM)
        status = harness.wait(timeout=120)
    finally:
        harness.kill()
    err = harness.stderr.read()

    run = tmp_path / "out" / "r"
    assert status == 130, err[-3000:]
    # Round 0 (maybe round 1 too, on a fast machine) was saved before the stop.
    assert re.fullmatch(r"\[fedsft\] interrupted; stopped the simulation after round [01]; "
                        rf"resume with --set resume-from={re.escape(str(run))}",
                        err.splitlines()[-1]), err[-3000:]
    header = (run / "flwr.log").read_text().splitlines()[0]
    flwr_home = header.split("--run-config ")[1].split("/run-config.toml")[0]
    left = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        environ, cmdline = proc.info["environ"] or {}, proc.info["cmdline"] or []
        if environ.get("FLWR_HOME") == flwr_home or any(flwr_home in c for c in cmdline):
            left.append((proc.pid, cmdline))
    assert left == []
    # The ports are free, unless another simulation took the machine since.
    if any(_port_in_use(p) for p in LOCAL_SUPERLINK_PORTS):
        assert MACHINE_LOCK.read_text().strip(), "ports held with no simulation running"
    # Stopped mid-run, and resumable: its config and round 0's checkpoint are there.
    assert not (run / "final").exists()
    assert (run / "config.json").is_file()
    assert (run / "checkpoints" / "round-0000.safetensors").is_file()
