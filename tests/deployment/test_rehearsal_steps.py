"""The rehearsal's pure steps (no process started; tests/deployment/test_rehearsal.py
runs the whole rehearsal, e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployment.processes import ProcessError
from deployment.rehearsal import Site, SiteRefusal, distinct_port, running_sites


def test_a_port_already_taken_is_never_given_again():
    taken = {5000}
    picks = iter([5000, 5001, 5001, 5000, 5002])
    first = distinct_port(taken, picks.__next__)
    second = distinct_port(taken, picks.__next__)
    assert (first, second) == (5001, 5002) and taken == {5000, 5001, 5002}


def test_a_port_picker_that_only_gives_taken_ports_fails():
    with pytest.raises(ProcessError, match="no free port outside the 1 taken after 3 tries"):
        distinct_port({5000}, lambda: 5000, tries=3)


def test_the_sites_not_refused_run_and_none_running_is_an_error():
    sites = [Site("site-a", Path("a.csv")), Site("site-b", Path("b.csv"))]
    refused_b = SiteRefusal(site="site-b", returncode=2, reason="fedsft: error: bad file")
    refused_a = SiteRefusal(site="site-a", returncode=2, reason="fedsft: error: fingerprint")

    assert running_sites(sites, [refused_b]) == sites[:1]
    with pytest.raises(ProcessError, match="no site started") as error:
        running_sites(sites, [refused_a, refused_b])
    assert "site site-a refused" in str(error.value) and "bad file" in str(error.value)
    with pytest.raises(ProcessError, match="no sites were given"):
        running_sites([], [])


def test_the_fedsft_tool_is_replaced_never_rewritten_in_place(tmp_path):
    # Each site script started runs the tool; rewriting it in place while one execs it
    # fails that exec (ETXTBSY) and `sh` runs the next `fedsft` on the PATH instead.
    import os
    import subprocess

    from deployment.site_attacks import fedsft_on_path

    tool = fedsft_on_path(tmp_path) / "fedsft"
    first = tool.stat().st_ino
    assert fedsft_on_path(tmp_path) == tmp_path and tool.stat().st_ino == first  # kept
    tool.write_text("#!/bin/sh\nexit 3\n", encoding="utf-8")  # stale content
    fedsft_on_path(tmp_path)
    assert tool.stat().st_ino != first and os.access(tool, os.X_OK)  # a new file
    assert [p.name for p in tmp_path.iterdir()] == ["fedsft"]  # nothing left aside
    usage = subprocess.run([str(tool), "--help"], capture_output=True, text=True, check=True)
    assert "check-data" in usage.stdout  # this checkout's CLI


def test_a_restart_rehearsal_refuses_a_config_that_cannot_resume_before_starting(tmp_path):
    from common.config import ConfigError
    from deployment.rehearsal import rehearse

    (tmp_path / "a.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    with pytest.raises(ConfigError, match="fedsa keeps each site's B"):
        rehearse([Site("site-a", tmp_path / "a.csv")],
                 {"lora-aggregation": "fedsa", "output-dir": str(tmp_path / "out"),
                  "run-name": "r"}, work_dir=tmp_path / "work", restart=True)
    assert not (tmp_path / "work").exists()  # nothing was set up, nothing started
