"""Tests for common/model.py on a tiny random BERT (2 layers, hidden 32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.model import (
    autocast_context,
    build_model,
    clear_model_cache,
    get_exchanged_state,
    get_model,
    select_device,
    set_exchanged_state,
    trainable_parameter_count,
)
from common.model_source import ModelSource, check_model, model_max_positions, resolve_model
from common.specs import ModelSpec

LABELS = ["neg", "pos"]


def tiny_cfg(model_dir: Path, **changes: object) -> RunConfig:
    return RunConfig(model=str(model_dir), lora_r=4, lora_alpha=8, **changes)  # type: ignore[arg-type]


def build(cfg: RunConfig, labels: list[str]) -> tuple[Any, Any]:
    """build_model, typed loosely so tests can reach model attributes (classifier, ...)."""
    return build_model(ModelSpec.of(cfg, labels))


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# --- resolve_model, model_max_positions, check_model (no weights, no network) ----------


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1, an empty Hugging Face cache, and no socket may connect."""
    import socket

    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model check tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache


def _copy_model(source: Path, target: Path, *, skip: str = "") -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        if not (skip and file.match(skip)):
            (target / file.name).write_bytes(file.read_bytes())
    return target


def test_resolve_model_local_folder_and_its_positions(tiny_model_dir: Path, offline: Path) -> None:
    source = resolve_model(str(tiny_model_dir))

    assert source == ModelSource(name=str(tiny_model_dir), path=str(tiny_model_dir.resolve()),
                                 local=True, cached=True)
    assert model_max_positions(source) == 128  # write_tiny_bert's max_position_embeddings


def test_minilm_is_the_packaged_folder(offline: Path) -> None:
    source = resolve_model("minilm")

    assert source.local and (Path(source.path) / "config.json").is_file()


def test_minilm_allows_512_positions(offline: Path) -> None:
    assert model_max_positions("minilm") == 512


def test_a_folder_without_weights_is_refused(
    tiny_model_dir: Path, tmp_path: Path, offline: Path
) -> None:
    folder = _copy_model(tiny_model_dir, tmp_path / "no-weights", skip="*.safetensors")

    with pytest.raises(ConfigError, match=f"`model` folder {folder} has no weight files "
                                          r"\(\*\.safetensors or \*\.bin\)"):
        resolve_model(str(folder))


def test_an_empty_folder_lacks_config_and_weights(tmp_path: Path, offline: Path) -> None:
    with pytest.raises(ConfigError, match="has no config.json and no weight files"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(("name", "message"), [
    ("./no/such/folder", r"`model` folder './no/such/folder' does not exist"),
    ("no such model", r"not a local model folder and not a valid Hugging Face Hub id"),
])
def test_names_that_are_neither_folders_nor_hub_ids(
    name: str, message: str, offline: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_model(name)


def test_a_file_is_not_a_model(tiny_model_dir: Path, offline: Path) -> None:
    with pytest.raises(ConfigError, match="config.json' is a file"):
        resolve_model(str(tiny_model_dir / "config.json"))


def test_an_uncached_hub_id_offline_is_a_clear_error(offline: Path) -> None:
    cfg = RunConfig(model="no-such-model-xyz")
    message = (r"`model` 'no-such-model-xyz' is not a local model folder and is not in the "
               rf"Hugging Face cache \({offline}\); the Hub is not reachable \(offline: "
               r"HF_HUB_OFFLINE=1\) — give `minilm`, a local folder")

    with pytest.raises(ConfigError, match=message):
        check_model(cfg)
    with pytest.raises(ConfigError, match=message):  # not an OSError from from_pretrained
        get_model(ModelSpec.of(cfg, LABELS), torch.device("cpu"), max_length=cfg.max_length)


def test_a_cached_hub_id_is_resolved_offline(tiny_model_dir: Path, offline: Path) -> None:
    repo = offline / "models--org--tiny"
    _copy_model(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")

    source = resolve_model("org/tiny")

    assert source == ModelSource(name="org/tiny", path="org/tiny", local=False, cached=True)
    assert model_max_positions(source) == 128


def test_positions_after_the_padding_offset(tmp_path: Path, offline: Path) -> None:
    from transformers import RobertaConfig

    RobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # only its presence is checked

    assert model_max_positions(str(tmp_path)) == 512


def test_max_length_is_bounded_by_the_model(tiny_model_dir: Path, offline: Path) -> None:
    ok = tiny_cfg(tiny_model_dir, max_length=128)
    too_long = ok.replace(max_length=129)
    message = "`max-length` 129 exceeds the model's maximum of 128 positions"
    clear_model_cache()

    assert check_model(ok).local
    with pytest.raises(ConfigError, match=message):
        check_model(too_long)
    get_model(ModelSpec.of(ok, LABELS), torch.device("cpu"), max_length=ok.max_length)
    with pytest.raises(ConfigError, match=message):  # the cached model is checked too
        get_model(ModelSpec.of(too_long, LABELS), torch.device("cpu"),
                  max_length=too_long.max_length)
    clear_model_cache()


def test_model_checks_import_neither_torch_nor_transformers() -> None:
    """A preflight runs them before Flower starts: they must stay cheap to import."""
    import subprocess
    import sys

    code = ("import sys, common.model_source; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout

    assert out.strip() == "[]"


# --- methods: which parameters train ---------------------------------------------------


def test_lora_trains_only_adapters_and_head(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="lora"), LABELS)

    names = trainable_names(model)

    # peft's default targets for BERT are query and value: A and B in each of 2 layers.
    assert sum("lora_" in n for n in names) == 2 * 2 * 2
    assert all(".query." in n or ".value." in n for n in names if "lora_" in n)
    assert all("lora_" in n or ".classifier." in n for n in names)
    assert sum(".classifier." in n for n in names) == 2  # weight and bias
    assert not model.training


def test_lora_explicit_targets(tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, method="lora", lora_target_modules="key, dense")
    model, _ = build(cfg, LABELS)

    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1]
               for n in trainable_names(model) if "lora_" in n}

    assert adapted == {"key", "dense"}


def test_lora_unknown_target_is_a_config_error(tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, method="lora", lora_target_modules="query,qkv_proj")

    with pytest.raises(ConfigError, match=r"lora-target-modules.*'qkv_proj'.*query"):
        build(cfg, LABELS)


def test_head_trains_only_the_classifier(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="head"), LABELS)

    assert trainable_names(model) == ["classifier.weight", "classifier.bias"]


