import numpy as np
import pytest
import torch

from client.attacks import (
    attacker_count,
    attacker_partition,
    is_attacker,
    poison_update,
)
from common.config import ConfigError, RunConfig
from common.tasks.classification import TASK, EncodedData

BASE = {"w": np.array([1.0, 1.0, 1.0], np.float32)}
NEW = {"w": np.array([1.5, 0.5, 1.0], np.float32)}


def test_attacker_share_is_seeded_and_exact():
    chosen = [p for p in range(20) if is_attacker(p, num_partitions=20, fraction=0.3, seed=1)]
    assert len(chosen) == 6
    assert chosen == [p for p in range(20)
                      if is_attacker(p, num_partitions=20, fraction=0.3, seed=1)]
    assert chosen != [p for p in range(20)
                      if is_attacker(p, num_partitions=20, fraction=0.3, seed=2)]


@pytest.mark.parametrize(
    "clients, fraction, expected",
    [(5, 0.1, 1), (5, 0.3, 2), (10, 0.25, 3), (10, 0.3, 3), (20, 0.3, 6), (7, 0.0, 0),
     (4, 1.0, 4)],
)
def test_attacker_count_is_the_nearest_whole_number_and_never_zero_when_asked(
        clients, fraction, expected):
    assert attacker_count(clients, fraction) == expected
    chosen = [p for p in range(clients)
              if is_attacker(p, num_partitions=clients, fraction=fraction, seed=3)]
    assert len(chosen) == expected


@pytest.mark.parametrize(
    "attack, scale, expected",
    [("sign-flip", 1.0, [0.5, 1.5, 1.0]), ("scale", 10.0, [6.0, -4.0, 1.0]),
     ("label-flip", 5.0, [1.5, 0.5, 1.0]), ("none", 5.0, [1.5, 0.5, 1.0])],
)
def test_poisoned_updates(attack, scale, expected):
    poisoned = poison_update(NEW, BASE, attack=attack, scale=scale, seed=0)
    np.testing.assert_allclose(poisoned["w"], expected)
    assert poisoned["w"].dtype == np.float32


def test_gaussian_and_nan_attacks():
    big = {"w": np.zeros(10000, np.float32)}
    noisy = poison_update(big, big, attack="gaussian", scale=2.0, seed=0)["w"]
    assert noisy.std() == pytest.approx(2.0, rel=0.05)
    assert np.isnan(poison_update(NEW, BASE, attack="nan", scale=1.0, seed=0)["w"]).all()


def test_label_flip_maps_k_to_last_minus_k():
    data = EncodedData(input_ids=[[1], [2], [3]], labels=torch.tensor([0, 1, 2]))
    flipped = TASK.flip_labels(data, num_classes=3)
    assert flipped.labels.tolist() == [2, 1, 0]
    assert flipped.input_ids == data.input_ids and data.labels.tolist() == [0, 1, 2]


def test_attacks_are_simulation_only_and_validated():
    with pytest.raises(ConfigError, match="simulation-only"):
        attacker_partition({"data-path": "/site.csv"})
    assert attacker_partition({"partition-id": 3, "num-partitions": 8}) == (3, 8)
    with pytest.raises(ConfigError, match="`attack-fraction` > 0"):
        RunConfig(attack="sign-flip")
    with pytest.raises(ConfigError, match="`attack` must be one of"):
        RunConfig(attack="backdoor", attack_fraction=0.1)
