"""Scenario files, --set / --grid parsing and the sweep loop (a fake runner, no Flower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from simulations.__main__ import main
from simulations.runner import QUEUED_RUN_WAIT_SECONDS, HarnessError, SimulationResult
from simulations.scenarios import (
    REPO_DIR,
    ScenarioError,
    available,
    check_requires,
    load_scenario,
    parse_set,
    resolve_paths,
    resolve_run_config,
)
from simulations.sweep import grid_points, parse_grid, parse_seeds, run_sweep

SHIPPED = ["quickstart", "sst2-iid", "sst2-dirichlet-0.5", "sst2-dirichlet-0.1",
           "sst2-skew-fedavg", "sst2-skew-fedprox", "sst2-full", "scale-1000", "sft-quickstart"]


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_validates(name):
    scenario = load_scenario(name)

    cfg = RunConfig.from_flower(resolve_paths(scenario.run_config))

    assert scenario.description and scenario.num_supernodes >= 1
    for path in scenario.requires:  # requires are repository-relative data files
        assert path.startswith("../shared/data/")
    if cfg.dataset != "builtin":
        assert Path(cfg.dataset).is_absolute()
        assert scenario.requires, "a scenario on shared data must say it needs it"
    assert sorted(SHIPPED) == available()


def test_shipped_scenarios_differ_only_where_they_should():
    iid, full = load_scenario("sst2-iid"), load_scenario("sst2-full")
    fedavg, fedprox = load_scenario("sst2-skew-fedavg"), load_scenario("sst2-skew-fedprox")
    scale = load_scenario("scale-1000")

    changed = {k for k in {**iid.run_config, **full.run_config}
               if iid.run_config.get(k) != full.run_config.get(k)}
    assert changed == {"method", "learning-rate", "keep-checkpoints"}
    assert {k for k in fedavg.run_config if fedavg.run_config[k] != fedprox.run_config[k]} == {
        "strategy"}
    assert scale.num_supernodes == 1000 and scale.run_config["fraction-train"] == 0.01
    assert load_scenario("sst2-dirichlet-0.1").run_config["dirichlet-alpha"] == 0.1


@pytest.mark.parametrize(("text", "message"), [
    ("num-supernodes = 2\nwhatever = 1\n", r"unknown key\(s\) \['whatever'\]"),
    ("description = 'x'\n", "`num-supernodes` must be an integer >= 1, got None"),
    ("num-supernodes = 0\n", "`num-supernodes` must be an integer >= 1, got 0"),
    ("num-supernodes = 2.5\n", "got 2.5"),
    ("num-supernodes = true\n", "got True"),
    ("num-supernodes = 2\n[resources]\nnum-cpu = 1\n", r"unknown \[resources\] key"),
    ("num-supernodes = 2\n[resources]\nnum-gpus = -1\n", "`num-gpus` must be a number >= 0"),
    ("num-supernodes = 2\nrequires = 'a'\n", "`requires` must be a list"),
    ("num-supernodes = 2\nrequires = [1]\n", r"`requires` must be a list of paths \(strings\)"),
    ("num-supernodes = 2\nresources = 4\n", r"\[resources\] must be a table.*got 4"),
    ("num-supernodes = 2\ndescription = 3\n", "`description` must be a string, got 3"),
    ("num-supernodes = 2\nrun-config = 'x'\n", r"\[run-config\] must be a table"),
    ("num-supernodes = [\n", "invalid TOML"),
])
def test_malformed_scenarios_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenario(str(_write(tmp_path, text)))


def test_a_scenario_file_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("num-supernodes = 2\ndescription = 'caf\u00e9'\n".encode("latin-1"))

    with pytest.raises(ScenarioError, match=r"latin1\.toml: not UTF-8 text \(byte offset 37"):
        load_scenario(str(path))


def test_run_config_values_of_the_wrong_type_are_left_to_run_config(tmp_path):
    scenario = load_scenario(str(_write(
        tmp_path, "num-supernodes = 2\n[run-config]\nlocal-steps = 'many'\n")))

    with pytest.raises(ConfigError, match="local-steps"):
        resolve_run_config(scenario, {}, output_dir=tmp_path, run_name="r")


def test_missing_scenario_lists_the_available_ones():
    with pytest.raises(ScenarioError, match="not found.*available: quickstart"):
        load_scenario("nope")


def test_missing_required_files_name_them(tmp_path):
    scenario = load_scenario(str(_write(
        tmp_path, "num-supernodes = 2\nrequires = ['../nowhere/train.tsv']\n")))

    with pytest.raises(ScenarioError, match=r"needs \.\./nowhere/train\.tsv.*missing"):
        check_requires(scenario)
    # The command line reports it as an error before Flower starts.
    assert main(["run", str(tmp_path / "s.toml"), "--output-dir", str(tmp_path)]) == 2


def test_unknown_run_config_keys_fail_before_flower_starts(tmp_path, capsys):
    path = _write(tmp_path, "num-supernodes = 2\n[run-config]\nlearning-rat = 0.1\n")

    assert main(["run", str(path), "--output-dir", str(tmp_path)]) == 2
    assert "unknown run-config key(s) 'learning-rat'" in capsys.readouterr().err
    assert main(["run", "quickstart", "--set", "fraction-train=2",
                 "--output-dir", str(tmp_path)]) == 2
    assert "`fraction-train`" in capsys.readouterr().err


def test_set_parses_toml_scalars_and_keeps_strings():
    assert parse_set([
        "num-server-rounds=3", "learning-rate=1e-3", "strategy=fedprox", "seed= 7",
        "run-name=2024", "dataset=/data/a=b.csv", "labels=\"x,y\"", "fraction-train=1",
        "system-prompt=true", "max-new-tokens=8",  # a task's own keys (sft's options)
    ]) == {
        "num-server-rounds": 3, "learning-rate": 0.001, "strategy": "fedprox", "seed": 7,
        "run-name": "2024",  # a string key stays a string even when it looks like a number
        "dataset": "/data/a=b.csv", "labels": "x,y", "fraction-train": 1,
        "system-prompt": "true", "max-new-tokens": 8,
    }
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set(["strategy"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set(["=3"])


def test_resolve_run_config_makes_repository_paths_absolute(tmp_path):
    scenario = load_scenario("sst2-iid")

    cfg = resolve_run_config(scenario, {"seed": 3}, output_dir=tmp_path, run_name="r")

    assert cfg["dataset"] == str((REPO_DIR / "../shared/data/sst2/train.tsv").resolve())
    assert cfg["output-dir"] == str(tmp_path.resolve()) and cfg["run-name"] == "r"
    assert cfg["seed"] == 3


def test_grid_and_seeds_parsing_and_run_names():
    grid = parse_grid(["strategy=fedavg,fedprox", "dirichlet-alpha=0.5, 0.1"])

    assert grid == {"strategy": ["fedavg", "fedprox"], "dirichlet-alpha": [0.5, 0.1]}
    assert parse_seeds("1,2,3") == [1, 2, 3]
    names = [name for name, _ in grid_points("sc", grid, [1, 2])]
    assert names[:3] == ["sc-strategy=fedavg-dirichlet-alpha=0.5-seed=1",
                         "sc-strategy=fedavg-dirichlet-alpha=0.5-seed=2",
                         "sc-strategy=fedavg-dirichlet-alpha=0.1-seed=1"]
    assert len(names) == 8
    assert grid_points("sc", {"dataset": ["/a/b.csv"]}, [0])[0][0] == "sc-dataset=_a_b.csv-seed=0"
    for bad, message in ((["strategy"], "key=v1,v2"), (["seed=1,2"], "use --seeds"),
                         (["a=1", "a=2"], "twice"), (["a=1,,2"], "empty value"),
                         (["a=1,1"], "repeats")):
        with pytest.raises(ConfigError, match=message):
            parse_grid(bad)
    for bad in ("", "1,x", "1,1", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def _fake_runner(fail_names: set[str], raise_names: set[str]):
    """A stand-in for run_app: writes a finished run folder, or fails for some runs."""
    calls = []

    def run(run_config, *, num_supernodes, num_cpus, num_gpus, quiet, timeout, port_wait):
        from tests.simulations.test_report import make_run

        name = run_config["run-name"]
        calls.append((name, num_supernodes, run_config["seed"], port_wait))
        if name in raise_names:
            raise HarnessError("port in use")
        run_dir = Path(run_config["output-dir"]) / name
        make_run(run_dir / "tmp", nodes=None, **{"seed": run_config["seed"]})
        for path in (run_dir / "tmp").iterdir():
            path.rename(run_dir / path.name)
        (run_dir / "tmp").rmdir()
        if name not in fail_names:
            (run_dir / "final" / "model").mkdir(parents=True)
            (run_dir / "final" / "model" / "config.json").write_text("{}")
            (run_dir / "outcome.json").write_text(json.dumps({
                "status": "completed", "message": "", "rounds_done": 3,
                "rounds_aggregated": 3, "final_model": True, "stopped_early": None}))
        (run_dir / "flwr.log").write_text("log")
        return SimulationResult(run_dir=run_dir, returncode=1 if name in fail_names else 0,
                                log_path=run_dir / "flwr.log")

    return run, calls


def test_sweep_goes_on_after_failures_and_compares_the_runs(tmp_path):
    scenario = load_scenario(str(_write(
        tmp_path, "num-supernodes = 3\n[run-config]\nbuiltin-examples = 200\n", "sw.toml")))
    run_fn, calls = _fake_runner({"sw-local-steps=1-seed=2"}, {"sw-local-steps=2-seed=1"})

    outcomes, compare = run_sweep(
        scenario, grid={"local-steps": [1, 2]}, seeds=[1, 2], base_overrides={},
        sweep_dir=tmp_path / "sweep", run_fn=run_fn)

    assert [c[0] for c in calls] == ["sw-local-steps=1-seed=1", "sw-local-steps=1-seed=2",
                                     "sw-local-steps=2-seed=1", "sw-local-steps=2-seed=2"]
    assert {c[1] for c in calls} == {3} and [c[2] for c in calls] == [1, 2, 1, 2]
    # Queued behind other simulations, a run waits for the machine rather than failing.
    assert {c[3] for c in calls} == {QUEUED_RUN_WAIT_SECONDS}
    assert [o.ok for o in outcomes] == [True, False, False, True]
    assert "exit code 1" in outcomes[1].message  # partial results: still reported
    assert outcomes[2].message == "port in use"  # never started: no results, no report
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["ok"] for r in record["runs"]] == [True, False, False, True]
    for outcome in outcomes:  # every run recorded how it was simulated
        sim = json.loads((outcome.run_dir / "simulation.json").read_text())
        assert sim["num-supernodes"] == 3 and sim["scenario"] == "sw"
    assert [(o.run_dir / "report.html").is_file() for o in outcomes] == [
        True, True, False, True]
    assert compare == tmp_path / "sweep" / "compare.html"
    html = compare.read_text()
    assert html.count("<img") == 6
    assert "sw-local-steps=1-seed=2" in html and "sw-local-steps=2-seed=1" not in html


def test_a_sweep_run_is_the_run_command_with_its_seed(tmp_path):
    # What makes a sweep's seed-1 run reproducible by `run --set seed=1`: both hand the
    # simulation the same run config and clients (the simulation itself is
    # deterministic per seed: tests/e2e/test_simulation.py's resume test).
    from simulations.sweep import run_scenario

    scenario = load_scenario(str(_write(
        tmp_path, "num-supernodes = 3\n[run-config]\nbuiltin-examples = 200\n", "sw.toml")))
    seen = []

    def recording(run_config, **kwargs):
        seen.append(({k: v for k, v in run_config.items()
                      if k not in ("run-name", "output-dir")}, kwargs["num_supernodes"]))
        return _fake_runner(set(), set())[0](run_config, **kwargs)

    run_sweep(scenario, grid={}, seeds=[1], base_overrides={}, sweep_dir=tmp_path / "sweep",
              run_fn=recording)
    run_scenario(scenario, parse_set(["seed=1"]), output_dir=tmp_path / "out",
                 run_name="again", run_fn=recording)
    (swept, nodes), (again, nodes_again) = seen
    assert swept == again and swept["seed"] == 1 and nodes == nodes_again == 3


def test_sweep_command_validates_every_grid_point_first(tmp_path, capsys):
    path = _write(tmp_path, "num-supernodes = 2\n", "sw.toml")

    assert main(["sweep", str(path), "--grid", "strategy=fedavg,nope",
                 "--output-dir", str(tmp_path)]) == 2
    assert "`strategy` must be one of" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/sw-*"))  # nothing ran