def test_full_trains_everything(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="full"), LABELS)

    assert all(p.requires_grad for p in model.parameters())


def test_freeze_bottom_layer_and_embeddings(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="freeze", freeze_layers=1), LABELS)

    trainable = dict((n, p.requires_grad) for n, p in model.named_parameters())

    assert not any(v for n, v in trainable.items() if n.startswith("bert.embeddings."))
    assert not any(v for n, v in trainable.items() if ".layer.0." in n)
    layer1 = [v for n, v in trainable.items() if ".layer.1." in n]
    assert layer1 and all(layer1)
    assert trainable["bert.pooler.dense.weight"] and trainable["classifier.weight"]


def test_freeze_more_layers_than_the_model_has(tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, method="freeze", freeze_layers=3)

    with pytest.raises(ConfigError, match=r"`freeze-layers` must be <= 2 \(layers in .*\), got 3"):
        build(cfg, LABELS)


def test_any_number_of_classes_and_label_names(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="head"), ["a", "b", "c"])

    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.classifier.weight.shape == (3, 32)


def test_a_checkpoint_head_of_another_size_is_replaced(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    two_class, tokenizer = build(tiny_cfg(tiny_model_dir, method="full"), LABELS)
    two_class.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, _ = build(tiny_cfg(tmp_path, method="head"), ["a", "b", "c"])

    assert model.classifier.weight.shape == (3, 32)


def test_two_builds_are_bit_identical(tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, method="lora")
    first, _ = build(cfg, LABELS)
    torch.manual_seed(12345)  # whatever the global RNG did in between
    second, _ = build(cfg, LABELS)

    a, b = first.state_dict(), second.state_dict()

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_different_seed_gives_a_different_head(tiny_model_dir: Path) -> None:
    first, _ = build(tiny_cfg(tiny_model_dir, method="head"), LABELS)
    second, _ = build(tiny_cfg(tiny_model_dir, method="head", seed=7), LABELS)

    assert not torch.equal(first.classifier.weight, second.classifier.weight)


# --- the exchanged state -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full", "head", "freeze"])
def test_exchanged_state_round_trip_is_bit_exact(tiny_model_dir: Path, method: str) -> None:
    cfg = tiny_cfg(tiny_model_dir, method=method, freeze_layers=1)
    source, _ = build(cfg, LABELS)
    target, _ = build(cfg.replace(seed=1), LABELS)  # different initial weights
    with torch.no_grad():  # make LoRA's zero-initialised B matrices non-trivial
        for p in source.parameters():
            p.add_(torch.randn_like(p))

    sent = get_exchanged_state(source)
    set_exchanged_state(target, sent)
    received = get_exchanged_state(target)

    assert list(sent) == trainable_names(source)
    assert list(received) == list(sent)
    assert all(np.array_equal(received[k], sent[k]) for k in sent)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sent.values())


