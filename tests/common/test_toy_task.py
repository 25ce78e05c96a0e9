"""A task the project does not ship plugs into the task-agnostic machinery.

The toy task lives in this module and is registered only inside each test
(``common.tasks.task_registered``): the config's keys (its own, ``ToyOptions``, read and
checked with no change to ``RunConfig``), local training and the server's model selection
run on it unchanged. The toy implements the ``Task`` members
these pieces call (collate, loss) plus its own tiny data and model; the rest of the
protocol (data files, site checks, predict, model card) it does not need here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError, RunConfig
from common.specs import TrainSpec
from common.tasks import (
    MetricInfo,
    TaskInfo,
    get_task,
    key_owners,
    task_names,
    task_registered,
)
from common.tasks.classification_config import ClassificationOptions
from common.tasks.sft_config import SftOptions
from common.training import train_local
from server.model_selection import early_stop_reason, select_round
from server.recorder import progress_line
from server.results import Clients, ResultsRow

# A lower-is-better headline, so selection must read the direction from the registry.
TOY_INFO = TaskInfo(
    module=__name__,
    metrics=(MetricInfo("miss_rate", "miss rate", higher_is_better=False, short="miss"),
             MetricInfo("loss", "loss", higher_is_better=False, bounded=False)),
    default_model="toy-linear",
    options=f"{__name__}:ToyOptions",
)


@dataclass(frozen=True)
class ToyOptions:
    """The toy's own key, `toy-width` (a real task's record is in a light module of
    common/tasks/, its defaults repeated in pyproject.toml)."""

    toy_width: int = 4


def toy_config(**keys: Any) -> RunConfig:
    """A run config of Flower's dashed keys (``toy_width`` given as ``toy-width``)."""
    return RunConfig.from_flower({k.replace("_", "-"): v for k, v in keys.items()})


@dataclass(frozen=True)
class ToyExamples:
    """Feature vectors and their class (the parity of the first feature's sign)."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class ToyLossSpec:
    """No toy key shapes its loss."""


class ToyTask:
    """Binary classification of random vectors by a linear layer."""

    name = "toy"

    def examples(self, n: int, width: int, *, seed: int) -> ToyExamples:
        features = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
        return ToyExamples(features, (features[:, 0] > 0).long())

    def collate(self, examples: ToyExamples, index: list[int], pad_token_id: int
                ) -> dict[str, torch.Tensor]:
        return {"features": examples.features[index], "labels": examples.targets[index]}

    def eval_spec(self, cfg: RunConfig) -> None:
        return None

    def loss_spec(self, cfg: RunConfig) -> ToyLossSpec:
        return ToyLossSpec()

    def make_loss(self, examples: ToyExamples, *, spec: ToyLossSpec, ctx: Any) -> Any:
        def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(model(batch["features"]), batch["labels"])
        return loss


TASK = ToyTask()


@pytest.fixture
def toy() -> Iterator[ToyTask]:
    with task_registered("toy", TOY_INFO):
        yield get_task("toy")  # type: ignore[misc]


def test_the_registry_is_as_before_after_the_block():
    with task_registered("toy", TOY_INFO):
        assert task_names() == ("classification", "sft", "toy")
        assert key_owners()["toy_width"] == ("toy",)
        with pytest.raises(ValueError, match="already registered"), \
                task_registered("toy", TOY_INFO):
            pass
    assert task_names() == ("classification", "sft")
    assert "toy_width" not in key_owners()
    with pytest.raises(ConfigError, match="`task` must be one of classification, sft"):
        RunConfig(task="toy")


def test_a_task_without_a_loss_metric_is_refused():
    info = TaskInfo(module=__name__, default_model="x",
                    metrics=(MetricInfo("miss_rate", "miss rate", higher_is_better=False),))
    with pytest.raises(ValueError, match="must include loss"), task_registered("toy", info):
        pass


def test_the_config_reads_and_checks_the_toys_keys_from_the_registry(toy):
    cfg = toy_config(task="toy", toy_width=8, selection_metric="loss")
    assert (cfg.task_options, cfg.model_name) == (ToyOptions(toy_width=8), "toy-linear")
    assert cfg.to_flower()["toy-width"] == 8  # config.json holds it as a key of its own
    assert cfg.replace(toy_width=2).task_options == ToyOptions(toy_width=2)
    assert RunConfig(task="toy").task_options == ToyOptions()  # the defaults
    assert toy_config(task="toy").selection_metric_name == "miss_rate"  # its headline
    with pytest.raises(ConfigError, match=(
            r"`toy-width`: only for task toy, and this run has `task`='classification'; "
            r"remove the key or set `task`='toy'")):
        toy_config(toy_width=8)
    # another task's default: ignored (the run's own task's record holds the options)
    assert toy_config(toy_width=4).task_options == ClassificationOptions()
    with pytest.raises(ConfigError, match="`toy-width`: only for task toy"):
        RunConfig().replace(toy_width=8)
    with pytest.raises(ConfigError, match="`toy-width` must be an integer"):
        toy_config(task="toy", toy_width="wide")
    with pytest.raises(ConfigError, match="`skew-loss`: only for task classification"):
        toy_config(task="toy", skew_loss="logit-adjusted")
    with pytest.raises(ConfigError, match="`train-on`: only for task sft"):
        toy_config(task="toy", train_on="all")
    with pytest.raises(ConfigError, match=r"metric of task 'toy' \(miss_rate, loss\)"):
        toy_config(task="toy", selection_metric="accuracy")
    with pytest.raises(ConfigError, match="task toy's task_options must be a ToyOptions"):
        RunConfig(task="toy", task_options=SftOptions())


@dataclass(frozen=True)
class SharedOptions:
    """A toy that reads sft's `train-on` too."""

    train_on: str = "assistant"


