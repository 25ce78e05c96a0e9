"""The task interface: everything that depends on *what* is fine-tuned.

A task (sequence classification, chat SFT of a causal LM, ...) is one module in
``common/tasks/`` with one object that satisfies ``Task``. It owns which model class is
loaded and how its head is set up, how cleaned rows become encoded examples, the collate
function, the training loss, the evaluation metrics and the predict step. The federated
machinery (config, exchanged state, strategies, encodings, secure aggregation, DP,
validation, resume, outputs) only ever calls these methods and never imports a task
module: it gets the task object from ``common.tasks.get_task(cfg.task)``.

Tasks are stateless singletons; everything a call needs comes in as arguments, so a
task object may be shared by every virtual client of a worker process.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.config import RunConfig
from common.specs import DataSpec, EncodeSpec

# One training batch as tensors (input_ids, attention_mask, labels, ...), the output of
# ``Task.collate``.
Batch = dict[str, torch.Tensor]
# The loss of one batch under the model: a scalar tensor, mean over the batch's examples.
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class Examples(Protocol):
    """A task's encoded examples (token ids and targets), indexable by position."""

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class EvalContext:
    """What an evaluation call may need besides the model and the examples."""

    batch_size: int
    device: torch.device
    precision: str  # the `precision` key: autocast choice
    server_round: int = 0  # a task may do expensive metrics only every N rounds
    final: bool = False  # the last round: expensive metrics always run
    # The task's own evaluation keys (``Task.eval_spec``); None: the task's defaults.
    spec: Any = None


@dataclass(frozen=True)
class TrainContext:
    """What a local training call hands the task's loss besides the examples and spec."""

    # The call's seed (``derive_seed(run seed, round, client)``): a task's own randomness
    # (e.g. augmentation) derives from it, so it is reproducible per round and site.
    seed: int = 0
    # The round config the server sent (e.g. the federation's label counts); {} outside
    # a federated round.
    round_config: Mapping[str, Any] = field(default_factory=dict)


class RoundFeedback(Protocol):
    """Site aggregates in training replies -> entries of the next rounds' config.

    A task returns one from ``Task.round_feedback`` when the run needs the federation's
    view of something the sites measure (e.g. the summed label counts of
    ``class-weighting-source`` global). The server's strategy holds it for the run:
    after each round it hands over the metrics of every training reply that is not an
    error (``collect``),
    and every later round's config carries ``config_entries()``. It keeps its own state,
    in memory only: after a resume it starts empty again.

    With ``secure-aggregation`` the replies carry no such metric in plaintext: the
    server asks for the integer statistics named by ``summed_keys`` (keys of the sites'
    ``Task.site_metrics``, non-negative ints), each client masks them after its weight,
    and after the round the feedback gets only their sum over the round's surviving
    sampled sites (``collect_sum``), never one site's values; ``collect`` is not called.
    """

    def collect(self, site: str, metrics: Mapping[str, Any]) -> None:
        """Take what ``site``'s training reply ``metrics`` carry (a newer reply of the
        same site replaces its older values)."""
        ...

    def summed_keys(self, round_config: Mapping[str, Any]) -> tuple[str, ...]:
        """The site metrics to sum securely in a round with ``round_config`` (its config
        before the secure-aggregation entries, e.g. with ``label-names``); () for none.
        Every site must report each of them as a non-negative int, or it refuses."""
        ...

    def collect_sum(self, sums: Mapping[str, int]) -> None:
        """Take a round's secure sums of ``summed_keys`` (key -> total over the round's
        surviving sites); called only for a round whose unmasking succeeded."""
        ...

    def config_entries(self) -> dict[str, Any]:
        """The entries to add to the next round's config ({} while nothing is known)."""
        ...


class SiteFinding(Protocol):
    """One problem a site check found; ``message`` says what it is and what to do."""

    @property
    def message(self) -> str: ...


