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
