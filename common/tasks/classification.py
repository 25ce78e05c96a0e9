"""Sequence classification: a text in, one class out (the task fedsft started with).

The model is ``AutoModelForSequenceClassification`` with a fresh, seeded head for the
federation's classes; rows are ``text`` / ``label`` (the label rules of
``classification_data.py``: stripped, optionally case-folded, integer ids into the sorted
class names); the loss is cross-entropy (or the logit-adjusted loss of
``classification_losses.py`` with the site's own class prior), optionally class-weighted
(``class-weighting``, from the site's or the federation's label counts) and focal
(``focal-gamma``), on training batches optionally augmented at the token level
(``augment``); metrics are accuracy, macro-F1, the mean loss, and per-class recall
(``recall_<k>`` for each class with eval examples, ``recall_min`` the worst of them) as
extra details.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, recall_score
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.config import RunConfig
from common.data import DataError
from common.model import autocast_context
from common.specs import DataSpec, EncodeSpec
from common.tasks.base import Batch, ClassTask, EvalContext, LossFn, TrainContext
from common.tasks.classification_builtin_data import generate_builtin
from common.tasks.classification_check import DataReport, check_site, check_site_data
from common.tasks.classification_config import options_of, resolved_skew_loss
from common.tasks.classification_data import (
    build_label_names,
    check_columns,
    clean_table,
    encode_labels,
    read_table,
    warn_case_variants,
)
from common.tasks.classification_losses import (
    LABEL_COUNTS_KEY,
    augment_token_ids,
    class_log_prior,
    class_weights,
    focal_cross_entropy,
    label_count_metrics,
    read_label_counts,
    sum_label_counts,
)
from common.training import derive_seed, iterate_batches


@dataclass(frozen=True)
class ClassificationLossSpec:
    """The classification keys that shape the local loss, the site's label-count
    metrics and the federation's label-count feedback (``ClassificationTask.loss_spec``)."""

    skew_loss: str  # resolved: none or logit-adjusted (``resolved_skew_loss``)
    skew_loss_tau: float
    class_weighting: str
    class_weighting_source: str
    class_weighting_beta: float
    focal_gamma: float
    augment: str
    augment_rate: float

    @property
    def global_counts(self) -> bool:
        """Classes are weighted by the federation's label counts (sent each round)."""
        return self.class_weighting != "none" and self.class_weighting_source == "global"


