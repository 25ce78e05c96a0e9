"""Client-level differential privacy (DP-FedAvg): Flower's wrappers + an RDP accountant.

The noise and clipping are Flower's own strategy wrappers
(``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``). Flower 1.42's
accountant only covers fixed clipping without sampling amplification, so the privacy
spent is accounted here with Google's ``dp-accounting`` RDP accountant: each round is
a Poisson-subsampled Gaussian mechanism with sampling rate q = sampled / connected
clients and noise multiplier z (the standard DP-FedAvg analysis; Flower samples a
fixed-size subset, which the Poisson analysis approximates, as in McMahan et al. 2018).
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from flwr.serverapp import strategy as flwr_strategy

from common.config import RunConfig
from server.results import Privacy


def client_level_epsilon(
    *, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float
) -> float:
    """Epsilon after ``rounds`` Poisson-subsampled Gaussian releases, at ``delta``.

    ``noise_multiplier`` is the noise standard deviation divided by the clipping norm.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def max_rounds_within(
    *, target_epsilon: float, noise_multiplier: float, sampling_rate: float,
    delta: float, limit: int,
) -> int:
    """The most rounds (at most ``limit``) whose epsilon stays <= ``target_epsilon``."""
    if math.isinf(target_epsilon):
        return limit
    low, high = 0, limit  # epsilon grows with rounds: binary search the last round within
    while low < high:
        mid = (low + high + 1) // 2
        eps = client_level_epsilon(noise_multiplier=noise_multiplier,
                                   sampling_rate=sampling_rate, rounds=mid, delta=delta)
        if eps <= target_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def sampled_per_round(connected: int, fraction_train: float) -> int:
    """How many clients Flower's FedAvg samples per round (its own formula)."""
    return max(int(connected * fraction_train), 1)


def wrap_with_dp(
    strategy: flwr_strategy.Strategy, cfg: RunConfig, *, num_sampled: int
) -> flwr_strategy.Strategy:
    """``strategy`` inside the Flower DP wrapper that ``dp-clipping``/``dp-side`` name."""
    z, norm = cfg.dp_noise_multiplier, cfg.dp_clipping_norm
    server_side = cfg.dp_side == "server"
    # Fixed and adaptive wrappers name the norm differently (clipping_norm vs
    # initial_clipping_norm), so each pair is built by its own call.
    if cfg.dp_clipping == "fixed":
        if server_side:
            return flwr_strategy.DifferentialPrivacyServerSideFixedClipping(
                strategy, noise_multiplier=z, clipping_norm=norm,
                num_sampled_clients=num_sampled)
        return flwr_strategy.DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=z, clipping_norm=norm, num_sampled_clients=num_sampled)
    if server_side:
        return flwr_strategy.DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise_multiplier=z, num_sampled_clients=num_sampled,
            initial_clipping_norm=norm)
    return flwr_strategy.DifferentialPrivacyClientSideAdaptiveClipping(
        strategy, noise_multiplier=z, num_sampled_clients=num_sampled,
        initial_clipping_norm=norm)


class PrivacyReport:
    """Epsilon per completed round of one run, and the budget's last round."""

    def __init__(self, cfg: RunConfig, *, sampling_rate: float) -> None:
        self.cfg = cfg
        self.sampling_rate = sampling_rate

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds at ``dp-delta``."""
        return client_level_epsilon(
            noise_multiplier=self.cfg.dp_noise_multiplier, sampling_rate=self.sampling_rate,
            rounds=rounds, delta=self.cfg.dp_delta,
        )

    def rounds_within_budget(self, limit: int) -> int:
        """The last round (<= ``limit``) that keeps epsilon within ``dp-target-epsilon``."""
        return max_rounds_within(
            target_epsilon=self.cfg.dp_target_epsilon,
            noise_multiplier=self.cfg.dp_noise_multiplier,
            sampling_rate=self.sampling_rate, delta=self.cfg.dp_delta, limit=limit,
        )

    def row(self, rounds: int) -> Privacy:
        """The ``privacy`` part of a results row after ``rounds`` rounds."""
        return Privacy(
            epsilon=self.epsilon(rounds), delta=self.cfg.dp_delta,
            noise_multiplier=self.cfg.dp_noise_multiplier,
            clipping_norm=self.cfg.dp_clipping_norm, clipping=self.cfg.dp_clipping,
            side=self.cfg.dp_side, sampling_rate=self.sampling_rate,
            accountant="RDP, Poisson-subsampled Gaussian (dp-accounting)",
        )