def test_exchanged_state_is_a_copy(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="head"), LABELS)
    state = get_exchanged_state(model)

    state["classifier.bias"][:] = 99.0

    assert not torch.any(model.classifier.bias == 99.0)


def test_lora_exchanges_far_less_than_full(tiny_model_dir: Path) -> None:
    lora, _ = build(tiny_cfg(tiny_model_dir, method="lora"), LABELS)
    full, _ = build(tiny_cfg(tiny_model_dir, method="full"), LABELS)

    lora_size = sum(v.size for v in get_exchanged_state(lora).values())
    full_size = sum(v.size for v in get_exchanged_state(full).values())

    # 2 layers x (query + value) x (A: 4x32 + B: 32x4) + head 2x32 + 2
    assert lora_size == 2 * 2 * (4 * 32 + 32 * 4) + 2 * 32 + 2 == trainable_parameter_count(lora)
    assert lora_size * 100 < full_size


def test_set_exchanged_state_rejects_missing_and_unexpected_keys(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="head"), LABELS)
    state = get_exchanged_state(model)
    del state["classifier.bias"]
    state["bert.pooler.dense.bias"] = np.zeros(32, dtype=np.float32)

    with pytest.raises(ValueError, match=r"missing \['classifier.bias'\].*unexpected "
                                         r"\['bert.pooler.dense.bias'\]"):
        set_exchanged_state(model, state)


def test_set_exchanged_state_rejects_a_shape_mismatch(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="head"), LABELS)
    before = get_exchanged_state(model)
    state = dict(before, **{"classifier.weight": np.zeros((3, 32), dtype=np.float32)})
    state["classifier.bias"] = np.full(2, 5.0, dtype=np.float32)

    with pytest.raises(ValueError, match=r"'classifier.weight' has shape \(3, 32\)"):
        set_exchanged_state(model, state)
    # nothing was written
    assert np.array_equal(get_exchanged_state(model)["classifier.bias"], before["classifier.bias"])


def test_set_exchanged_state_casts_dtype_and_accepts_read_only(tiny_model_dir: Path) -> None:
    model, _ = build(tiny_cfg(tiny_model_dir, method="head"), LABELS)
    state = {k: v.astype(np.float64) for k, v in get_exchanged_state(model).items()}
    state["classifier.bias"] = np.array([1.5, -2.0])
    state["classifier.bias"].setflags(write=False)

    set_exchanged_state(model, state)

    assert model.classifier.bias.dtype == torch.float32
    assert model.classifier.bias.tolist() == [1.5, -2.0]


# --- device and precision ------------------------------------------------------------------


def test_select_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="`device` is cuda but no CUDA device"):
        select_device("cuda")


def test_autocast_context_on_cpu() -> None:
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    x = torch.ones(2, 4)

    with autocast_context("bf16", cpu):
        assert layer(x).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with autocast_context(precision, cpu):
            assert layer(x).dtype == torch.float32
    with pytest.raises(ConfigError, match="fp16"):
        autocast_context("fp16", cpu)


# --- the per-process cache -------------------------------------------------------------------


def test_get_model_caches_by_every_key(tiny_model_dir: Path) -> None:
    clear_model_cache()
    cfg = tiny_cfg(tiny_model_dir, method="head")
    cpu = torch.device("cpu")

    first = get_model(ModelSpec.of(cfg, LABELS), cpu, max_length=cfg.max_length)
    again = get_model(ModelSpec.of(cfg, LABELS), cpu, max_length=cfg.max_length)
    other_labels = get_model(ModelSpec.of(cfg, ["a", "b"]), cpu, max_length=cfg.max_length)
    other_method = get_model(ModelSpec.of(cfg.replace(method="full"), LABELS), cpu,
                             max_length=cfg.max_length)

    assert again[0] is first[0] and again[1] is first[1]
    assert other_labels[0] is not first[0]
    assert other_method[0] is not first[0]
    clear_model_cache()
    assert get_model(ModelSpec.of(cfg, LABELS), cpu, max_length=cfg.max_length)[0] is not first[0]
    clear_model_cache()


# --- the real packaged model (a couple of seconds) ---------------------------------------------


def test_minilm_lora_trainable_count_matches_environment_notes() -> None:
    cfg = RunConfig(model="minilm", method="lora", lora_r=8, lora_target_modules="query,value")

    model, tokenizer = build(cfg, LABELS)

    assert trainable_parameter_count(model) == 74_498
    assert tokenizer.is_fast