@dataclass(frozen=True)
class EncodedData:
    """Token ids (truncated, unpadded) and int64 labels of a set of examples."""

    input_ids: list[list[int]]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} examples but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
) -> EncodedData:
    """Tokenize ``texts`` once, in one batched call, truncating to ``max_length`` tokens.

    Padding is left to ``collate`` (to the longest sequence of each batch).

    Raises
    ------
    ValueError
        If ``texts`` and ``labels`` differ in length.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    # A fast tokenizer fails on an empty batch (e.g. `client-eval-fraction` 0: no eval rows).
    input_ids = tokenizer(list(texts), truncation=True,
                          max_length=max_length)["input_ids"] if len(texts) else []
    return EncodedData(
        input_ids=[list(ids) for ids in input_ids],
        labels=torch.tensor(list(labels), dtype=torch.int64),
    )


def collate(data: EncodedData, index: list[int], pad_token_id: int) -> Batch:
    """The examples ``index`` of ``data`` as one batch, right-padded to the longest.

    ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``labels``; an empty
    ``index`` gives tensors with 0 rows.
    """
    rows = [data.input_ids[i] for i in index]
    width = max((len(row) for row in rows), default=1)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[r, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": data.labels[index]}


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class ClassificationTask:
    """The ``Task`` of sequence classification (see ``common/tasks/base.py``)."""

    name = "classification"
    peft_task_type = "SEQ_CLS"  # peft then also trains (and exchanges) the head
    # The protocol's types (a protocol attribute is invariant: tuple[str, str] or None
    # alone would not satisfy ``Task``).
    columns: tuple[str, ...] = ("text", "label")
    lora_targets: tuple[str, ...] | None = None  # peft's per architecture (BERT: query, value)
    read_as_text = False
    architecture_suffix = "ForSequenceClassification"
    card_pipeline_tag = "text-classification"
    card_noun = "text classifier"

    def card_usage(self, settings: Mapping[str, Any]) -> list[str]:
        """A transformers pipeline, or ``fedsft predict`` on a table."""
        return [
            "```python",
            "from transformers import pipeline",
            "classify = pipeline('text-classification', model='PATH/TO/THIS/FOLDER')",
            "```", "",
            "or `fedsft predict PATH/TO/THIS/FOLDER data.csv --output predictions.csv`.", "",
        ]

    def builtin_rows(self, num_examples: int, *, seed: int, spec: DataSpec) -> pd.DataFrame:
        return generate_builtin(num_examples, seed=seed).rename(
            columns={"text": spec.text_column, "label": spec.label_column})

    def prepare(
        self, frame: pd.DataFrame, *, source: str, spec: DataSpec,
        label_names: Sequence[str] | None,
    ) -> tuple[pd.DataFrame, list[str]]:
        text, label = spec.text_column, spec.label_column
        check_columns(frame, source=source, text_column=text, label_column=label)
        frame = clean_table(frame, source=source, text_column=text, label_column=label,
                            label_case_fold=spec.label_case_fold)
        names = (build_label_names(frame[label], source=source)
                 if label_names is None else list(label_names))
        labels = encode_labels(frame[label], names, source=source)
        others = [c for c in frame.columns if c not in (text, label, "text", "label")]
        rows = pd.concat(
            [pd.DataFrame({"text": frame[text], "label": labels}), frame[others]], axis=1)
        return rows, names

    def check_label_names(self, names: Sequence[str], *, source: str) -> None:
        """Log names that differ only by case, as ``build_label_names`` does."""
        warn_case_variants(names, source=source)

    def label_names_of_files(
        self, files: Sequence[tuple[str, DataSpec]], *, source: str
    ) -> list[str]:
        found: list[Any] = []
        for path, spec in files:
            frame = read_table(path, text_column=spec.text_column,
                               label_column=spec.label_column, seed=spec.seed,
                               builtin_examples=spec.builtin_examples,
                               label_case_fold=spec.label_case_fold)
            found.extend(frame[spec.label_column])
        return build_label_names(found, source=source)

    def check_site(
        self, path: str, *, spec: DataSpec, encoding: EncodeSpec,
        label_names: Sequence[str] | None, tokenizer: PreTrainedTokenizerBase | None,
        eval_path: str | None = None,
    ) -> DataReport:
        """``classification_check.check_site``: ``check_site_data`` of the file with the
        run's columns and label rule."""
        return check_site(path, spec=spec, encoding=encoding, label_names=label_names,
                          tokenizer=tokenizer, eval_path=eval_path)

    def partition_report(
        self, rows: Any, *, source: str, encoding: EncodeSpec, label_names: Sequence[str],
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> DataReport:
        """``check_site_data`` of the partition's ``text`` and ``label`` (an index into
        ``label_names``) columns."""
        frame = pd.DataFrame({"text": list(rows["text"]), "label": list(rows["label"])})
        # Labels as their index, so the counts come back in the federation's class order.
        return check_site_data(frame, text_column="text", label_column="label",
                               max_length=encoding.max_length, tokenizer=tokenizer,
                               label_names=[str(i) for i in range(len(label_names))],
                               source=source)

    def check_model_folder(self, folder: Path, *, options: Any) -> str | None:
        return None  # any encoder or decoder gets a fresh classification head

    def load_model(
        self, path: str, *, label_names: Sequence[str], seed: int
    ) -> PreTrainedModel:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            # A checkpoint that already has a head for another number of classes gets a
            # fresh (seeded by the caller) head instead of an error.
            ignore_mismatched_sizes=True,
        )

    def load_trained(self, path: str) -> PreTrainedModel:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(path)

    def encode(
        self, rows: Any, tokenizer: PreTrainedTokenizerBase, *, spec: EncodeSpec
    ) -> EncodedData:
        return encode(rows["text"], rows["label"], tokenizer, max_length=spec.max_length)

    def collate(self, examples: Any, index: list[int], pad_token_id: int) -> Batch:
        return collate(examples, index, pad_token_id)

    def eval_spec(self, cfg: RunConfig) -> None:
        return None  # no classification key changes how a model is evaluated

    def loss_spec(self, cfg: RunConfig) -> ClassificationLossSpec:
        options = options_of(cfg)
        return ClassificationLossSpec(**{**asdict(options), "skew_loss": resolved_skew_loss(cfg)})

    def make_loss(
        self, examples: Any, *, spec: ClassificationLossSpec, ctx: TrainContext
    ) -> LossFn:
        """Cross-entropy, with the options of the run's keys applied in this order.

        ``augment``: the batch's token ids are augmented first (``augment_token_ids``,
        its generator seeded per (call seed, step): per run seed, round, site and step);
        ``skew-loss``: the logits are shifted by the site's log prior;
        ``class-weighting``: each example's term is weighted by its class's weight, from
        the site's counts or (``class-weighting-source`` global) the federation's counts
        in the round config (``label-counts``; absent in round 1: the site's counts);
        ``focal-gamma``: focal loss. Plain ``F.cross_entropy`` when none is set.
        """
        plain = (spec.skew_loss == "none" and spec.class_weighting == "none"
                 and spec.focal_gamma == 0 and spec.augment == "none")
        if plain:
            def cross_entropy(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                return F.cross_entropy(_logits(model, batch).float(), batch["labels"])
            return cross_entropy
        # Built on the first batch: the number of classes is the head's width.
        prior: list[torch.Tensor] = []
        weight: list[torch.Tensor | None] = []
        steps = [0]

        def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            if spec.augment != "none":
                generator = torch.Generator().manual_seed(
                    derive_seed(ctx.seed, "augment", steps[0]))
                steps[0] += 1
                ids, mask = augment_token_ids(
                    batch["input_ids"], batch["attention_mask"], mode=spec.augment,
                    rate=spec.augment_rate, generator=generator, pad_token_id=_pad_of(model))
                batch = {**batch, "input_ids": ids, "attention_mask": mask}
            logits = _logits(model, batch).float()
            num_classes = logits.shape[-1]
            if not weight:
                prior.append(class_log_prior(examples.labels, num_classes))
                weight.append(None if spec.class_weighting == "none" else class_weights(
                    _weighting_counts(examples, spec, ctx, num_classes), spec.class_weighting,
                    beta=spec.class_weighting_beta))
            if spec.skew_loss != "none":
                logits = logits + spec.skew_loss_tau * prior[0].to(logits.device)
            return focal_cross_entropy(logits, batch["labels"], gamma=spec.focal_gamma,
                                       class_weight=weight[0])
        return loss

    def flip_labels(self, examples: Any, *, num_classes: int) -> EncodedData:
        """``examples`` with every label k replaced by num_classes - 1 - k."""
        return replace(examples, labels=(num_classes - 1) - examples.labels)

    def site_metrics(self, examples: Any, *, spec: ClassificationLossSpec,
                     ctx: TrainContext | None = None) -> dict[str, int | float]:
        """The site's label counts (``label-count-<k>``) when the run weights classes by
        the federation's counts (``class-weighting-source`` global), else nothing."""
        if not spec.global_counts:
            return {}
        # Every class of the round's label names (the secure sum asks for each one);
        # without them, the classes the labels reach (the server pads with zeros).
        return dict(label_count_metrics(_site_counts(examples, _num_classes(ctx))))

    def round_feedback(self, spec: ClassificationLossSpec) -> FederationLabelCounts | None:
        """The federation's label counts when the run weights classes by them
        (``class-weighting-source`` global), else None."""
        if not spec.global_counts:
            return None
        return FederationLabelCounts()

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
        examples: Any, ctx: EvalContext,
    ) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of ``model`` (already on ``ctx.device``).

        Macro-F1 averages over every class of the model (``model.config.num_labels``),
        counting a class with no true and no predicted example as 0.

        Raises
        ------
        ValueError
            If ``examples`` is empty (callers skip empty evaluation sets).
        """
        if len(examples) == 0:
            raise ValueError("cannot evaluate on an empty data set")
        config: Any = model.config  # a PretrainedConfig (typed as a Module attribute)
        num_labels = int(config.num_labels)
        model.eval()
        loss_sum = 0.0
        predictions: list[torch.Tensor] = []
        with torch.inference_mode():
            for batch in _batches(self, examples, ctx.batch_size, tokenizer):
                batch = {name: tensor.to(ctx.device) for name, tensor in batch.items()}
                with autocast_context(ctx.precision, ctx.device):
                    logits = _logits(model, batch)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                predictions.append(logits.argmax(dim=-1).cpu())
        predicted = torch.cat(predictions).numpy()
        labels = examples.labels.numpy()
        return {
            "accuracy": float(np.mean(predicted == labels)),
            "f1_macro": float(f1_score(labels, predicted, average="macro",
                                       labels=list(range(num_labels)), zero_division=0)),
            "loss": loss_sum / len(examples),
            "num_examples": len(examples),
            **per_class_recall(labels, predicted),
        }

    def predict_inputs(
        self, frame: pd.DataFrame, *, column: str | None, settings: Mapping[str, Any],
        source: str,
    ) -> list[str]:
        """The texts of ``column`` (default: the run's ``text-column``)."""
        name = column or str(settings.get("text-column") or "text")
        if name not in frame.columns:
            found = ", ".join(map(repr, map(str, frame.columns)))
            raise DataError(f"{source}: missing text column {name!r}; columns found: {found}")
        return ["" if pd.isna(text) else str(text) for text in frame[name]]

    def predict(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
        inputs: Sequence[Any], *, settings: Mapping[str, Any], max_length: int,
        batch_size: int, device: torch.device,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """The predicted class name (``id2label``) of each text."""
        config: Any = model.config  # a PretrainedConfig (typed as a Module attribute)
        id2label = {int(k): str(v) for k, v in config.id2label.items()}
        data = encode(list(inputs), [0] * len(inputs), tokenizer, max_length=max_length)
        predicted: list[int] = []
        model.eval()
        with torch.inference_mode():
            for batch in _batches(self, data, batch_size, tokenizer):
                logits = _logits(model, {k: t.to(device) for k, t in batch.items()})
                predicted.extend(logits.float().argmax(dim=-1).tolist())
                if progress is not None:
                    progress(len(batch["input_ids"]))
        return [id2label[i] for i in predicted]


class FederationLabelCounts:
    """The ``RoundFeedback`` of ``class-weighting-source`` global.

    Collects the label counts each site put in its training reply (``label-count-<k>``,
    ``site_metrics``; a reply without well-formed counts changes nothing) and sends their
    sum, over the latest counts of every site that has replied, as ``label-counts`` in
    the next rounds' config (``_weighting_counts`` reads it at the sites). Round 1, and
    the first round after a resume (the counts live in memory only), have none yet: the
    sites then weight by their own counts.

    With secure aggregation the server sees no site's counts: each round sums
    ``label-count-0..K-1`` (K: the round's ``label-names``) inside the masked vector
    and ``collect_sum`` keeps that total, the pooled counts of the round's surviving
    sampled sites (with ``fraction-train`` < 1 a sample of the federation; the class
    weights depend only on the proportions). The latest round's sum is what is sent.
    """

    def __init__(self) -> None:
        self._latest: dict[str, list[int]] = {}  # site -> its latest label counts
        self._secure: list[int] | None = None  # the latest round's secure sum

    def collect(self, site: str, metrics: Mapping[str, Any]) -> None:
        counts = read_label_counts(metrics)
        if counts is not None:
            self._latest[site] = counts

    def summed_keys(self, round_config: Mapping[str, Any]) -> tuple[str, ...]:
        names = round_config.get("label-names") or []
        return tuple(label_count_metrics([0] * len(names)))

    def collect_sum(self, sums: Mapping[str, int]) -> None:
        counts = read_label_counts(sums)
        if counts is not None and sum(counts) > 0:  # no example at all weights nothing
            self._secure = counts

    def counts(self) -> list[int] | None:
        """The federation's label counts: the latest secure sum (secure aggregation),
        else the sum of each site's latest counts; None while nothing is known."""
        if self._secure is not None:
            return list(self._secure)
        if not self._latest:
            return None
        return sum_label_counts(self._latest[site] for site in sorted(self._latest))

    def config_entries(self) -> dict[str, Any]:
        counts = self.counts()
        return {} if counts is None else {LABEL_COUNTS_KEY: counts}


def per_class_recall(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """``recall_<k>`` for each class k that has examples in ``labels``, and
    ``recall_min``, the worst of them (a class without examples has no recall)."""
    present = sorted(int(k) for k in np.unique(labels))
    recalls = recall_score(labels, predicted, labels=present, average=None, zero_division=0)
    out = {f"recall_{k}": float(r) for k, r in zip(present, recalls, strict=True)}
    return {"recall_min": min(out.values()), **out}


def _num_classes(ctx: TrainContext | None) -> int:
    """The number of the round's label names (0 when there is no round config)."""
    return len(ctx.round_config.get("label-names") or []) if ctx is not None else 0


def _site_counts(examples: Any, num_classes: int) -> list[int]:
    return torch.bincount(examples.labels.reshape(-1).long(), minlength=num_classes).tolist()


def _weighting_counts(examples: Any, spec: ClassificationLossSpec, ctx: TrainContext,
                      num_classes: int) -> list[int]:
    """The label counts the class weights come from (see ``make_loss``)."""
    if spec.class_weighting_source == "global" and LABEL_COUNTS_KEY in ctx.round_config:
        counts = [int(c) for c in ctx.round_config[LABEL_COUNTS_KEY]]
        if len(counts) > num_classes:
            raise ValueError(
                f"the server sent {len(counts)} label counts ({LABEL_COUNTS_KEY!r}) for a "
                f"model with {num_classes} classes")
        return counts + [0] * (num_classes - len(counts))
    return _site_counts(examples, num_classes)


def _pad_of(model: torch.nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding id (0 for a tokenizer without one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _batches(task: ClassificationTask, examples: Any, batch_size: int,
             tokenizer: PreTrainedTokenizerBase) -> Iterator[Batch]:
    return iterate_batches(examples, task.collate, batch_size=batch_size,
                           pad_token_id=pad_id(tokenizer), generator=None)


TASK: ClassTask = ClassificationTask()  # mypy checks it against the protocol