def test_a_key_two_tasks_read_names_both():
    shared = TaskInfo(module=__name__, metrics=TOY_INFO.metrics, default_model="x",
                      options=f"{__name__}:SharedOptions")
    with task_registered("toy", shared):
        assert toy_config(task="toy", train_on="all").task_options.train_on == "all"
        with pytest.raises(ConfigError, match=(
                r"`train-on`: only for task sft or toy, .* set `task`='sft' or "
                r"`task`='toy'")):
            toy_config(train_on="all")


def test_local_training_runs_the_toys_collate_and_loss(toy):
    cfg = toy_config(task="toy", toy_width=3, batch_size=4, local_steps=2,
                     learning_rate=0.1, seed=0)
    width = cfg.task_options.toy_width
    model = torch.nn.Linear(width, 2)
    before = model.weight.detach().clone()
    data = toy.examples(10, width, seed=1)

    result = train_local(model, data, TrainSpec.of(cfg), task=toy, loss_spec=toy.loss_spec(cfg),
                         seed=5, device=torch.device("cpu"), pad_token_id=0)

    assert (result.steps, result.num_examples, result.examples_seen) == (2, 8, 8)
    assert result.tokens is None  # the toy's batches have no attention mask
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert not torch.equal(model.weight, before)


def _row(rnd: int, miss_rate: float) -> ResultsRow:
    return ResultsRow(round=rnd, central={"miss_rate": miss_rate, "loss": 1.0},
                      clients=Clients(sampled=2, aggregated=2 if rnd else 0))


def test_model_selection_follows_the_toys_headline_direction(toy):
    rows = [_row(0, 0.5), _row(1, 0.4), _row(2, 0.1), _row(3, 0.3)]

    selection = select_round(rows, rule="best", metric="miss_rate", split="central",
                             task="toy")

    assert selection is not None and (selection.rule, selection.round) == ("best", 2)
    assert selection.note.startswith("best eval miss rate 0.1000 at round 2 of 3")
    assert "the eval miss rate did not improve" in str(early_stop_reason(
        rows, patience=1, min_delta=0.0, metric="miss_rate", split="central",
        total_rounds=5, task="toy"))
    assert progress_line(rows[2], 5, metrics=TOY_INFO.metrics).startswith(
        "[fedsft] round 2/5  miss 0.1000  loss 1.0000")
