"""Chat SFT: supervised instruction fine-tuning of a causal language model.

Rows are conversations (``messages``: a list of ``{role, content}``; Alpaca and
prompt/response tables are turned into one, ``common/tasks/sft_chat_data.py``). The tokenizer's
chat template renders each conversation; the loss is the next-token cross-entropy on
the assistant turns only (``train-on = assistant``; ``all`` trains on every token),
``common/tasks/sft_chat_encoding.py``. Evaluation reports the assistant-token loss and its
perplexity every round and, every ``generate-every`` rounds and after the last, greedy
generation on a fixed sample of the eval split scored by exact match and token F1
against the reference answer (the last assistant turn).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.config import RunConfig
from common.data import DataError, read_rows
from common.model import autocast_context
from common.specs import DataSpec, EncodeSpec
from common.tasks.base import Batch, EvalContext, LossFn, Task, TrainContext
from common.tasks.duplicates import normalize_text, repeats
from common.tasks.sft_builtin_data import generate_sft
from common.tasks.sft_chat_data import (
    chat_frame,
    check_conversation,
    conversations_from_frame,
    detect_format,
)
from common.tasks.sft_chat_encoding import (
    IGNORE_INDEX,
    EncodedChat,
    EncodeStats,
    collate_chat,
    encode_conversations,
    exact_match,
    prompt_for_generation,
    split_for_generation,
    token_f1,
)
from common.tasks.sft_config import SftOptions

log = logging.getLogger(__name__)
_EVAL_BATCH = 8  # logits are (batch, tokens, vocabulary): keep evaluation batches small


@dataclass(frozen=True)
class SftLossSpec:
    """The SFT keys that shape the local loss (``SftTask.loss_spec``): none. The loss is
    the mean next-token cross-entropy over the trained tokens, whatever the config;
    which tokens are trained (``train-on``) is fixed when the examples are encoded."""


@dataclass(frozen=True)
class SftEvalSpec:
    """The SFT keys that shape evaluation (``SftTask.eval_spec``)."""

    generate_every: int
    generation_samples: int
    max_new_tokens: int
    max_length: int


@dataclass(frozen=True)
class ChatExamples:
    """Tokenized conversations (``examples``) and, for generation, the conversations."""

    examples: list[EncodedChat]
    conversations: list[list[dict[str, str]]]  # the kept ones, in the same order
    stats: EncodeStats | None = None
    chat_template: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.examples)


def options_of(spec: DataSpec | EncodeSpec) -> SftOptions:
    """The sft keys a spec carries (its ``task_options``; their defaults when it has none)."""
    options = spec.task_options
    return options if isinstance(options, SftOptions) else SftOptions()


def chat_columns(spec: DataSpec) -> dict[str, str]:
    """The column names and system prompt of ``spec`` as ``sft_chat_data`` takes them."""
    o = options_of(spec)
    return {
        "messages_column": o.messages_column, "instruction_column": o.instruction_column,
        "input_column": o.input_column, "output_column": o.output_column,
        "prompt_column": o.prompt_column, "response_column": o.response_column,
        "system_prompt": o.system_prompt,
    }


def template_of(spec: EncodeSpec) -> str | None:
    """``chat-template``: a Jinja string, or the contents of a ``.jinja`` file; None: the
    tokenizer's own."""
    return load_template(options_of(spec).chat_template)


def load_template(chat_template: str) -> str | None:
    """A ``chat-template`` value: a Jinja string, or the contents of a ``.jinja`` file;
    None when empty."""
    text = chat_template.strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if text.endswith(".jinja"):
        if not path.is_file():
            raise DataError(f"`chat-template` file not found: {text}")
        return path.read_text(encoding="utf-8")
    return chat_template


