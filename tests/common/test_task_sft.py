"""The chat SFT task (common/tasks/sft.py) on a tiny random Llama: rows, loss, metrics,
predict inputs, the site check, and LoRA / DP-SGD through the generic machinery."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.data import DataError, load_site_data, load_splits
from common.dp_sgd import train_local_dp_sgd
from common.model import build_model, get_exchanged_state
from common.specs import DataSpec, DPSGDSpec, EncodeSpec, ModelSpec, TrainSpec
from common.tasks import get_task
from common.tasks.base import EvalContext, TrainContext
from common.tasks.sft import TASK, prompts_from_frame
from common.tasks.sft_chat_encoding import IGNORE_INDEX
from common.training import train_local

CPU = torch.device("cpu")


def _cfg(model_dir, **changes):
    return RunConfig(task="sft", model=str(model_dir), max_length=384, builtin_examples=60,
                     batch_size=4, local_steps=4, learning_rate=5e-3).replace(
        generation_samples=3, max_new_tokens=6, **changes)


@pytest.fixture
def setup(tiny_llama_dir):  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_llama_dir)
    model, tokenizer = build_model(ModelSpec.of(cfg, []))
    splits = load_splits(DataSpec.of(cfg))
    encoding = EncodeSpec.of(cfg, tokenizer.name_or_path)
    train = TASK.encode(splits.train, tokenizer, spec=encoding)
    evaluation = TASK.encode(splits.eval, tokenizer, spec=encoding)
    return cfg, model, tokenizer, train, evaluation


def test_get_task_finds_the_sft_task():
    assert get_task("sft") is TASK
    assert TASK.columns == ("messages",) and TASK.peft_task_type == "CAUSAL_LM"


def test_builtin_rows_become_conversations_and_keep_the_task_column(tiny_llama_dir):
    splits = load_splits(DataSpec.of(_cfg(tiny_llama_dir)))
    assert splits.label_names == []
    assert splits.train.column_names[0] == "messages"
    assert {"task", "domain"} <= set(splits.train.column_names)
    first = splits.train[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]


def test_lora_targets_every_attention_projection_of_a_llama(setup):
    _, model, _, _, _ = setup
    names = list(get_exchanged_state(model))
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{projection}.lora_A" in n for n in names), projection
    assert all("lora_" in n for n in names)  # a causal LM has no fresh head to train


def test_the_loss_is_the_mean_cross_entropy_of_the_assistant_tokens_only(setup):
    cfg, model, tokenizer, train, _ = setup
    batch = TASK.collate(train, [0, 1], tokenizer.pad_token_id)
    loss = TASK.make_loss(train, spec=TASK.loss_spec(cfg), ctx=TrainContext())(model, batch)

    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits.float()
    by_hand, count = 0.0, 0
    for row in range(2):  # token t is predicted from the logits at t - 1
        for t in range(1, batch["input_ids"].shape[1]):
            target = int(batch["labels"][row, t])
            if target != IGNORE_INDEX:
                by_hand -= float(F.log_softmax(logits[row, t - 1].detach(), dim=-1)[target])
                count += 1
    assert count == sum(e.num_trained for e in train.examples[:2])
    assert float(loss) == pytest.approx(by_hand / count, rel=1e-5)


def test_training_lowers_the_assistant_token_loss(setup):
    cfg, model, tokenizer, train, evaluation = setup
    ctx = EvalContext(batch_size=8, device=CPU, precision="fp32", server_round=1,
                      spec=TASK.eval_spec(cfg))
    before = TASK.evaluate(model, tokenizer, evaluation, ctx)["loss"]
    result = train_local(model, train, TrainSpec.of(cfg.replace(local_steps=15)), task=TASK,
                         loss_spec=TASK.loss_spec(cfg), seed=0, device=CPU,
                         pad_token_id=tokenizer.pad_token_id)
    after = TASK.evaluate(model, tokenizer, evaluation, ctx)
    assert result.steps == 15 and after["loss"] < before
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))


def test_generation_metrics_run_in_round_0_every_n_rounds_and_at_the_end(setup):
    cfg, model, tokenizer, _, evaluation = setup
    cfg = cfg.replace(generate_every=2)

    def metrics(rnd, final=False):
        return TASK.evaluate(model, tokenizer, evaluation, EvalContext(
            batch_size=8, device=CPU, precision="fp32", server_round=rnd, final=final,
            spec=TASK.eval_spec(cfg)))

    assert {"exact_match", "token_f1"} <= metrics(0).keys()
    assert "exact_match" not in metrics(1)
    assert 0.0 <= metrics(2)["token_f1"] <= 1.0
    assert "exact_match" in metrics(3, final=True)
    assert metrics(1)["num_examples"] == len(evaluation)


def test_dp_sgd_trains_a_causal_lm_with_lora(setup):
    cfg, model, tokenizer, train, _ = setup
    before = get_exchanged_state(model)
    dp_cfg = cfg.replace(dp_sgd_noise_multiplier=1.0, local_steps=3)
    result, (noise, rate, steps) = train_local_dp_sgd(
        model, train, TrainSpec.of(dp_cfg), dp=DPSGDSpec.of(dp_cfg), task=TASK,
        loss_spec=TASK.loss_spec(dp_cfg), seed=1, device=CPU, pad_token_id=tokenizer.pad_token_id)
    after = get_exchanged_state(model)
    assert steps == 3 and noise == 1.0 and 0 < rate < 1
    assert any((before[k] != after[k]).any() for k in before)


def test_a_site_file_is_read_as_conversations(tiny_llama_dir, tmp_path):
    site = tmp_path / "site.jsonl"
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"}]
    site.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    data = load_site_data(str(site), DataSpec.of(_cfg(tiny_llama_dir)), [])
    assert data.column_names == ["messages"]
    assert data[1]["messages"][0]["content"] == "Add\n\n2 and 3"
    assert data[1]["messages"][1] == {"role": "assistant", "content": "5"}


def test_a_csv_answer_that_looks_like_a_number_stays_text(tiny_llama_dir, tmp_path):
    site = tmp_path / "site.csv"
    site.write_text("prompt,response\nWhat is 2+2?,4\nAnd 3+3?,6\n", encoding="utf-8")
    data = load_site_data(str(site), DataSpec.of(_cfg(tiny_llama_dir)), [])
    assert data[0]["messages"][1]["content"] == "4"


def test_a_conversation_without_an_answer_is_refused_naming_the_row(tiny_llama_dir, tmp_path):
    site = tmp_path / "site.jsonl"
    site.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"site.jsonl.*row 1"):
        load_site_data(str(site), DataSpec.of(_cfg(tiny_llama_dir)), [])


def test_the_site_check_counts_long_conversations(setup, tmp_path):
    _, _, tokenizer, _, _ = setup
    site = tmp_path / "site.jsonl"
    rows = [{"prompt": "x " * 300, "response": "y"}, {"prompt": "short", "response": "ok"}]
    site.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = _cfg("unused")
    from common.specs import DataSpec

    report = TASK.check_site(str(site), spec=DataSpec.of(cfg),
                             encoding=EncodeSpec.of(cfg.replace(max_length=64), "t"),
                             label_names=[], tokenizer=tokenizer)
    assert (report.conversations, report.kept) == (2, 1)
    assert report.dropped == 1 and report.blocking == ()
    assert report.warnings[0].message == ("1 of 2 conversations are longer than `max-length` "
                                          "64: 0 truncated, 1 dropped")
    assert report.aggregate_stats()["data-rows"] == 1


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_the_site_check_counts_duplicate_conversations_and_eval_overlap(tmp_path):
    pr = [("What is 2+2?", "4"),
          ("What is 2+2?", "4"),  # exact repeat of row 1
          ("what is  2+2", "4."),  # row 1 normalized (case, spaces, end punctuation)
          ("Name a colour.", "Blue"),
          ("Name a colour.", "Red"),  # another answer: another conversation
          ("Capital of France?", "Paris"),
          ("Capital of France?", "Paris"),  # exact repeat of row 6
          ("Say hi", ""),  # refused (no answer): not a conversation, not counted
          ("Say hi", "hi"),
          ("Say hi!", "Hi")]  # row 9 normalized
    site = _jsonl(tmp_path / "site.jsonl", [{"prompt": p, "response": r} for p, r in pr])
    evaluation = _jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "WHAT IS 2+2?", "response": "4"},  # in the site's file, normalized
        {"prompt": "Name a colour.", "response": "Green"},
        {"prompt": "Capital of France", "response": "Paris!"},  # in it, normalized
        {"prompt": "Unseen", "response": "x"}])
    cfg = _cfg("unused")

    report = TASK.check_site(str(site), spec=DataSpec.of(cfg),
                             encoding=EncodeSpec.of(cfg, ""), label_names=[], tokenizer=None,
                             eval_path=str(evaluation))

    # 9 readable conversations: rows 2, 7 repeat exactly; rows 2, 3, 7, 10 normalized.
    assert (report.conversations, report.refused, report.readable) == (10, 1, 9)
    assert (report.exact_duplicates, report.normalized_duplicates) == (2, 4)
    assert report.duplicate_share == pytest.approx(4 / 9)
    assert (report.eval_rows, report.eval_overlap) == (4, 2)
    assert [f.message for f in report.warnings] == [
        "4 duplicate conversations (2 exact, 44.4% of the readable ones): duplicates "
        "weigh those conversations more in training",
        "2 of 4 eval conversations are also in the data (normalized): evaluation on them "
        "overstates the model"]
    assert len(report.blocking) == 1  # the refused row, as before
    as_json = report.to_dict()
    assert (as_json["exact-duplicates"], as_json["normalized-duplicates"],
            as_json["eval-rows"], as_json["eval-overlap"]) == (2, 4, 4, 2)
    lines = report.lines()
    assert "  exact duplicate conversations: 2" in lines
    assert ("  normalized duplicate conversations (case, whitespace, end punctuation): "
            "4 (44.4%)") in lines
    assert "  eval conversations also in the data (normalized): 2 of 4" in lines
    # Counts and shares only: no text of the file in the report.
    assert "Capital" not in json.dumps(as_json) + "\n".join(lines)


def test_the_site_check_of_distinct_conversations_warns_of_nothing(tmp_path):
    site = _jsonl(tmp_path / "site.jsonl", [{"prompt": "Say hi", "response": "hi"},
                                            {"prompt": "Say hi", "response": "hello"}])
    cfg = _cfg("unused")

    report = TASK.check_site(str(site), spec=DataSpec.of(cfg),
                             encoding=EncodeSpec.of(cfg, ""), label_names=[], tokenizer=None)

    assert (report.exact_duplicates, report.normalized_duplicates) == (0, 0)
    assert (report.eval_rows, report.eval_overlap) == (None, None)
    assert report.warnings == () and report.blocking == ()


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "Hello"}, [{"role": "user", "content": "Hello"}]),
    ({"instruction": "Add", "input": "1 and 2"}, [{"role": "user", "content": "Add\n\n1 and 2"}]),
    ({"messages": json.dumps([{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}])},
     [{"role": "user", "content": "q"}]),
])
def test_predict_inputs_take_every_prompt_format(row, expected):
    assert prompts_from_frame(pd.DataFrame([row]), column=None, source="in") == [expected]


def test_predict_inputs_add_the_runs_system_prompt():
    prompts = TASK.predict_inputs(pd.DataFrame([{"prompt": "Hi"}]), column=None,
                                  settings={"system-prompt": "Be brief."}, source="in")
    assert prompts == [[{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"}]]


@pytest.mark.parametrize(("row", "message"), [
    ({"body": "no prompt column"}, "in: row 1: no prompt"),
    ({"messages": "[not json"}, "not valid JSON"),
    ({"messages": json.dumps([{"role": "assistant", "content": "a"}])},
     "must end with a user message"),
])
def test_unusable_predict_inputs_are_refused_naming_the_row(row, message):
    with pytest.raises(DataError, match=message):
        prompts_from_frame(pd.DataFrame([row]), column=None, source="in")


def test_generation_answers_every_prompt(setup):
    _, model, tokenizer, _, _ = setup
    prompts = TASK.predict_inputs(pd.DataFrame([{"prompt": "Hi"}, {"prompt": "Bye now"}]),
                                  column=None, settings={}, source="in")
    answers = TASK.predict(model, tokenizer, prompts, settings={"max-new-tokens": 4},
                           max_length=64, batch_size=2, device=CPU)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_the_preflight_refuses_an_encoder_or_a_model_without_a_chat_template(
    tiny_model_dir, tiny_llama_dir, tmp_path
):
    import shutil

    from common.config import ConfigError
    from server.preflight import check_model

    with pytest.raises(ConfigError, match=r"needs a causal language model.*BertModel"):
        check_model(_cfg(tiny_model_dir).replace(max_length=32))
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir, bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no chat template: set `chat-template`"):
        check_model(_cfg(bare))
    assert check_model(_cfg(bare, chat_template="{{ messages }}")) is None
    assert check_model(_cfg(tiny_llama_dir)) is None


def test_predict_inputs_may_mix_formats_in_one_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    frame = pd.read_json(path, lines=True, dtype=False)
    assert prompts_from_frame(frame, column=None, source="in") == [
        [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]


def test_a_site_whose_every_example_is_too_long_fails_with_a_clear_error(
    tiny_llama_dir, tmp_path
):
    from client.local_data import load_local_data

    site = tmp_path / "site.jsonl"
    site.write_text(json.dumps({"prompt": "x " * 300, "response": "y"}) + "\n", encoding="utf-8")
    cfg = _cfg(tiny_llama_dir, overflow="drop").replace(max_length=64)
    _, tokenizer = build_model(ModelSpec.of(cfg, []))
    with pytest.raises(DataError, match="conversations are longer|no conversation fits"):
        load_local_data(cfg, {"data-path": str(site)}, [], tokenizer)


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": "head"}, "`method` head trains a classification head"),
    ({"gradient_checkpointing": True, "dp_sgd_noise_multiplier": 1.0},
     "`gradient-checkpointing` and DP-SGD do not combine"),
])
def test_sft_refuses_settings_that_cannot_work(changes, message):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        RunConfig(task="sft", **changes)


def test_gradient_checkpointing_trains_a_causal_lm(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, gradient_checkpointing=True)
    model, tokenizer = build_model(ModelSpec.of(cfg, []))
    splits = load_splits(DataSpec.of(cfg))
    train = TASK.encode(splits.train, tokenizer, spec=EncodeSpec.of(cfg, tokenizer.name_or_path))
    before = get_exchanged_state(model)
    result = train_local(model, train, TrainSpec.of(cfg), task=TASK,
                         loss_spec=TASK.loss_spec(cfg), seed=0, device=CPU,
                         pad_token_id=tokenizer.pad_token_id)
    after = get_exchanged_state(model)
    assert result.steps == cfg.local_steps
    assert any((before[k] != after[k]).any() for k in before)


def test_the_eval_spec_holds_the_generation_keys_with_their_config_defaults():
    from common.config import RunConfig
    from common.tasks.sft import SftEvalSpec

    default = RunConfig(task="sft")
    options = default.task_options
    assert TASK.eval_spec(default) == SftEvalSpec(
        generate_every=options.generate_every, generation_samples=options.generation_samples,
        max_new_tokens=options.max_new_tokens, max_length=default.max_length)
    cfg = default.replace(generate_every=3, generation_samples=5, max_new_tokens=9)
    assert TASK.eval_spec(cfg) == SftEvalSpec(generate_every=3, generation_samples=5,
                                              max_new_tokens=9, max_length=cfg.max_length)
