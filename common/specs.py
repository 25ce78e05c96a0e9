"""Frozen specs: the parts of the run config that a component depends on.

A component takes the spec it needs, not the whole ``RunConfig``. The per-process
caches (the model in ``common/model.py``, the splits in ``common/data.py``, the
tokenized site data in ``client/local_data.py``) are keyed by these specs as a whole: a
spec holds *every* config field that changes what it builds, so adding a field to a
spec is the only step needed to key the caches by it. Local training takes a
``TrainSpec`` (with DP-SGD also a ``DPSGDSpec``) and the task's own loss spec
(``Task.loss_spec``).

Each spec's fields are named exactly like the ``RunConfig`` fields they copy and are
filled by name (``spec_from_config``). ``tests/common/test_specs.py`` checks that every
``RunConfig`` field is in a spec (these, or a task's loss spec) or listed as in none,
so a new config field cannot be forgotten: whoever adds one decides where it goes. A
task's own keys (``RunConfig.task_options``, its ``TaskInfo.options`` record) travel as one
field of the model, data and encode specs, so a new one keys every cache, unless the
record holds loss keys only (``TaskInfo.options_shape_data`` False: classification's),
which the task's loss spec reads and which must not split the caches. Only
``ModelSpec``, ``DataSpec``, ``PartitionSpec`` and ``EncodeSpec`` key caches; a field
that changes a cached object belongs in one of those, not in ``TrainSpec``,
``DPSGDSpec`` or a loss spec (which are rebuilt every round).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.config import RunConfig, _column_partition
from common.tasks import task_info

T = TypeVar("T")


def spec_from_config(cls: type[T], cfg: RunConfig, **extra: Any) -> T:
    """An instance of the spec dataclass ``cls`` with its fields copied from ``cfg``.

    Fields not in ``RunConfig`` come from ``extra`` (e.g. the resolved model path). A
    ``task_options`` field gets the run's options record only when it shapes the cached
    objects (``TaskInfo.options_shape_data``), else None.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {name: getattr(cfg, name) for name in names - extra.keys()}
    if "task_options" in values and not task_info(cfg.task).options_shape_data:
        values["task_options"] = None
    return cls(**values, **extra)


def file_stamp(source: str) -> tuple[int, int] | None:
    """Modification time and size of a data file, so an edited file is read again."""
    path = Path(source).expanduser()
    if not source or source == "builtin" or source.startswith("hf:") or not path.is_file():
        return None
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that changes the built model (before any exchanged state is set)."""

    task: str
    model_path: str  # resolved by common.model_source.resolve_model
    method: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str
    lora_aggregation: str
    freeze_layers: int
    gradient_checkpointing: bool
    # The task's own keys (RunConfig.task_options; sft: encoding installs a configured
    # chat template in the cached tokenizer, so a model built for another template must
    # not be shared). The whole record keys each cache: a task's keys are few.
    task_options: Any
    seed: int
    label_names: tuple[str, ...]

    @classmethod
    def of(cls, cfg: RunConfig, label_names: list[str] | tuple[str, ...]) -> ModelSpec:
        from common.model_source import resolve_model  # no torch import

        return spec_from_config(cls, cfg, model_path=resolve_model(cfg.model_name).path,
                                label_names=tuple(label_names))

    @property
    def target_modules(self) -> list[str] | None:
        """``lora-target-modules`` as a list; None lets peft pick per architecture."""
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return names or None


@dataclass(frozen=True)
class DataSpec:
    """Everything that changes the server's splits (``common.data.load_splits``)."""

    task: str
    dataset: str
    eval_dataset: str
    text_column: str
    label_column: str
    label_case_fold: bool
    eval_fraction: float
    validation_fraction: float
    builtin_examples: int
    seed: int
    # The task's own keys (sft: which columns hold the conversations, the system turn added)
    task_options: Any
    # The files' versions: an edited file is read again by a long-lived process.
    dataset_stamp: tuple[int, int] | None
    eval_dataset_stamp: tuple[int, int] | None

    @classmethod
    def of(cls, cfg: RunConfig) -> DataSpec:
        return spec_from_config(cls, cfg, dataset_stamp=file_stamp(cfg.dataset),
                                eval_dataset_stamp=file_stamp(cfg.eval_dataset))


@dataclass(frozen=True)
class PartitionSpec:
    """Everything that changes how the training split is shared among the clients."""

    partitioner: str
    dirichlet_alpha: float
    classes_per_client: int
    client_eval_fraction: float
    seed: int

    @classmethod
    def of(cls, cfg: RunConfig) -> PartitionSpec:
        return spec_from_config(cls, cfg)

    @property
    def partition_column(self) -> str | None:
        """The column of a ``column:<name>`` partitioner, else None."""
        return _column_partition(self.partitioner)


@dataclass(frozen=True)
class EncodeSpec:
    """Everything that changes how rows become token ids (with the tokenizer's path)."""

    task: str
    max_length: int
    tokenizer_path: str
    # The task's own keys (sft: the template applied, the tokens trained on, what happens
    # to long ones)
    task_options: Any

    @classmethod
    def of(cls, cfg: RunConfig, tokenizer_path: str) -> EncodeSpec:
        return spec_from_config(cls, cfg, tokenizer_path=tokenizer_path)


@dataclass(frozen=True)
class TrainSpec:
    """The local optimizer, schedule, precision and step count of ``train_local``."""

    batch_size: int
    local_steps: int  # > 0: exactly that many steps, else local_epochs passes
    local_epochs: int
    learning_rate: float
    weight_decay: float
    local_optimizer: str  # adamw | sgd
    adam_epsilon: float  # AdamW's eps
    warmup_ratio: float
    grad_clip: float  # 0: off
    precision: str

    @classmethod
    def of(cls, cfg: RunConfig) -> TrainSpec:
        return spec_from_config(cls, cfg)

    def steps(self, num_examples: int) -> int:
        """Optimizer steps of one local training call on ``num_examples`` examples:
        ``local_steps`` when > 0, else ``local_epochs`` passes of whole batches."""
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * math.ceil(num_examples / self.batch_size)


@dataclass(frozen=True)
class DPSGDSpec:
    """Sample-level DP-SGD in a client (``common/dp_sgd.py``), with the rounds its
    budget is planned over."""

    dp_sgd_noise_multiplier: float  # > 0: used as set; 0: calibrated to the target
    dp_sgd_max_grad_norm: float
    dp_sgd_delta: float
    dp_sgd_target_epsilon: float  # inf: no budget
    num_server_rounds: int

    @classmethod
    def of(cls, cfg: RunConfig) -> DPSGDSpec:
        return spec_from_config(cls, cfg)
