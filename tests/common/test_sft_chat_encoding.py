"""Tests for common/tasks/sft_chat_encoding.py: label masks by hand, templates, overflow, metrics.

The tiny tokenizer makes one token of every ASCII character and of every special token,
so token positions can be counted on the rendered text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from common.tasks.sft_chat_encoding import (
    IGNORE_INDEX,
    ChatTemplateError,
    EncodedChat,
    collate_chat,
    encode_conversation,
    encode_conversations,
    exact_match,
    prompt_for_generation,
    render_pieces,
    split_for_generation,
    token_f1,
)
from tests.helpers import tiny_chat_tokenizer, write_tiny_llama

TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Ok?"},
    {"role": "assistant", "content": "No."},
]
# SmolLM2-135M-Instruct's template: a default system message when there is none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_chat_tokenizer()


def trained_text(tokenizer: PreTrainedTokenizerFast, example: EncodedChat) -> str:
    """The trained tokens of ``example`` decoded, special tokens kept."""
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_exactly_the_assistant_answers_and_their_end_tokens_are_trained_on(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    # <|im_start|> user \n H i <|im_end|> \n        -> positions  0..9   (10 tokens)
    # <|im_start|> assistant \n                    -> positions 10..20  (11)
    # Y o <|im_end|>                               -> positions 21..23  trained
    # \n                                           -> position  24
    # <|im_start|> user \n O k ? <|im_end|> \n     -> positions 25..35  (11)
    # <|im_start|> assistant \n                    -> positions 36..46  (11)
    # N o . <|im_end|>                             -> positions 47..50  trained
    # \n                                           -> position  51
    example = encode_conversation(tokenizer, TWO_TURNS, max_length=100)

    assert example is not None
    assert len(example.input_ids) == 52
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert trained == [21, 22, 23, 47, 48, 49, 50]
    assert all(example.labels[i] == example.input_ids[i] for i in trained)  # unshifted
    assert example.input_ids[23] == example.input_ids[50] == tokenizer.eos_token_id
    assert trained_text(tokenizer, example) == "Yo<|im_end|>No.<|im_end|>"
    assert example.num_trained == 7 and not example.truncated


def test_input_ids_are_the_tokenized_full_render(tokenizer: PreTrainedTokenizerFast) -> None:
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)

    example = encode_conversation(tokenizer, TWO_TURNS, max_length=100)
    pieces = render_pieces(tokenizer, TWO_TURNS)

    assert example is not None
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(piece for piece, _ in pieces) == text
    assert [piece for piece, trained in pieces if trained] == ["Yo<|im_end|>",
                                                              "No.<|im_end|>"]


def test_a_template_injected_system_message_and_a_given_one_are_masked(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    with_system = [{"role": "system", "content": "Be brief."}, *TWO_TURNS[:2]]

    injected = encode_conversation(tokenizer, TWO_TURNS[:2], max_length=200,
                                   chat_template=SMOLLM2_TEMPLATE)
    given = encode_conversation(tokenizer, with_system, max_length=200)

    assert injected is not None and given is not None
    assert "SmolLM" in tokenizer.decode(injected.input_ids)
    assert trained_text(tokenizer, injected) == "Yo<|im_end|>"
    assert trained_text(tokenizer, given) == "Yo<|im_end|>"


def test_train_on_all_labels_every_token(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_conversation(tokenizer, TWO_TURNS, max_length=100, train_on="all")

    assert example is not None
    assert example.labels == example.input_ids


def test_a_template_without_a_generation_prompt_masks_up_to_the_content(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"

    example = encode_conversation(tokenizer, TWO_TURNS, max_length=100, chat_template=plain)

    assert example is not None
    assert trained_text(tokenizer, example) == "YoNo."  # no end token in this template


def test_no_chat_template_is_a_clear_error_unless_one_is_given() -> None:
    bare = tiny_chat_tokenizer(chat_template=None)

    with pytest.raises(ChatTemplateError, match="has no chat template, and none was "
                                                "configured"):
        encode_conversation(bare, TWO_TURNS, max_length=100)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        encode_conversations(bare, [], max_length=100)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        prompt_for_generation(bare, TWO_TURNS[:1])
    given = encode_conversation(bare, TWO_TURNS, max_length=300,
                                chat_template=SMOLLM2_TEMPLATE)
    assert given is not None and trained_text(bare, given) == "Yo<|im_end|>No.<|im_end|>"


def test_a_template_that_is_not_prefix_stable_is_refused(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    counted = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"

    with pytest.raises(ChatTemplateError, match="renders messages 1..1 differently"):
        encode_conversation(tokenizer, TWO_TURNS, max_length=100, chat_template=counted)


def test_a_failing_template_names_the_conversation_in_a_batch(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    strict = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 0 and "
        "messages[loop.index0 - 1]['role'] == 'user' %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    two_users = [TWO_TURNS[0], TWO_TURNS[0], TWO_TURNS[1]]

    with pytest.raises(ChatTemplateError, match=r"conversation 2: .*roles must alternate"):
        encode_conversations(tokenizer, [TWO_TURNS, two_users], max_length=100,
                             chat_template=strict)


def test_truncate_keeps_the_first_tokens_and_drops_when_no_answer_is_left(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    cut = encode_conversation(tokenizer, TWO_TURNS, max_length=30)
    answer_cut_off = encode_conversation(tokenizer, TWO_TURNS, max_length=21)
    dropped = encode_conversation(tokenizer, TWO_TURNS, max_length=51, overflow="drop")
    fits = encode_conversation(tokenizer, TWO_TURNS, max_length=52, overflow="drop")

    assert cut is not None and cut.truncated and len(cut.input_ids) == 30
    assert trained_text(tokenizer, cut) == "Yo<|im_end|>"  # the second answer is cut off
    assert answer_cut_off is None  # positions 0..20 hold no trained token
    assert dropped is None
    assert fits is not None and not fits.truncated


@pytest.mark.parametrize(("overflow", "expected"), [
    # short: kept whole; long_answer_kept: cut after the first answer; long_prompt: the
    # cut removes its only answer
    ("truncate", {"kept": (0, 1), "dropped_too_long": 0, "dropped_no_trained": 1,
                  "truncated": 1}),
    ("drop", {"kept": (0,), "dropped_too_long": 2, "dropped_no_trained": 0,
              "truncated": 0}),
])
def test_the_batch_encoder_counts_what_it_dropped_and_truncated(
    tokenizer: PreTrainedTokenizerFast, overflow: str, expected: dict[str, object]
) -> None:
    short = TWO_TURNS[:2]  # 25 tokens
    long_answer_kept = TWO_TURNS  # 52 tokens, first answer ends at position 23
    long_prompt = [{"role": "user", "content": "x" * 40}, {"role": "assistant",
                                                           "content": "y"}]

    examples, stats = encode_conversations(
        tokenizer, [short, long_answer_kept, long_prompt], max_length=30, overflow=overflow
    )

    assert stats.total == 3
    assert {key: getattr(stats, key) for key in expected} == expected
    assert stats.dropped == 3 - len(stats.kept) == 3 - len(examples)
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.trained_tokens == 3 * len(examples)  # "Yo<|im_end|>" in each kept one


def test_bad_arguments_are_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="train_on must be one of assistant, all"):
        encode_conversation(tokenizer, TWO_TURNS, max_length=10, train_on="user")
    with pytest.raises(ValueError, match="overflow must be one of truncate, drop"):
        encode_conversation(tokenizer, TWO_TURNS, max_length=10, overflow="wrap")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        encode_conversation(tokenizer, TWO_TURNS, max_length=0)


def test_prompt_for_generation_ends_with_the_assistant_header(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    prompt, reference = split_for_generation(TWO_TURNS)

    ids = prompt_for_generation(tokenizer, prompt)
    tail = prompt_for_generation(tokenizer, prompt, max_length=11)

    assert reference == "No."
    assert tokenizer.decode(ids) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        "<|im_start|>user\nOk?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(tail) == "<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="ends with an assistant message"):
        prompt_for_generation(tokenizer, TWO_TURNS)
    with pytest.raises(ValueError, match="must end with an assistant message"):
        split_for_generation(prompt)


def test_collate_right_pads_and_never_trains_on_padding() -> None:
    examples = [EncodedChat([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedChat([8], [8])]

    batch = collate_chat(examples, [1, 0], pad_token_id=2)
    empty = collate_chat(examples, [], pad_token_id=2)

    assert batch["input_ids"].tolist() == [[8, 2, 2], [5, 6, 7]]
    assert batch["labels"].tolist() == [[8, -100, -100], [-100, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert {key: tuple(t.shape) for key, t in empty.items()} == {
        "input_ids": (0, 0), "attention_mask": (0, 0), "labels": (0, 0)}


def test_the_model_loss_averages_over_the_trained_tokens_only(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    example = encode_conversation(tokenizer, TWO_TURNS, max_length=100)
    assert example is not None
    batch = collate_chat([example], [0], pad_token_id=tokenizer.pad_token_id)

    with torch.no_grad():
        output = model(**batch)
    # Token t is predicted from position t - 1: the trained tokens 21..23 and 47..50.
    log_probs = torch.log_softmax(output.logits[0], dim=-1)
    trained = [21, 22, 23, 47, 48, 49, 50]
    manual = -torch.stack([log_probs[t - 1, example.input_ids[t]] for t in trained]).mean()

    assert torch.isclose(output.loss, manual, atol=1e-5)


@pytest.mark.parametrize(("pred", "ref", "expected"), [
    ("department: cardiology; urgency: high", "department: cardiology; urgency: high", 1.0),
    ("  NRVL   Up\n", "nrvl up", 1.0),  # case and whitespace are normalised
    ("positive.", "positive", 0.0),  # punctuation is not
    ("", "", 1.0),
    ("negative", "positive", 0.0),
])
def test_exact_match(pred: str, ref: str, expected: float) -> None:
    assert exact_match(pred, ref) == expected


@pytest.mark.parametrize(("pred", "ref", "expected"), [
    ("the cat sat", "the cat", 0.8),  # 2 common; precision 2/3, recall 1
    ("Positive.", "positive", 1.0),  # case and punctuation ignored
    ("a a b", "a b b", 2 / 3),  # bags: common a + b = 2 of 3 each
    ("", "", 1.0),
    ("", "x", 0.0),
    ("x", "y", 0.0),
])
def test_token_f1(pred: str, ref: str, expected: float) -> None:
    assert token_f1(pred, ref) == pytest.approx(expected)
