"""Tests for simulations/runner.py that need no simulation."""

from __future__ import annotations

import fcntl
import os

import psutil
import pytest

from simulations import runner


def test_a_second_simulation_waits_for_the_machine_lock_then_fails_clearly(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    started = []
    monkeypatch.setattr(runner, "_run_locked", lambda *a, **k: started.append(1) or
                        runner.SimulationResult(tmp_path, 0, tmp_path / "flwr.log"))
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


# --- a fair machine lock ----------------------------------------------------------------


def _take_turn(lock_path: str, name: str, order_file: str) -> None:
    """A waiter (in its own process): hold the machine, note its turn, let go."""
    from pathlib import Path

    from simulations import runner as child_runner

    with (child_runner.hold_machine(run_name=name, timeout=60, lock_path=Path(lock_path)),
          open(order_file, "a") as order):
        order.write(name + "\n")


def _queued(lock_path, count: int) -> None:
    """Wait until ``count`` waiters stand in the queue next to ``lock_path``."""
    import time

    queue = lock_path.with_name(lock_path.name + ".queue")
    while not queue.exists() or len(queue.read_text().splitlines()) < count:
        time.sleep(0.05)


def test_waiters_get_the_machine_in_the_order_they_came(tmp_path, capfd):
    import multiprocessing

    lock_path, order = tmp_path / "superlink.lock", tmp_path / "order.txt"
    spawn = multiprocessing.get_context("spawn")  # fork would inherit the held lock
    with runner.hold_machine(run_name="first", timeout=5, lock_path=lock_path):
        waiters = []
        for i, name in enumerate(["second", "third", "fourth"], start=1):
            proc = spawn.Process(target=_take_turn, args=(str(lock_path), name, str(order)))
            proc.start()
            waiters.append(proc)
            _queued(lock_path, i)  # it stands in the queue before the next one comes
        holder = lock_path.read_text()
    for proc in waiters:
        proc.join(60)

    assert [p.exitcode for p in waiters] == [0, 0, 0]
    assert order.read_text().splitlines() == ["second", "third", "fourth"]
    assert '"run": "first"' in holder and f'"pid": {os.getpid()}' in holder
    waited = capfd.readouterr().err
    assert "held by pid" in waited and "(run 'first', since" in waited
    assert "2 waiter(s) ahead of this one" in waited  # the fourth one's first look
    assert lock_path.read_text() == ""  # no stale holder once released


def test_dead_waiters_do_not_block_the_queue(tmp_path):
    import json
    import subprocess

    lock_path = tmp_path / "superlink.lock"
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "superlink.lock.queue").write_text(json.dumps({
        "pid": gone.pid, "created": 0.0, "token": "dead", "run": "crashed",
        "since": 0.0}) + "\nnot a ticket\n")

    with runner.hold_machine(run_name="me", timeout=3, lock_path=lock_path):
        queue = (tmp_path / "superlink.lock.queue").read_text()

    assert queue == ""  # the dead ticket was dropped, and this one left on acquiring


# --- logs and interrupts ----------------------------------------------------------------


def _fake_flwr(tmp_path, body: str):
    import stat

    script = tmp_path / "flwr"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_every_attempt_appends_to_the_log_after_a_header(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    fake = _fake_flwr(tmp_path, "echo attempt output\n")
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(fake))
    config = {"output-dir": str(tmp_path), "run-name": "r"}

    runner.run_app(config, num_supernodes=1, quiet=True)
    result = runner.run_app(config, num_supernodes=1, quiet=True)

    lines = result.log_path.read_text().splitlines()
    assert [line.split(",")[0] for line in lines[::2]] == [
        "==== fedsft attempt 1", "==== fedsft attempt 2"]
    assert lines[1] == lines[3] == "attempt output"
    assert lines[0].endswith(" ====") and f"{fake} run " in lines[0]


def test_resume_from_a_missing_folder_is_not_created(tmp_path):
    with pytest.raises(runner.HarnessError, match="does not exist"):
        runner.run_app({"resume-from": str(tmp_path / "gone")}, num_supernodes=1)
    assert not (tmp_path / "gone").exists()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_stops_the_whole_simulation_tree(tmp_path, monkeypatch):
    """The fake `flwr run` starts what Flower does: a child, a child in a new session
    (SuperExec) and an orphan re-parented away from it (a Ray worker after its driver
    exited) that only its FLWR_HOME ties to the run."""
    import signal
    import threading
    import time

    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    pids = tmp_path / "pids"
    fake = _fake_flwr(tmp_path, f"""
sleep 300 & echo $! >> {pids}
setsid sleep 301 & echo $! >> {pids}
sh -c 'sleep 302 & echo $! >> {pids}' &
echo $$ >> {pids}
echo '[fedsft] round 1/3'
wait
""")
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(fake))

    def interrupt_when_started() -> None:
        while not pids.exists() or len(pids.read_text().split()) < 4:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    with runner.sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        runner.run_app({"output-dir": str(tmp_path), "run-name": "r"}, num_supernodes=1,
                       quiet=True, timeout=60)

    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 4
    assert all(_gone(pid) for pid in started), [p for p in started if not _gone(p)]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone again
    assert "[fedsft] round 1/3" in (tmp_path / "r" / "flwr.log").read_text()


def test_a_superlink_that_starts_too_slowly_is_retried_and_logged(tmp_path, monkeypatch):
    """Flower's fixed 15 s SuperLink start limit on a busy machine: try again, log both."""
    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    marker = tmp_path / "failed-once"
    fake = _fake_flwr(tmp_path, (
        f'if [ ! -e {marker} ]; then touch {marker}; '
        'echo "Failed to start local SuperLink within 15s."; exit 1; fi\n'
        'echo "Successfully started run 1"\n'))
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(fake))

    result = runner.run_app({"output-dir": str(tmp_path), "run-name": "r"},
                            num_supernodes=1, quiet=True)

    assert result.returncode == 0
    headers = [line for line in result.log_path.read_text().splitlines()
               if line.startswith(runner.ATTEMPT_PREFIX)]
    assert len(headers) == 2


def test_other_failures_and_repeated_slow_starts_are_not_retried_forever(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(runner, "MACHINE_LOCK", tmp_path / "superlink.lock")
    monkeypatch.setattr(runner, "_wait_for_free_ports", lambda wait: None)
    slow = _fake_flwr(tmp_path, 'echo "Failed to start local SuperLink within 15s."; exit 1\n')
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(slow))
    result = runner.run_app({"output-dir": str(tmp_path), "run-name": "slow"},
                            num_supernodes=1, quiet=True)
    assert result.returncode == 1
    assert result.log_path.read_text().count(runner.ATTEMPT_PREFIX) == \
        runner.SUPERLINK_START_ATTEMPTS

    crash = _fake_flwr(tmp_path, 'echo "Successfully started run 1"; echo boom; exit 1\n')
    monkeypatch.setattr(runner.shutil, "which", lambda name: str(crash))
    result = runner.run_app({"output-dir": str(tmp_path), "run-name": "crash"},
                            num_supernodes=1, quiet=True)
    assert result.returncode == 1
    assert result.log_path.read_text().count(runner.ATTEMPT_PREFIX) == 1
