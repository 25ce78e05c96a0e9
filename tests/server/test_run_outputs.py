import json

import numpy as np
import pytest

from common.config import ConfigError, RunConfig
from server.run_outputs import RunOutputs


def _outputs(tmp_path, keep=0):
    outputs = RunOutputs(tmp_path / "run", keep_checkpoints=keep)
    outputs.start(RunConfig(), ["neg", "pos"])
    return outputs


def test_start_writes_config_and_label_map(tmp_path):
    outputs = _outputs(tmp_path)
    config = json.loads((outputs.folder / "config.json").read_text())
    assert config["learning-rate"] == RunConfig().learning_rate
    assert json.loads((outputs.folder / "label_map.json").read_text()) == {"0": "neg", "1": "pos"}


def test_checkpoint_round_trip_is_bit_exact_with_strategy_state(tmp_path):
    outputs = _outputs(tmp_path)
    state = {"a.weight": np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)}
    strategy_state = {"m_t": {"a.weight": np.ones((3, 2))}, "momentum_vector": [np.zeros(2)]}
    outputs.save_checkpoint(1, state, strategy_state)
    outputs.append_result({"round": 1})
    checkpoint = outputs.last_checkpoint()
    assert checkpoint.round == 1
    assert checkpoint.global_state["a.weight"].tobytes() == state["a.weight"].tobytes()
    np.testing.assert_array_equal(checkpoint.strategy_state["m_t"]["a.weight"], np.ones((3, 2)))
    assert isinstance(checkpoint.strategy_state["momentum_vector"], list)


def test_resume_point_is_the_last_round_with_results_and_checkpoint(tmp_path):
    outputs = _outputs(tmp_path)
    for rnd in (0, 1, 2):
        outputs.save_checkpoint(rnd, {"w": np.full(1, rnd, np.float32)}, {})
        outputs.append_result({"round": rnd})
    outputs.save_checkpoint(3, {"w": np.full(1, 3, np.float32)}, {})  # crashed before line
    with outputs.results_path.open("a") as f:
        f.write('{"round": 4, "torn')  # crashed mid-write
    checkpoint = outputs.last_checkpoint()
    assert checkpoint.round == 2 and checkpoint.global_state["w"][0] == 2
    assert [r["round"] for r in outputs.read_results()] == [0, 1, 2]


def test_old_checkpoints_are_pruned(tmp_path):
    outputs = _outputs(tmp_path, keep=2)
    for rnd in range(5):
        outputs.save_checkpoint(rnd, {"w": np.zeros(1, np.float32)}, {})
    assert sorted(p.name for p in outputs.checkpoint_dir.iterdir()) == [
        "round-0003.safetensors", "round-0004.safetensors"]


def test_resume_refuses_changed_settings_but_allows_more_rounds(tmp_path):
    outputs = _outputs(tmp_path)
    outputs.check_resumable(RunConfig(num_server_rounds=9, resume_from=str(outputs.folder)))
    with pytest.raises(ConfigError, match="learning-rate: 0.002 -> 0.1"):
        outputs.check_resumable(RunConfig(learning_rate=0.1))


def test_resume_without_completed_round_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no completed round"):
        _outputs(tmp_path).last_checkpoint()