@dataclass(frozen=True)
class SftSiteReport:
    """A deployed site's SFT file as checked before it trains (counts only, no text).

    ``conversations``: rows read; ``refused``: rows training would refuse (a
    ``common.tasks.sft_chat_data`` rule, ``problems`` quotes the first ``_SHOWN_PROBLEMS``
    messages), of which ``no_assistant`` have no assistant turn at all (a ``messages``
    list without a non-blank assistant message, a missing or blank output / response).
    Token counts need the run's tokenizer: without one (``measured`` False) ``kept``
    is the readable conversations and the token fields are 0. With one, ``kept`` /
    ``truncated`` / ``dropped`` are as the run encodes them (``max-length``,
    ``overflow``) and ``median_tokens`` / ``p90_tokens`` / ``max_tokens`` describe
    each readable conversation's full rendered length, before any truncation.

    Duplicates are counted over the readable conversations, as the classification check
    counts texts (``common.tasks.duplicates``): ``exact_duplicates`` repeat an earlier
    conversation message for message (roles and contents as read),
    ``normalized_duplicates`` (which include them) do so once each content is
    normalized. ``eval_rows`` (the readable conversations of the eval file) and
    ``eval_overlap`` (those whose normalized conversation is also in the site's file)
    are None without an eval file.
    """

    source: str
    conversations: int
    kept: int
    truncated: int
    dropped: int
    median_tokens: float
    max_tokens: int
    max_length: int
    refused: int = 0
    no_assistant: int = 0
    problems: tuple[str, ...] = ()
    p90_tokens: float = 0.0
    measured: bool = True
    exact_duplicates: int = 0
    normalized_duplicates: int = 0
    eval_rows: int | None = None
    eval_overlap: int | None = None

    @property
    def no_assistant_share(self) -> float:
        """Share of the rows read that have no assistant turn."""
        return self.no_assistant / self.conversations if self.conversations else 0.0

    @property
    def readable(self) -> int:
        """The rows read as a conversation (read, less refused)."""
        return self.conversations - self.refused

    @property
    def duplicate_share(self) -> float:
        """Share of the readable conversations that repeat an earlier one (normalized)."""
        return self.normalized_duplicates / self.readable if self.readable else 0.0

    @property
    def blocking(self) -> tuple[Any, ...]:
        found = []
        if self.refused:
            # Training refuses the whole file on its first such row (common/tasks/sft_chat_data.py).
            found.append(_Finding(
                f"{self.refused} of {self.conversations} rows cannot be read as a "
                f"conversation ({self.no_assistant} without an assistant turn, "
                f"{self.no_assistant_share:.1%} of the rows); first: "
                + "; ".join(self.problems)))
        if self.kept == 0 and not self.refused:
            found.append(_Finding(f"no conversation fits `max-length` {self.max_length} "
                                  "with a trained token left"))
        return tuple(found)

    @property
    def warnings(self) -> tuple[Any, ...]:
        found = []
        if self.truncated or self.dropped:
            found.append(_Finding(
                f"{self.truncated + self.dropped} of {self.conversations} conversations "
                f"are longer than `max-length` {self.max_length}: {self.truncated} "
                f"truncated, {self.dropped} dropped"))
        if self.normalized_duplicates:
            found.append(_Finding(
                f"{self.normalized_duplicates} duplicate conversations "
                f"({self.exact_duplicates} exact, {self.duplicate_share:.1%} of the "
                "readable ones): duplicates weigh those conversations more in training"))
        if self.eval_overlap:
            found.append(_Finding(
                f"{self.eval_overlap} of {self.eval_rows} eval conversations are also in "
                "the data (normalized): evaluation on them overstates the model"))
        return tuple(found)

    def aggregate_stats(self) -> dict[str, int | float]:
        return {"data-rows": self.kept, "data-truncated": self.truncated,
                "data-dropped": self.dropped, "data-median-tokens": self.median_tokens}

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (``fedsft check-data --task sft --json``)."""
        return {
            "source": self.source, "conversations": self.conversations,
            "refused": self.refused, "no-assistant": self.no_assistant,
            "no-assistant-share": self.no_assistant_share, "problems": list(self.problems),
            "kept": self.kept, "truncated": self.truncated, "dropped": self.dropped,
            "max-length": self.max_length, "tokens-measured": self.measured,
            "median-tokens": self.median_tokens, "p90-tokens": self.p90_tokens,
            "max-tokens": self.max_tokens,
            "exact-duplicates": self.exact_duplicates,
            "normalized-duplicates": self.normalized_duplicates,
            "duplicate-share": self.duplicate_share,
            "eval-rows": self.eval_rows, "eval-overlap": self.eval_overlap,
            "findings": [{"severity": severity, "message": f.message}
                         for severity, group in (("blocking", self.blocking),
                                                 ("warning", self.warnings)) for f in group],
            "blocking": bool(self.blocking),
        }

    def lines(self) -> list[str]:
        """The report for a person: one line per statistic, then the findings."""
        lines = [
            f"site data (sft): {self.source}",
            f"  rows read: {self.conversations}",
            f"  rows refused: {self.refused} ({self.no_assistant} without an assistant "
            f"turn: {self.no_assistant_share:.1%})",
            f"  exact duplicate conversations: {self.exact_duplicates}",
            f"  normalized duplicate conversations (case, whitespace, end punctuation): "
            f"{self.normalized_duplicates} ({self.duplicate_share:.1%})",
        ]
        if self.eval_rows is not None:
            lines.append(f"  eval conversations also in the data (normalized): "
                         f"{self.eval_overlap} of {self.eval_rows}")
        if self.measured:
            lines += [
                f"  tokens per conversation (chat template applied): median "
                f"{self.median_tokens:g}, 90th percentile {self.p90_tokens:g}, max "
                f"{self.max_tokens}",
                f"  longer than max-length {self.max_length}: {self.truncated} truncated, "
                f"{self.dropped} dropped; {self.kept} conversations kept",
            ]
        else:
            lines.append("  tokens per conversation: not counted (give --model, the run's "
                         "model, for the token lengths and the max-length check)")
        for mark, group in (("BLOCKING", self.blocking), ("WARNING", self.warnings)):
            lines += [f"{mark}: {finding.message}" for finding in group]
        if self.blocking:
            lines.append(f"result: {len(self.blocking)} blocking problem(s): this data "
                         "cannot join the federation as it is")
        else:
            lines.append(f"result: no blocking problem, {len(self.warnings)} warning(s)")
        return lines


@dataclass(frozen=True)
class _Finding:
    message: str


_SHOWN_PROBLEMS = 3  # refused rows quoted in the report


def scan_conversations(
    frame: pd.DataFrame, *, source: str, spec: DataSpec
) -> tuple[list[list[dict[str, str]]], list[str], int]:
    """Every row of ``frame`` read as a conversation, not only up to the first bad one.

    Returns the readable conversations, the messages of the refused rows (the 1-based
    row of ``frame`` named, as ``common.tasks.sft_chat_data`` words them) and how many refused
    rows have no assistant turn. Raises ``DataError`` for a problem of the file, not
    of a row (no chat columns, a column the format needs is missing).
    """
    columns, options = chat_columns(spec), options_of(spec)
    try:
        return conversations_from_frame(frame, source=source, fmt=options.chat_format,
                                        **columns), [], 0
    except DataError:
        pass  # at least one row is refused: look at each
    fmt = options.chat_format
    if fmt == "auto":
        fmt = detect_format(
            list(frame.columns), source=source, messages_column=options.messages_column,
            instruction_column=options.instruction_column,
            output_column=options.output_column, prompt_column=options.prompt_column,
            response_column=options.response_column)
    kept: list[list[dict[str, str]]] = []
    problems: list[str] = []
    no_assistant = 0
    first_row = f"{source}: row 1"  # how an error of a one-row frame names its row
    for number in range(1, len(frame) + 1):
        one = frame.iloc[number - 1:number]
        try:
            kept += conversations_from_frame(one, source=source, fmt=fmt, **columns)
        except DataError as error:
            text = str(error)
            if not text.startswith(first_row):
                raise  # a problem of the file (a missing column): no row to name
            problems.append(f"{source}: row {number}{text[len(first_row):]}")
            no_assistant += _lacks_answer(one.iloc[0], fmt=fmt, spec=spec)
    return kept, problems, no_assistant


def exact_conversation(
    conversation: Sequence[Mapping[str, str]],
) -> tuple[tuple[str, str], ...]:
    """A conversation as compared for exact duplicates: (role, content) as read."""
    return tuple((m["role"], m["content"]) for m in conversation)


def normalized_conversation(
    conversation: Sequence[Mapping[str, str]],
) -> tuple[tuple[str, str], ...]:
    """A conversation as compared for normalized duplicates: (role, normalized content),
    ``common.tasks.duplicates.normalize_text``."""
    return tuple((m["role"], normalize_text(m["content"])) for m in conversation)


def _lacks_answer(row: pd.Series, *, fmt: str, spec: DataSpec) -> bool:
    """Whether a row has no assistant turn at all (no non-blank answer)."""
    import json

    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    options = options_of(spec)
    if fmt == "alpaca":
        return not text(row.get(options.output_column))
    if fmt == "prompt-response":
        return not text(row.get(options.response_column))
    messages = row.get(options.messages_column)
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return False  # undecodable: another problem, counted as refused only
    if isinstance(messages, np.ndarray):
        messages = list(messages)
    if not isinstance(messages, list | tuple):
        return False
    return not any(isinstance(m, Mapping) and m.get("role") == "assistant"
                   and text(m.get("content")) for m in messages)


class SftTask:
    """The ``Task`` of chat SFT (see ``common/tasks/base.py``)."""

    name = "sft"
    peft_task_type = "CAUSAL_LM"
    columns: tuple[str, ...] = ("messages",)  # the protocol's types: see classification
    # LoRA on every attention projection the model has (Llama, Mistral, Qwen, SmolLM).
    lora_targets: tuple[str, ...] | None = ("q_proj", "k_proj", "v_proj", "o_proj")
    read_as_text = True
    architecture_suffix = "ForCausalLM"
    card_pipeline_tag = "text-generation"
    card_noun = "chat model"

    def card_usage(self, settings: Mapping[str, Any]) -> list[str]:
        """Greedy chat generation with the run's system prompt and answer length, or
        ``fedsft predict`` on a prompts file."""
        system = settings.get("system-prompt") or ""
        turns = ([f"    {{'role': 'system', 'content': {system!r}}},"] if system else [])
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "tokenizer = AutoTokenizer.from_pretrained('PATH/TO/THIS/FOLDER')",
            "model = AutoModelForCausalLM.from_pretrained('PATH/TO/THIS/FOLDER')",
            "messages = [",
            *turns,
            "    {'role': 'user', 'content': 'Your instruction here'},",
            "]",
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
            "                                       return_tensors='pt')",
            "output = model.generate(inputs, max_new_tokens="
            f"{settings.get('max-new-tokens') or 48}, do_sample=False)",
            "print(tokenizer.decode(output[0, inputs.shape[1]:], skip_special_tokens=True))",
            "```", "",
            "or `fedsft predict PATH/TO/THIS/FOLDER prompts.jsonl --output answers.jsonl` "
            "(the same greedy generation, one answer per prompt).", "",
        ]

    def builtin_rows(self, num_examples: int, *, seed: int, spec: DataSpec) -> pd.DataFrame:
        return generate_sft(num_examples, seed)

    def prepare(
        self, frame: pd.DataFrame, *, source: str, spec: DataSpec,
        label_names: Sequence[str] | None,
    ) -> tuple[pd.DataFrame, list[str]]:
        return chat_frame(frame, source=source, fmt=options_of(spec).chat_format,
                          **chat_columns(spec)), []

    def check_label_names(self, names: Sequence[str], *, source: str) -> None:
        """Nothing to check: sft has no classes."""

    def label_names_of_files(
        self, files: Sequence[tuple[str, DataSpec]], *, source: str
    ) -> list[str]:
        return []  # no classes

    def check_site(
        self, path: str, *, spec: DataSpec, encoding: EncodeSpec,
        label_names: Sequence[str] | None, tokenizer: PreTrainedTokenizerBase | None,
        eval_path: str | None = None,
    ) -> SftSiteReport:
        """Every row read as a conversation (``scan_conversations``: each refused row
        counted, refused rows are blocking) and, with the run's ``tokenizer``, encoded as
        the run will (its chat template, ``train-on`` and ``overflow``); no conversation
        left is blocking. ``tokenizer`` None: no token counts (``fedsft check-data``
        without ``--model``). Duplicates, and with ``eval_path`` (read with the same
        columns) its conversations also in the file, are counted over the readable
        conversations (``SftSiteReport``): warnings. ``label_names`` is not used: no
        classes."""
        frame = read_rows(path, spec)
        kept, problems, no_assistant = scan_conversations(frame, source=path, spec=spec)
        normalized = [normalized_conversation(c) for c in kept]
        eval_rows = eval_overlap = None
        if eval_path is not None:
            eval_kept, _, _ = scan_conversations(read_rows(eval_path, spec), source=eval_path,
                                                 spec=spec)
            seen = set(normalized)
            eval_rows = len(eval_kept)
            eval_overlap = sum(normalized_conversation(c) in seen for c in eval_kept)
        report = SftSiteReport(
            source=path, conversations=len(frame), kept=len(kept), truncated=0, dropped=0,
            median_tokens=0.0, max_tokens=0, max_length=encoding.max_length,
            refused=len(problems), no_assistant=no_assistant,
            problems=tuple(problems[:_SHOWN_PROBLEMS]), measured=tokenizer is not None,
            exact_duplicates=repeats(exact_conversation(c) for c in kept),
            normalized_duplicates=repeats(normalized), eval_rows=eval_rows,
            eval_overlap=eval_overlap)
        if tokenizer is None or not kept:
            return report
        rows = {"messages": kept}
        examples = self.encode(rows, tokenizer, spec=encoding)
        # The full lengths: the same rendering with room for every token.
        whole = self.encode(rows, tokenizer, spec=dataclasses.replace(
            encoding, max_length=10**9, task_options=dataclasses.replace(
                options_of(encoding), overflow="truncate")))
        lengths = [len(e.input_ids) for e in whole.examples] or [0]
        stats = examples.stats
        assert stats is not None
        return dataclasses.replace(
            report, kept=len(examples), truncated=stats.truncated, dropped=stats.dropped,
            median_tokens=float(np.median(lengths)),
            p90_tokens=float(np.percentile(lengths, 90)), max_tokens=max(lengths))

    def partition_report(
        self, rows: Any, *, source: str, encoding: EncodeSpec, label_names: Sequence[str],
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        return None  # no statistics of a simulated partition's conversations are shared

    def check_model_folder(self, folder: Path, *, options: Any) -> str | None:
        """A causal LM (config.json ``architectures`` ``*ForCausalLM``) with a chat
        template (its tokenizer's, or ``chat-template``)."""
        import json

        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"{folder / 'config.json'} cannot be read: {error}"
        architectures = [str(a) for a in config.get("architectures") or []]
        if not any(a.endswith("ForCausalLM") for a in architectures):
            return (f"task sft needs a causal language model (config.json architectures "
                    f"*ForCausalLM), but {folder} is {', '.join(architectures) or 'unnamed'}: "
                    "use model=smollm2 or another chat model")
        configured = options.chat_template if isinstance(options, SftOptions) else ""
        if configured.strip() or (folder / "chat_template.jinja").is_file():
            return None
        try:
            tokenizer_config = json.loads(
                (folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tokenizer_config = {}
        if not tokenizer_config.get("chat_template"):
            return (f"the tokenizer of {folder} has no chat template: set `chat-template` to "
                    "a Jinja template (or a .jinja file), or use a chat/instruct model")
        return None

    def load_model(
        self, path: str, *, label_names: Sequence[str], seed: int
    ) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(path)
        except ValueError as error:  # e.g. an encoder-only config (BERT) has no LM head
            raise OSError(f"not a causal language model ({error})") from error

    def load_trained(self, path: str) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)

    def encode(
        self, rows: Any, tokenizer: PreTrainedTokenizerBase, *, spec: EncodeSpec
    ) -> ChatExamples:
        conversations = [check_conversation(list(m), where=f"row {i + 1}")
                         for i, m in enumerate(rows["messages"])]
        template, options = template_of(spec), options_of(spec)
        if template and not tokenizer.chat_template:
            # The configured template becomes the tokenizer's: the exported model then
            # carries it, and generation renders prompts as training did.
            tokenizer.chat_template = template
        examples, stats = encode_conversations(
            tokenizer, conversations, max_length=spec.max_length, train_on=options.train_on,
            overflow=options.overflow, chat_template=template)
        if stats.truncated or stats.dropped:
            log.warning("%d of %d conversations are longer than max-length %d: %d truncated, "
                        "%d dropped (overflow=%s)", stats.truncated + stats.dropped,
                        stats.total, spec.max_length, stats.truncated, stats.dropped,
                        options.overflow)
        return ChatExamples(examples=examples,
                            conversations=[conversations[i] for i in stats.kept],
                            stats=stats, chat_template=template)

    def collate(self, examples: Any, index: list[int], pad_token_id: int) -> Batch:
        return collate_chat(examples.examples, index, _pad(pad_token_id))

    def eval_spec(self, cfg: RunConfig) -> SftEvalSpec:
        options: SftOptions = cfg.task_options
        return SftEvalSpec(generate_every=options.generate_every,
                           generation_samples=options.generation_samples,
                           max_new_tokens=options.max_new_tokens, max_length=cfg.max_length)

    def loss_spec(self, cfg: RunConfig) -> SftLossSpec:
        return SftLossSpec()

    def make_loss(self, examples: Any, *, spec: SftLossSpec, ctx: TrainContext) -> LossFn:
        def assistant_token_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            # Mean next-token cross-entropy over the trained (label != -100) tokens.
            return _token_losses(model, batch).sum() / _trained(batch).clamp(min=1)
        return assistant_token_loss

    def site_metrics(self, examples: Any, *, spec: SftLossSpec,
                     ctx: TrainContext | None = None) -> dict[str, int | float]:
        return {}  # no SFT key asks a site for statistics

    def round_feedback(self, spec: SftLossSpec) -> None:
        return None  # no SFT key needs the federation's view of the sites' data

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
        examples: Any, ctx: EvalContext,
    ) -> dict[str, float]:
        """Assistant-token loss and perplexity; exact match and token F1 when due.

        Generation is due in round 0, every ``generate-every`` rounds and in the final
        round (``ctx.final``), on the first ``generation-samples`` examples (the eval
        split's order is seeded, so the sample is fixed across rounds).
        """
        if len(examples) == 0:
            raise ValueError("cannot evaluate on an empty data set")
        model.eval()
        loss_sum, tokens = 0.0, 0
        index = list(range(len(examples)))
        with torch.inference_mode():
            for start in range(0, len(index), _EVAL_BATCH):
                batch = {k: t.to(ctx.device) for k, t in self.collate(
                    examples, index[start:start + _EVAL_BATCH], _pad(tokenizer.pad_token_id)
                ).items()}
                with autocast_context(ctx.precision, ctx.device):
                    loss_sum += float(_token_losses(model, batch).sum())
                tokens += int(_trained(batch))
        loss = loss_sum / max(tokens, 1)
        metrics: dict[str, float] = {
            "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "num_examples": len(examples),
        }
        # No spec given: the keys' defaults.
        spec = ctx.spec if ctx.spec is not None else self.eval_spec(RunConfig(task="sft"))
        if _generation_due(spec, ctx):
            sample = examples.conversations[: spec.generation_samples]
            prompts, references = zip(*(split_for_generation(c) for c in sample), strict=True)
            answers = generate_answers(
                model, tokenizer, list(prompts), chat_template=examples.chat_template,
                max_length=spec.max_length, max_new_tokens=spec.max_new_tokens,
                device=ctx.device, batch_size=_EVAL_BATCH)
            metrics["exact_match"] = float(np.mean(
                [exact_match(a, r) for a, r in zip(answers, references, strict=True)]))
            metrics["token_f1"] = float(np.mean(
                [token_f1(a, r) for a, r in zip(answers, references, strict=True)]))
        return metrics

    def predict_inputs(
        self, frame: pd.DataFrame, *, column: str | None, settings: Mapping[str, Any],
        source: str,
    ) -> list[list[dict[str, str]]]:
        """Each row's conversation to answer (see ``prompts_from_frame``)."""
        return prompts_from_frame(frame, column=column, source=source,
                                  system_prompt=str(settings.get("system-prompt") or ""))

    def predict(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
        inputs: Sequence[Any], *, settings: Mapping[str, Any], max_length: int,
        batch_size: int, device: torch.device,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """The greedy answer to each prompt conversation."""
        return generate_answers(
            model, tokenizer, inputs, chat_template=None, max_length=max_length,
            max_new_tokens=int(settings.get("max-new-tokens") or 48), device=device,
            batch_size=batch_size, progress=progress)


def prompts_from_frame(frame: pd.DataFrame, *, column: str | None, source: str,
                       system_prompt: str = "") -> list[list[dict[str, str]]]:
    """Each row as the conversation to answer: a ``messages`` list (a trailing answer is
    dropped), else the ``column`` / ``prompt`` / ``instruction`` (+ ``input``) text as the
    user turn. Raises ``DataError`` naming the row when a row holds no prompt."""
    import json

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompts = []
    for number, row in enumerate(frame.to_dict("records"), start=1):
        where = f"{source}: row {number}"
        messages = row.get("messages")
        # A JSON Lines file mixing formats gives the other rows a missing (NaN) cell.
        if column is None and isinstance(messages, (list, str, np.ndarray)):
            if isinstance(messages, np.ndarray):
                messages = list(messages)
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: `messages` is not valid JSON: {error}") from error
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{where}: `messages` must be a non-empty list of "
                                "{role, content} objects")
            turns = [{"role": str(m.get("role")), "content": str(m.get("content"))}
                     for m in messages if isinstance(m, dict)]
            if turns and turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if not turns or turns[-1]["role"] != "user":
                raise DataError(f"{where}: the conversation must end with a user message")
            has_system = turns[0]["role"] == "system"
            prompts.append(turns if has_system else system + turns)
            continue
        name = column or next((c for c in ("prompt", "instruction", "text") if c in row), None)
        if name is None or not isinstance(row.get(name), str) or not row[name].strip():
            raise DataError(f"{where}: no prompt: give a `messages`, `prompt`, `instruction` "
                            "or `text` column (or --text-column)")
        text = row[name]
        extra = row.get("input") if name == "instruction" else None
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra}"
        prompts.append(system + [{"role": "user", "content": text}])
    return prompts


