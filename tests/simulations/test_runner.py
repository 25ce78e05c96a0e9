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


def test_reported_seconds_exclude_waiting_for_the_machine(tmp_path, monkeypatch):
    """Benchmarks time runs with ``seconds``: another run's time must not count."""
    import stat
    import threading
    import time

    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    fake_flwr = tmp_path / "flwr"
    fake_flwr.write_text("#!/bin/sh\necho simulated run\n")
    fake_flwr.chmod(fake_flwr.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(fake_flwr))

    held = (tmp_path / "superlink.lock").open("a")
    fcntl.flock(held, fcntl.LOCK_EX)  # another simulation holds the machine for 2 s
    threading.Timer(2.0, held.close).start()
    begun = time.monotonic()
    result = runner.run_app({"output-dir": str(tmp_path), "run-name": "x"},
                            num_supernodes=1, quiet=True, port_wait=30)
    waited_and_ran = time.monotonic() - begun

    assert result.returncode == 0
    assert "simulated run" in result.log_path.read_text()
    assert waited_and_ran >= 2.0
    assert 0 < result.seconds < waited_and_ran - 1.5
