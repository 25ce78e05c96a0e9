"""Tests for simulations/runner.py that need no simulation."""

from __future__ import annotations

import fcntl

import pytest

from simulations import runner


def test_a_second_simulation_waits_for_the_machine_lock_then_fails_clearly(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    started = []
    monkeypatch.setattr(runner, "_run_locked", lambda *a, **k: started.append(1))
    config = {"output-dir": str(tmp_path), "run-name": "x"}
    with (tmp_path / "superlink.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another fedsft simulation is running
        with pytest.raises(runner.HarnessError, match="another fedsft simulation held"):
            runner.run_app(config, num_supernodes=1, port_wait=1.5)
    assert started == []
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    runner.run_app(config, num_supernodes=1, port_wait=1.5)  # released: it runs
    assert started == [1]