def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict[str, str]]], *, chat_template: str | None, max_length: int,
    max_new_tokens: int, device: torch.device, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` (left-padded batches; special tokens stripped)."""
    pad = _pad(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
               else tokenizer.eos_token_id)
    eos = _stop_tokens(tokenizer)
    answers: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_for_generation(tokenizer, p, chat_template=chat_template,
                                     max_length=max_length)
               for p in prompts[start:start + batch_size]]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, prompt in enumerate(ids):  # left padding: generation continues the end
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt):] = 1
        with torch.inference_mode():
            output = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device), attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                eos_token_id=eos)
        for row in output[:, width:].tolist():
            answers.append(str(tokenizer.decode(row, skip_special_tokens=True)).strip())
        if progress is not None:
            progress(len(ids))
    return answers


def _token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy of the trained tokens, per example."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The labels are shifted, not the logits (as transformers' own causal-LM loss does):
    # position t predicts label t+1, and the last position gets IGNORE_INDEX. Slicing
    # the logits instead would copy the whole (batch, length, vocabulary) tensor to
    # flatten it (about a third of the loss's time on a CPU); with fp32 logits this
    # reshape is a view (half-precision ones are copied by ``.float()`` either way), and
    # the softmax still runs over contiguous memory.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                             targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape).sum(dim=1)


def _trained(batch: Batch) -> torch.Tensor:
    """How many tokens of the batch the loss is on (labels shifted like the logits)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _generation_due(spec: SftEvalSpec, ctx: EvalContext) -> bool:
    every = spec.generate_every
    return ctx.final or ctx.server_round == 0 or (every > 0 and ctx.server_round % every == 0)


def _stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End of sequence and, for ChatML templates, the end-of-turn token."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end >= 0:
        stops.append(turn_end)
    return sorted(set(stops))


def _pad(pad_token_id: int | None) -> int:
    return 0 if pad_token_id is None else int(pad_token_id)


TASK: Task = SftTask()  # mypy checks it against the protocol
