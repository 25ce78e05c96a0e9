"""simulations tune without simulations: the space grammar, the search loop on a toy
objective, the round watcher and the harness glue (fake runs), the outputs."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import optuna
import psutil
import pytest

from common.config import ConfigError
from server.results import ResultsRow
from simulations import __main__ as cli
from simulations import runner, tune
from simulations.runner import SimulationResult
from simulations.scenarios import load_scenario, resolve_run_config
from simulations.tune import (
    RoundWatcher,
    SpaceParam,
    TrialRun,
    parse_space,
    parse_space_item,
    run_search,
)

TINY = "num-supernodes = 2\n[run-config]\nbuiltin-examples = 200\nnum-server-rounds = 3\n"


# --- the --space grammar ----------------------------------------------------------------


def test_a_float_range_is_uniform_and_log_when_asked():
    plain = parse_space_item("learning-rate=0.001:0.01")
    logged = parse_space_item("learning-rate=1e-4:1e-2:log")
    whole = parse_space_item("proximal-mu=0:1")  # a float key: floats even from 0:1

    assert plain == SpaceParam("learning-rate", "float", 0.001, 0.01, log=False)
    assert logged == SpaceParam("learning-rate", "float", 1e-4, 1e-2, log=True)
    assert whole.kind == "float" and whole.low == 0.0 and isinstance(whole.low, float)
    assert isinstance(logged.distribution(), optuna.distributions.FloatDistribution)
    assert logged.distribution().log


def test_an_integer_key_gets_an_integer_range():
    param = parse_space_item("local-steps=2:8")
    assert param == SpaceParam("local-steps", "int", 2, 8)
    # a task's own key (sft's options record) is typed as a field is
    assert parse_space_item("generation-samples=4:16").kind == "int"
    assert isinstance(param.distribution(), optuna.distributions.IntDistribution)
    assert parse_space_item("lora-r=4:64:log").log


def test_choices_are_read_as_the_keys_types():
    steps = parse_space_item("local-steps=5,10,20")
    strategy = parse_space_item("strategy=fedavg,fedprox")
    flag = parse_space_item("secure-aggregation=true,false")
    partition = parse_space_item("partitioner=column:site,iid")

    assert steps.choices == (5, 10, 20) and steps.kind == "categorical"
    assert strategy.choices == ("fedavg", "fedprox")
    assert flag.choices == (True, False)
    assert partition.choices == ("column:site", "iid")  # ':' inside a choice is text


@pytest.mark.parametrize(("item", "message"), [
    ("learning-rate", "--space expects"),
    ("=1:2", "--space expects"),
    ("learning-rate=", "--space expects"),
    ("no-such-key=1:2", "unknown run-config key 'no-such-key'"),
    ("seed=1,2", "cannot vary 'seed'"),
    ("validation-fraction=0.1,0.2", "cannot vary 'validation-fraction'"),
    ("learning-rate=0.01", "a single value is not a search space"),
    ("strategy=fedavg:fedprox", "'strategy' is a str key"),
    ("learning-rate=1:2:3", "lo:hi or lo:hi:log"),
    ("learning-rate=1:2:lin", "lo:hi or lo:hi:log"),
    ("learning-rate=0.1:0.01", "lo must be below hi"),
    ("learning-rate=0.01:0.01", "lo must be below hi"),
    ("learning-rate=0:0.01:log", "log range needs lo > 0"),
    ("learning-rate=a:b", "not a finite number"),
    ("learning-rate=nan:1", "not a finite number"),
    ("local-steps=2.5:8", "bounds must be integers"),
    ("local-steps=5,,10", "an empty choice"),
    ("local-steps=5,5", "repeated"),
])
def test_bad_space_items_fail_naming_the_flag(item, message):
    with pytest.raises(ConfigError, match="--space") as error:
        parse_space_item(item)
    assert message in str(error.value)


def test_a_space_needs_a_key_and_each_key_once():
    with pytest.raises(ConfigError, match="at least one --space"):
        parse_space([])
    with pytest.raises(ConfigError, match="names 'local-steps' twice"):
        parse_space(["local-steps=1,2", "local-steps=3:4"])


def test_the_cli_pruner_choices_are_the_tuners():
    parser = cli.build_parser()
    tune_parser = parser._subparsers._group_actions[0].choices["tune"]  # type: ignore[union-attr]
    pruner = next(a for a in tune_parser._actions if a.dest == "pruner")
    assert tuple(pruner.choices) == tune.PRUNERS


# --- the search loop on a toy objective ------------------------------------------------


def _toy_trial(curves: dict[float, list[float]], calls: list):
    """A trial function whose per-round values depend on the learning rate only."""

    def run_trial(number, params, report):
        values = []
        for rnd, value in enumerate(curves[params["learning-rate"]], start=1):
            values.append((rnd, value))
            if report(rnd, value):
                calls.append((number, "pruned", rnd))
                return TrialRun(values=tuple(values), pruned_at=rnd)
        calls.append((number, "done", len(values)))
        best = max(values, key=lambda v: v[1])[0]
        return TrialRun(values=tuple(values), ok=True, selected_round=best,
                        test={"accuracy": 0.5 + number / 100})

    return run_trial


def test_the_search_prunes_a_trial_behind_the_median_and_picks_the_best():
    curves = {0.1: [0.5, 0.6, 0.7], 0.2: [0.6, 0.8, 0.75], 0.3: [0.2, 0.3, 0.9],
              0.4: [0.7, 0.8, 0.8]}
    space = {"learning-rate": SpaceParam("learning-rate", "categorical",
                                         choices=(0.1, 0.2, 0.3, 0.4))}
    order = iter([0.1, 0.2, 0.3, 0.4])

    class Fixed(optuna.samplers.BaseSampler):  # the toy's settings in a known order
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return next(order)

    calls: list = []
    seen: list = []
    records = run_search(
        space, trials=4, direction="maximize", run_trial=_toy_trial(curves, calls),
        sampler=Fixed(), pruner=tune.make_pruner("median", max_rounds=3),
        on_trial=lambda rs: seen.append(len(rs)))

    # Trial 2 (0.2 at round 1 < median 0.55 of trials 0 and 1) is pruned after round 1;
    # the two startup trials are never pruned.
    assert [r.state for r in records] == ["complete", "complete", "pruned", "complete"]
    assert calls[2] == (2, "pruned", 1)
    assert records[2].pruned_at == 1 and records[2].values == ((1, 0.2),)
    assert records[2].value is None and records[2].test == {}
    assert [r.value for r in records] == [0.7, 0.8, None, 0.8]
    assert records[1].selected_round == 2
    assert tune.best_trial(records, "maximize").number == 1  # ties: the earliest
    assert tune.best_trial(records, "minimize").number == 0
    assert seen == [1, 2, 3, 4]


def test_a_trial_that_raises_or_fails_is_recorded_and_the_search_goes_on():
    def run_trial(number, params, report):
        if number == 0:
            raise RuntimeError("port in use")
        if number == 1:
            return TrialRun(values=((1, 0.5),), ok=False, message="the run failed")
        if number == 2:  # completed, but its exported round measured nothing finite
            return TrialRun(values=((1, 0.5),), ok=True, selected_round=2)
        return TrialRun(values=((1, 0.4),), ok=True, selected_round=1)

    space = {"local-steps": SpaceParam("local-steps", "int", 1, 4)}
    records = run_search(space, trials=4, direction="minimize", run_trial=run_trial,
                         sampler=optuna.samplers.RandomSampler(seed=1),
                         pruner=optuna.pruners.NopPruner())

    assert [r.state for r in records] == ["failed", "failed", "failed", "complete"]
    assert records[0].message == "RuntimeError: port in use"
    assert records[1].message == "the run failed"
    assert "round 2 has no finite validation value" in records[2].message
    assert all(1 <= r.params["local-steps"] <= 4 for r in records)


def test_an_interrupt_ends_the_search():
    def run_trial(number, params, report):
        raise KeyboardInterrupt

    space = {"local-steps": SpaceParam("local-steps", "int", 1, 4)}
    with pytest.raises(KeyboardInterrupt):
        run_search(space, trials=3, direction="maximize", run_trial=run_trial,
                   sampler=optuna.samplers.RandomSampler(seed=1),
                   pruner=optuna.pruners.NopPruner())


# --- planning a search on a scenario -----------------------------------------------------


def _scenario(tmp_path: Path, text: str = TINY, name: str = "tiny"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_scenario(str(path))


def test_the_plan_turns_the_validation_split_on_and_sets_the_metric(tmp_path):
    plan = tune.plan_search(_scenario(tmp_path), parse_space(["local-steps=1,2"]), {},
                            tune_dir=tmp_path / "t", num_partitions=2)
    assert plan.base_overrides == {"validation-fraction": 0.1, "selection-metric": "accuracy"}
    assert plan.metric == "accuracy" and plan.direction == "maximize"
    assert plan.max_rounds == 3 and "validation-fraction=0.1" in plan.notes[0]

    loss = tune.plan_search(_scenario(tmp_path), parse_space(["local-steps=1,2"]),
                            {"validation-fraction": 0.2}, metric="loss",
                            tune_dir=tmp_path / "t", num_partitions=2)
    assert loss.base_overrides["validation-fraction"] == 0.2 and not loss.notes
    assert loss.metric == "loss" and loss.direction == "minimize"


@pytest.mark.parametrize(("space", "overrides", "metric", "message"), [
    (["local-steps=1,2"], {"validation-fraction": 0}, "auto", "validation-fraction is 0"),
    (["local-steps=1,2"], {"local-steps": 3}, "auto", "given both with --space and --set"),
    (["local-steps=1,2"], {"run-name": "x"}, "auto", "drop --set run-name"),
    (["local-steps=1,2"], {}, "bleu", "--metric must be auto or a metric"),
    (["local-steps=1,2"], {"selection-metric": "loss"}, "accuracy", "disagree"),
    (["learning-rate=-1:1"], {}, "auto", "--space learning-rate: value -1.0"),
    (["strategy=fedavg,nope"], {}, "auto", "--space strategy: value 'nope'"),
    (["local-steps=1,x"], {}, "auto", "`local-steps` must be an integer"),
])
def test_a_bad_search_fails_before_any_trial(tmp_path, space, overrides, metric, message):
    with pytest.raises(ConfigError) as error:
        tune.plan_search(_scenario(tmp_path), parse_space(space), overrides, metric=metric,
                         tune_dir=tmp_path / "t", num_partitions=2)
    assert message in str(error.value)


def test_no_validation_split_is_possible_when_the_server_reads_no_training_data(tmp_path):
    text = TINY + 'labels = "a,b"\neval-dataset = "x.csv"\n'
    with pytest.raises(ConfigError, match="with `labels` set the server reads no training"):
        tune.plan_search(_scenario(tmp_path, text), parse_space(["local-steps=1,2"]), {},
                         tune_dir=tmp_path / "t", num_partitions=2)


# --- trials as harness runs (fake runs: no Flower) ---------------------------------------


def _row(rnd: int, validation: float | None, central: float = 0.5) -> str:
    return ResultsRow(
        round=rnd, central={"accuracy": central, "loss": 1.0, "num_examples": 40},
        validation=None if validation is None else {"accuracy": validation, "loss": 1.0},
    ).to_line()


def _streaming_run(curves: dict[int, list[float]], stopped: list):
    """A stand-in for run_app that writes one results row per round, asks
    ``should_stop`` after each as the real one does after each output line, and
    finishes the run (outcome.json + final model) unless stopped."""

    def run(run_config, *, num_supernodes, num_cpus, num_gpus, quiet, timeout, should_stop,
            port_wait):
        assert port_wait == tune.MACHINE_WAIT_SECONDS
        run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {"task": "classification", "num-server-rounds": 3}))
        (run_dir / "flwr.log").write_text("log")
        curve = curves[run_config["local-steps"]]
        with (run_dir / "results.jsonl").open("w") as results:
            results.write(_row(0, 0.1))
            for rnd, value in enumerate(curve, start=1):
                results.write(_row(rnd, value, central=value - 0.05))
                results.flush()
                if should_stop():
                    stopped.append(run_config["run-name"])
                    return SimulationResult(run_dir=run_dir, returncode=-15,
                                            log_path=run_dir / "flwr.log", stopped=True)
        best = max(range(len(curve)), key=lambda i: curve[i]) + 1
        (run_dir / "final" / "model").mkdir(parents=True)
        (run_dir / "final" / "model" / "config.json").write_text("{}")
        (run_dir / "outcome.json").write_text(json.dumps({
            "status": "completed", "message": "", "rounds_done": 3, "rounds_aggregated": 3,
            "final_model": True, "stopped_early": None,
            "selection": {"rule": "best", "round": best, "last_round": 3,
                          "metric": "accuracy", "split": "validation",
                          "value": curve[best - 1], "note": ""}}))
        return SimulationResult(run_dir=run_dir, returncode=0, log_path=run_dir / "flwr.log")

    return run


def test_a_tune_prunes_a_running_trial_and_writes_its_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr("simulations.sweep.write_report", lambda *a, **k: None)
    scenario = _scenario(tmp_path)
    space = parse_space(["local-steps=1,2,3"])
    plan = tune.plan_search(scenario, space, {}, tune_dir=tmp_path / "t", num_partitions=2)
    curves = {1: [0.6, 0.7, 0.8], 2: [0.5, 0.6, 0.9], 3: [0.2, 0.3, 0.95]}
    stopped: list = []
    run_trial = tune.scenario_trial_fn(
        scenario, plan.base_overrides, tune_dir=tmp_path / "t", metric="accuracy",
        run_fn=_streaming_run(curves, stopped))
    order = iter([1, 2, 3])

    class Fixed(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return next(order)

    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda seed: Fixed())
    records, written, _ = tune.tune_scenario(
        scenario, space, {}, trials=3, tune_dir=tmp_path / "t", run_trial=run_trial)

    # local-steps=3 falls behind the median (0.55) at round 1 and is stopped there.
    assert stopped == ["trial-002"]
    assert [r.state for r in records] == ["complete", "complete", "pruned"]
    assert records[0].value == 0.8 and records[0].selected_round == 3
    assert records[0].test == {"accuracy": pytest.approx(0.75), "loss": 1.0}
    assert records[2].values == ((1, 0.2),) and records[2].pruned_at == 1

    record = json.loads(written["tune"].read_text())
    assert record["status"] == "completed" and record["metric"] == "accuracy"
    assert record["counts"] == {"complete": 2, "pruned": 1, "failed": 0}
    assert record["space"] == {"local-steps": {"kind": "categorical", "choices": [1, 2, 3]}}
    assert record["best"]["number"] == 1 and record["best"]["value"] == 0.9
    assert record["best"]["test"]["accuracy"] == pytest.approx(0.85)
    assert [t["values"] for t in record["trials"]] == [
        [[1, 0.6], [2, 0.7], [3, 0.8]], [[1, 0.5], [2, 0.6], [3, 0.9]], [[1, 0.2]]]
    assert record["trials"][2]["run_dir"].endswith("trial-002")

    best = load_scenario(str(written["best"]))
    assert best.num_supernodes == 2
    assert best.run_config == {"builtin-examples": 200, "num-server-rounds": 3,
                               "local-steps": 2, "validation-fraction": 0.1,
                               "selection-metric": "accuracy"}
    resolve_run_config(best, {}, output_dir=tmp_path / "again", run_name="x")  # runs
    assert "validation accuracy 0.9000" in written["best"].read_text()
    html = written["report"].read_text()
    assert "trial 2" in html and "pruned" in html and "Final test set" in html
    assert all((tmp_path / "t" / "tune" / f"{n}.png").is_file()
               for n in ("objective", "curves", "params"))


def test_an_interrupted_tune_keeps_the_finished_trials(tmp_path, monkeypatch):
    def run_trial(number, params, report):
        if number == 1:
            raise KeyboardInterrupt
        return TrialRun(values=((1, 0.7),), ok=True, selected_round=1,
                        test={"accuracy": 0.6})

    with pytest.raises(KeyboardInterrupt):
        tune.tune_scenario(_scenario(tmp_path), parse_space(["local-steps=1:4"]), {},
                           trials=5, tune_dir=tmp_path / "t", run_trial=run_trial)
    record = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert record["status"] == "interrupted"
    assert [t["state"] for t in record["trials"]] == ["complete"]
    assert (tmp_path / "t" / "best.toml").is_file()


def test_the_cli_fails_when_no_trial_completes(tmp_path, monkeypatch, capsys):
    real = tune.tune_scenario

    def failing(*args, **kwargs):
        return real(*args, **kwargs, run_trial=lambda n, p, r: TrialRun(message="boom"))

    monkeypatch.setattr(tune, "tune_scenario", failing)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    status = cli.main(["tune", str(path), "--space", "local-steps=1,2", "--trials", "2",
                       "--output-dir", str(tmp_path), "--name", "t"])
    assert status == 1
    assert "no trial completed" in capsys.readouterr().err
    record = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert [t["state"] for t in record["trials"]] == ["failed", "failed"]
    assert not (tmp_path / "t" / "best.toml").exists()


def test_the_cli_refuses_a_bad_space_with_status_2(tmp_path, capsys):
    status = cli.main(["tune", "quickstart", "--space", "learning-rate=0.1",
                       "--trials", "2", "--output-dir", str(tmp_path)])
    assert status == 2
    assert "--space 'learning-rate=0.1'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_watcher_reports_new_rounds_once_and_stops_on_prune(tmp_path):
    results = tmp_path / "results.jsonl"
    reported: list = []
    watcher = RoundWatcher(results, metric="accuracy", last_round=3,
                           report=lambda r, v: reported.append((r, v)) or r == 2)
    assert watcher() is False  # no file yet
    results.write_text(_row(0, 0.1) + _row(1, 0.5))
    assert watcher() is False and watcher() is False
    with results.open("a") as f:
        f.write(_row(2, float("nan")))
    assert watcher() is True and watcher.pruned_at == 2
    assert reported[0] == (1, 0.5) and reported[1][0] == 2 and math.isnan(reported[1][1])
    assert watcher.values == {1: 0.5}  # only finite values are kept
    assert watcher() is True and len(reported) == 2


def test_the_last_round_is_never_pruned(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(_row(1, 0.5) + _row(2, None) + _row(3, 0.4))
    reported: list = []
    watcher = RoundWatcher(results, metric="accuracy", last_round=3,
                           report=lambda r, v: reported.append(r) or True)
    # Round 1 is pruned at once; a fresh watcher on the last round only is not.
    assert watcher() is True and watcher.pruned_at == 1
    results.write_text(_row(3, 0.4))
    late = RoundWatcher(results, metric="accuracy", last_round=3, report=lambda r, v: True)
    assert late() is False and late.pruned_at is None


def test_the_harness_stops_a_simulation_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    fake_flwr = tmp_path / "flwr"
    fake_flwr.write_text("#!/bin/sh\nwhile true; do echo round; sleep 0.05; done\n")
    fake_flwr.chmod(fake_flwr.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(fake_flwr))
    lines = iter(range(100))

    result = runner.run_app({"output-dir": str(tmp_path), "run-name": "x"},
                            num_supernodes=1, quiet=True,
                            should_stop=lambda: next(lines) == 2)

    assert result.stopped and result.returncode != 0
    log = result.log_path.read_text()
    assert log.count("round") >= 3 and "the harness stopped this simulation" in log
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(fake_flwr) in " ".join(p.info["cmdline"] or [])]


# --- trial 0 = the scenario's settings -----------------------------------------------------


def test_trial_0_runs_the_given_settings_before_the_sampler_proposes_any():
    space = {"learning-rate": SpaceParam("learning-rate", "float", 0.001, 0.1, log=True),
             "local-steps": SpaceParam("local-steps", "categorical", choices=(5, 10, 20))}
    seen: list = []

    def run_trial(number, params, report):
        seen.append(dict(params))
        return TrialRun(values=((1, params["learning-rate"]),), ok=True, selected_round=1)

    records = run_search(space, trials=3, direction="maximize", run_trial=run_trial,
                         sampler=optuna.samplers.RandomSampler(seed=3),
                         pruner=optuna.pruners.NopPruner(),
                         first={"learning-rate": 0.003, "local-steps": 10})

    assert seen[0] == {"learning-rate": 0.003, "local-steps": 10}
    assert records[0].params == seen[0] and records[0].value == 0.003
    assert all(space["learning-rate"].contains(s["learning-rate"]) for s in seen[1:])
    assert seen[1] != seen[0]  # the sampler proposes the rest


@pytest.mark.parametrize("first", [{"local-steps": 7}, {"local-steps": 5, "seed": 1}, {}])
def test_trial_0_must_give_every_key_a_value_inside_the_space(first):
    space = {"local-steps": SpaceParam("local-steps", "int", 5, 6)}
    with pytest.raises(ConfigError, match="trial 0's settings"):
        run_search(space, trials=1, direction="maximize",
                   run_trial=lambda n, p, r: TrialRun(), first=first,
                   sampler=optuna.samplers.RandomSampler(seed=0),
                   pruner=optuna.pruners.NopPruner())


def test_a_dimension_contains_its_choices_and_its_range_only():
    steps = SpaceParam("local-steps", "int", 5, 20)
    rate = SpaceParam("learning-rate", "float", 1e-4, 1e-2, log=True)
    chosen = SpaceParam("local-steps", "categorical", choices=(5, 10))
    assert steps.contains(5) and steps.contains(20) and not steps.contains(21)
    assert not steps.contains(7.0) and not steps.contains(True)
    assert rate.contains(0.003) and rate.contains(1e-4) and not rate.contains(0.02)
    assert chosen.contains(10) and not chosen.contains(12) and not chosen.contains("10")


def test_a_numeric_choice_matches_by_value_but_a_bool_only_a_bool():
    gamma = parse_space_item("focal-gamma=0,2")  # RunConfig holds the value as 0.0
    ones = SpaceParam("local-steps", "categorical", choices=(1, 2))
    flags = SpaceParam("secure-aggregation", "categorical", choices=(True, False))
    assert gamma.contains(0.0) and gamma.contains(2) and not gamma.contains(1.0)
    assert ones.contains(1.0) and not ones.contains(True)
    assert flags.contains(True) and not flags.contains(1) and not flags.contains(0.0)


def test_trial_0_keeps_a_float_keys_default_given_as_a_whole_choice(tmp_path):
    plan = tune.plan_search(_scenario(tmp_path), parse_space(["focal-gamma=0,2"]), {},
                            tune_dir=tmp_path / "t", num_partitions=2)
    assert plan.defaults == {"focal-gamma": 0.0} and plan.defaults_note == ""


def test_the_plan_takes_the_scenarios_values_as_trial_0_when_inside_the_space(tmp_path):
    scenario = _scenario(tmp_path, TINY + "local-steps = 2\nlearning-rate = 0.003\n")
    inside = tune.plan_search(
        scenario, parse_space(["local-steps=1:4", "learning-rate=1e-4:1e-2:log"]),
        {}, tune_dir=tmp_path / "t", num_partitions=2)
    overridden = tune.plan_search(scenario, parse_space(["local-steps=1:4"]),
                                  {"learning-rate": 0.5}, tune_dir=tmp_path / "t",
                                  num_partitions=2)
    outside = tune.plan_search(scenario, parse_space(["local-steps=3,4"]), {},
                               tune_dir=tmp_path / "t", num_partitions=2)

    assert inside.defaults == {"local-steps": 2, "learning-rate": 0.003}
    assert inside.defaults_note == ""
    assert overridden.defaults == {"local-steps": 2}
    assert outside.defaults is None
    assert "local-steps=2" in outside.defaults_note and "outside the space" in \
        outside.defaults_note


def test_the_tune_says_whether_the_best_beats_trial_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("simulations.sweep.write_report", lambda *a, **k: None)
    scenario = _scenario(tmp_path, TINY + "local-steps = 2\n")
    curves = {1: [0.6, 0.7, 0.8], 2: [0.5, 0.6, 0.7], 3: [0.6, 0.8, 0.9]}

    def run_trial(number, params, report):
        curve = curves[params["local-steps"]]
        return TrialRun(values=tuple(enumerate(curve, start=1)), ok=True,
                        selected_round=3, test={"accuracy": curve[-1] - 0.1})

    records, written, _ = tune.tune_scenario(
        scenario, parse_space(["local-steps=1,2,3"]), {}, trials=4,
        tune_dir=tmp_path / "t", pruner="none", run_trial=run_trial)

    assert records[0].params == {"local-steps": 2}
    record = json.loads(written["tune"].read_text())
    defaults = record["defaults"]
    assert defaults["trial"] == 0 and defaults["params"] == {"local-steps": 2}
    assert defaults["value"] == 0.7 and defaults["test"] == {"accuracy": pytest.approx(0.6)}
    assert record["best"]["params"] == {"local-steps": 3}
    assert defaults["best_trial"] == record["best"]["number"]
    assert defaults["improvement"] == pytest.approx(0.2) and defaults["beats"] is True
    line = "trial 0 = the scenario's settings (local-steps=2)"
    assert line in capsys.readouterr().out
    assert "beats it by +0.2000" in written["report"].read_text()

    from simulations.tune_report import write_results_section

    results = write_results_section(tmp_path / "t", command="python -m simulations tune x",
                                    output=tmp_path / "bench")
    text = results.read_text()
    assert "## tune" in text and "Command: `python -m simulations tune x`" in text
    assert "| 0 | the scenario's settings | 2 | complete | 0.7 | 3 | 0.6 |" in text
    best = record["best"]["number"]
    assert f"| {best} | best | 3 | complete | 0.9 | 3 | 0.8 |" in text
    assert (f"accuracy of the exported model: trial 0 0.6000, best trial {best} 0.8000 "
            "(+20.00 points)") in text


def test_trial_0_is_reported_unbeaten_when_no_trial_does_better(tmp_path):
    plan = tune.TunePlan(scenario=_scenario(tmp_path), space={}, base_overrides={},
                         task="classification", metric="loss", direction="minimize",
                         max_rounds=3, defaults={"local-steps": 2})
    first = tune.TrialRecord(number=0, params={"local-steps": 2}, state="complete",
                             value=0.3, values=((1, 0.3),), selected_round=1)
    worse = tune.TrialRecord(number=1, params={"local-steps": 1}, state="complete",
                             value=0.4, values=((1, 0.4),), selected_round=1)
    entry = tune.defaults_comparison([first, worse], plan)

    assert entry["beats"] is False and entry["improvement"] == pytest.approx(-0.0)
    assert entry["best_trial"] == 0
    assert "no trial beat it" in tune.defaults_sentence(entry, note="", label="loss")
    assert tune.defaults_comparison([worse], plan) is None  # trial 0 did not run


def test_the_results_section_shows_an_sft_search_its_headline_test_metric(tmp_path):
    from simulations.tune_report import results_section

    plan = tune.TunePlan(scenario=_scenario(tmp_path), space=parse_space(["local-steps=1,2"]),
                         base_overrides={}, task="sft", metric="loss",
                         direction="minimize", max_rounds=3, defaults={"local-steps": 1})
    first = tune.TrialRecord(number=0, params={"local-steps": 1}, state="complete",
                             value=0.9, values=((1, 0.9),), selected_round=1,
                             test={"exact_match": 0.25, "loss": 0.95})
    better = tune.TrialRecord(number=1, params={"local-steps": 2}, state="complete",
                              value=0.7, values=((1, 0.7),), selected_round=1,
                              test={"exact_match": 0.4, "loss": 0.75})
    record = tune.tune_json(plan, [first, better], status="completed", trials=2, seed=0,
                            pruner="none", num_supernodes=2, seconds=1.0)

    section = results_section(record, command="tune", machine={})

    table = section["table"]
    assert table["columns"][-1] == "test exact match"
    assert [row[-1] for row in table["rows"]] == [0.25, 0.4]
    assert any("exact match of the exported model: trial 0 0.2500, best trial 1 0.4000 "
               "(+15.00 points)" in note for note in section["notes"])
    assert "Test exact match is the final test set" in section["description"]


def test_a_registered_task_is_searched_on_its_own_metrics(tmp_path, monkeypatch):
    from common.tasks import MetricInfo, TaskInfo, task_registered

    monkeypatch.setattr("server.preflight.preflight", lambda cfg, num_partitions: [])
    toy = TaskInfo(module=__name__, default_model="toy-linear", metrics=(
        MetricInfo("miss_rate", "miss rate", higher_is_better=False),
        MetricInfo("loss", "loss", higher_is_better=False, bounded=False)))
    with task_registered("toy", toy):
        scenario = _scenario(tmp_path, TINY + 'task = "toy"\n')
        plan = tune.plan_search(scenario, parse_space(["local-steps=1,2"]), {},
                                tune_dir=tmp_path / "t", num_partitions=2,
                                metric="miss_rate")
        with pytest.raises(ConfigError, match=r"task 'toy' \(miss_rate, loss\)"):
            tune.plan_search(scenario, parse_space(["local-steps=1,2"]), {},
                             tune_dir=tmp_path / "t", num_partitions=2, metric="accuracy")
    assert plan.metric == "miss_rate" and plan.direction == "minimize"


def test_the_results_section_states_the_split_sizes_the_trials_measured(tmp_path):
    from simulations.tune_report import results_section, split_rows

    def run(name: str, validation: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        rows = [ResultsRow.from_json({
            "round": rnd, "central": {"accuracy": 0.5, "num_examples": 300},
            "validation": {"accuracy": 0.5, "num_examples": validation}}) for rnd in (0, 1)]
        (folder / "results.jsonl").write_text(
            "".join(json.dumps(r.to_json()) + "\n" for r in rows))
        return folder

    sizes = split_rows([run("a", 270), run("b", 270), tmp_path / "never-ran"])
    assert sizes == {"validation": (270,), "central": (300,)}
    assert split_rows([run("c", 250), tmp_path / "a"])["validation"] == (250, 270)

    plan = tune.TunePlan(scenario=_scenario(tmp_path), space=parse_space(["local-steps=1,2"]),
                         base_overrides={}, task="classification", metric="accuracy",
                         direction="maximize", max_rounds=1)
    record = tune.tune_json(plan, [], status="interrupted", trials=2, seed=0, pruner="none",
                            num_supernodes=2, seconds=1.0)
    notes = results_section(record, command="tune", machine={}, sizes=sizes)["notes"]
    assert notes[-1] == ("Split sizes, from the trials' results.jsonl: validation split 270 "
                         "rows (one row = 0.37 points of accuracy); test set (central eval) "
                         "300 rows (one row = 0.33 points of accuracy).")
    assert not any("Split sizes" in n for n in
                   results_section(record, command="tune", machine={})["notes"])
