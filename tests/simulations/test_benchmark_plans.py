"""Pure parts of the benchmark plans (the smoke test runs the benchmarks themselves)."""

from simulations.benchmarks.robustness import infeasible, num_malicious, setting_name


def test_byzantine_settings_a_strategy_cannot_aggregate_are_reported_not_run():
    # Bulyan needs n >= 4f + 3, Krum n >= 2f + 3 replies.
    assert "needs n >= 4f+3 = 7" in infeasible("bulyan", sampled=5, malicious=1)
    assert infeasible("bulyan", sampled=7, malicious=1) is None
    assert infeasible("bulyan", sampled=20, malicious=6) == (
        "not applicable (needs n >= 4f+3 = 27, n = 20)")
    assert "needs n >= 2f+3 = 7" in infeasible("krum", sampled=6, malicious=2)
    assert infeasible("krum", sampled=5, malicious=0) is None
    assert infeasible("fedmedian", sampled=3, malicious=2) is None


def test_setting_names_have_no_dots():
    assert setting_name("none", 0.0) == "no-attack"
    assert setting_name("sign-flip", 0.2) == "sign-flip-20pct"
    assert setting_name("scale", 0.3) == "scale-30pct"


def test_only_krum_and_bulyan_are_told_the_number_of_attackers():
    assert num_malicious("krum", 4) == 4 and num_malicious("bulyan", 2) == 2
    assert num_malicious("fedmedian", 4) == 0 and num_malicious("fedavg", 3) == 0