class SiteReport(Protocol):
    """A task's check of one site's data (``Task.check_site``): counts only, no text.

    The client trains only when ``blocking`` is empty (it logs ``warnings``) and may
    send ``aggregate_stats`` to the server; ``fedsft check-data`` prints ``lines`` and
    writes ``to_dict`` as JSON.
    """

    @property
    def blocking(self) -> Sequence[SiteFinding]:
        """The problems that stop the site from joining."""
        ...

    @property
    def warnings(self) -> Sequence[SiteFinding]:
        """The problems worth a look that do not stop training."""
        ...

    def aggregate_stats(self) -> dict[str, int | float]:
        """Aggregate, non-identifying numbers (flat metric keys) a site may share."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        ...

    def lines(self) -> list[str]:
        """The report for a person: one line per statistic, then the findings."""
        ...


class Task(Protocol):
    """What a task module provides (see the module docstring)."""

    name: str  # the `task` config value
    peft_task_type: str  # peft's TaskType name for LoRA: "SEQ_CLS", "CAUSAL_LM"
    columns: tuple[str, ...]  # the canonical columns of ``prepare``'s rows
    # LoRA targets when `lora-target-modules` is empty (those the model has); None: peft's
    # per-architecture default.
    lora_targets: tuple[str, ...] | None
    read_as_text: bool  # read every CSV/TSV cell as a string (answers like "42" stay text)
    architecture_suffix: str  # what config.json `architectures` of its models end with
    card_pipeline_tag: str  # the exported model card's Hugging Face `pipeline_tag`
    card_noun: str  # what the card's title calls the model ("text classifier")

    def builtin_rows(self, num_examples: int, *, seed: int, spec: DataSpec) -> pd.DataFrame:
        """The task's seeded, offline built-in data (``dataset = "builtin"``), raw."""
        ...

    def prepare(
        self, frame: pd.DataFrame, *, source: str, spec: DataSpec,
        label_names: Sequence[str] | None,
    ) -> tuple[pd.DataFrame, list[str]]:
        """A raw table (as read from a file) as the task's canonical rows.

        Validates and cleans (raising ``common.data.DataError`` naming ``source``, the
        column and what is allowed) and returns the canonical columns first (e.g.
        ``text``/``label``, or ``messages``) followed by the other columns, with the
        class names: derived from this table when ``label_names`` is None (the training
        data), else ``label_names`` (eval and site data: other labels are refused).
        A task without classes returns [].
        """
        ...

    def check_label_names(self, names: Sequence[str], *, source: str) -> None:
        """Check class names given rather than read from data (the ``labels`` key, named
        ``source``) as names derived from data are checked (e.g. a logged warning)."""
        ...

    def label_names_of_files(
        self, files: Sequence[tuple[str, DataSpec]], *, source: str
    ) -> list[str]:
        """The class names over the rows of every ``(path, spec)`` file, each read and
        cleaned with its own spec as training reads it, as ``prepare`` derives them for
        the training data (``source`` names them all in an error); [] for a task
        without classes. Raises ``common.data.DataError``."""
        ...

    def check_site(
        self, path: str, *, spec: DataSpec, encoding: EncodeSpec,
        label_names: Sequence[str] | None, tokenizer: PreTrainedTokenizerBase | None,
        eval_path: str | None = None,
    ) -> SiteReport:
        """A deployed site's file checked before it trains (``fedsft check-data`` too).

        ``label_names``: the federation's classes (None: none to check against);
        ``eval_path``: an eval file whose overlap with the site's rows is reported, by a
        task that can tell (ignored by one that cannot).
        """
        ...

    def partition_report(
        self, rows: Any, *, source: str, encoding: EncodeSpec, label_names: Sequence[str],
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> SiteReport | None:
        """The site check's statistics of a simulated partition (canonical ``rows`` of
        ``prepare``, a ``datasets.Dataset``, named ``source``), for the data statistics
        it shares; None for a task that reports none for partitions."""
        ...

    def check_model_folder(self, folder: Path, *, options: Any) -> str | None:
        """What makes a local model folder unusable for this task (from its config and
        tokenizer files, no weights loaded), or None; ``options``: the run's
        ``RunConfig.task_options`` (sft: a configured chat template). Used by the
        preflight."""
        ...

    def load_model(
        self, path: str, *, label_names: Sequence[str], seed: int
    ) -> PreTrainedModel:
        """The pretrained model of this task from ``path``, with its head set up.

        Called right after ``torch.manual_seed(seed)``: a fresh head is seeded.
        """
        ...

    def load_trained(self, path: str) -> PreTrainedModel:
        """A model this task trained and exported (``final/``, an export), for predict."""
        ...

    def encode(
        self, rows: Any, tokenizer: PreTrainedTokenizerBase, *, spec: EncodeSpec
    ) -> Examples:
        """Canonical rows (a ``datasets.Dataset`` from ``prepare``) as encoded examples."""
        ...

    def collate(self, examples: Examples, index: list[int], pad_token_id: int) -> Batch:
        """The examples at ``index`` as one right-padded batch (0 rows for [])."""
        ...

    def loss_spec(self, cfg: RunConfig) -> Hashable:
        """The task's own keys that shape its loss, ``site_metrics`` and
        ``round_feedback``: a frozen dataclass of the task's, filled from ``cfg`` (e.g.
        from its options record, ``cfg.task_options``); equal for configs that differ
        only in keys it does not own. What ``make_loss`` and the two others take as
        ``spec``."""
        ...

    def eval_spec(self, cfg: RunConfig) -> Hashable:
        """The task's own keys that shape ``evaluate`` (e.g. how often to generate), as a
        frozen dataclass of the task's; what ``EvalContext.spec`` carries."""
        ...

    def make_loss(self, examples: Examples, *, spec: Any, ctx: TrainContext) -> LossFn:
        """The local training loss for this site's ``examples`` (e.g. with its prior),
        as the task's ``spec`` (``loss_spec``) asks.

        Called once per local training call; the loss runs under the caller's autocast,
        on training batches only (a task may transform the batch first, e.g. augment).
        """
        ...

    def site_metrics(self, examples: Examples, *, spec: Any,
                     ctx: TrainContext | None = None) -> dict[str, int | float]:
        """Aggregate statistics of the training ``examples`` the training reply carries
        because the run asks for them (e.g. label counts); {} when it asks for none.

        ``ctx.round_config`` is the round's config (e.g. ``label-names``: a count per
        class, also of classes the site has no row of). With secure aggregation they do
        not travel in plaintext: the ones the round's ``RoundFeedback.summed_keys`` name
        are masked into the update's sum, the others stay at the site."""
        ...

    def round_feedback(self, spec: Any) -> RoundFeedback | None:
        """What the server collects from the training replies and sends back in the next
        rounds' config (``RoundFeedback``), or None when the run needs nothing of it."""
        ...

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
        examples: Examples, ctx: EvalContext,
    ) -> dict[str, float]:
        """Metrics of ``model`` on ``examples``: always ``loss`` and ``num_examples``."""
        ...

    def predict_inputs(
        self, frame: pd.DataFrame, *, column: str | None, settings: Mapping[str, Any],
        source: str,
    ) -> list[Any]:
        """The model inputs of each row of a predict file, checked before any model loads.

        ``column`` is the input column the user named (None: the task's default);
        ``settings`` the export's ``fedsft.json`` (the run's keys). Raises
        ``common.data.DataError`` naming ``source`` (and the row) for unusable input.
        """
        ...

    def predict(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
        inputs: Sequence[Any], *, settings: Mapping[str, Any], max_length: int,
        batch_size: int, device: torch.device,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """One output string per input (a class name, a generated answer)."""
        ...

    def card_usage(self, settings: Mapping[str, Any]) -> list[str]:
        """The exported model card's "Use" section: markdown lines ending in a blank one.

        ``settings`` is the export's summary (the run's keys, e.g. ``max-new-tokens``).
        """
        ...


class ClassTask(Task, Protocol):
    """A task whose rows have classes (``TaskInfo.has_classes``) also provides this."""

    def flip_labels(self, examples: Examples, *, num_classes: int) -> Examples:
        """The same ``examples`` with every class label k replaced by
        num_classes - 1 - k (the simulation's ``label-flip`` attack, which
        ``RunConfig`` refuses for a task without classes)."""
        ...
