"""The scorer contract: protected tokens outrank every raw score, newest first, and invalid slots rank last."""

import pytest
import torch

from kvfold.errors import KVFoldError
from kvfold.methods.base import PROTECTED, ScoreInputs, top_mask
from kvfold.methods.knorm import KNorm


def test_protected_tokens_rank_newest_first_and_above_raw_scores():
    tokens = 40
    keys = torch.randn(1, 1, tokens, 8) * 100
    positions = torch.arange(tokens).view(1, 1, -1)
    valid = torch.ones(1, 1, tokens, dtype=torch.bool)
    valid[..., 5] = False
    x = ScoreInputs(torch.randn(1, 1, 1, 8), torch.tensor([tokens - 1]), keys, keys, positions, valid, 1.0)
    scores = KNorm(ratio=0.5, window=8, sink=2).score(x)[0, 0]
    protected = scores >= PROTECTED
    assert protected.tolist() == [i < 2 or i >= tokens - 8 for i in range(tokens)]
    window = scores[tokens - 8:]
    assert bool((window[1:] > window[:-1]).all()), "newer protected tokens must outrank older ones"
    assert scores[5] == float("-inf")
    # A count below the protected span keeps the newest protected tokens.
    kept = top_mask(scores.unsqueeze(0), torch.tensor([3]))[0]
    assert torch.nonzero(kept).flatten().tolist() == [tokens - 3, tokens - 2, tokens - 1]


def test_every_registered_method_has_a_readme_row_and_a_test_file():
    from pathlib import Path

    from kvfold.methods import REGISTRY

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    for name, cls in REGISTRY.items():
        assert f"| `{name}` |" in readme, f"README's method table has no row for {name}"
        module = cls.__module__.rsplit(".", 1)[-1]
        assert (root / "tests" / "methods" / f"test_{module}.py").is_file(), f"no tests/methods/test_{module}.py"


def test_importing_the_package_registers_every_method_file():
    """A fresh interpreter (no test imported a method module first) finds a method in every file of methods/."""
    import subprocess
    import sys
    from pathlib import Path

    import kvfold.methods

    folder = Path(kvfold.methods.__file__).parent
    files = {f.stem for f in folder.glob("*.py")} - {"__init__", "base"}
    code = "import kvfold.methods as m; print(' '.join(sorted({c.__module__.rsplit('.', 1)[-1] for c in m.REGISTRY.values()})))"
    registered = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert files <= registered, f"not imported by kvfold.methods: {sorted(files - registered)}"


def _with_a_secondary_sink(tokens: int = 60, sink_at: int = 30) -> ScoreInputs:
    """Keys of random direction; every window query points at key `sink_at`, which also has the largest norm."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1, 1, tokens, 8, generator=gen), dim=-1)
    keys[0, 0, sink_at] = torch.tensor([6.0, 0, 0, 0, 0, 0, 0, 0])
    queries = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]).expand(1, 2, 8, 8).clone()
    positions = torch.arange(tokens).view(1, 1, -1)
    return ScoreInputs(queries, torch.arange(tokens - 8, tokens), keys, keys.clone(), positions,
                       torch.ones(1, 1, tokens, dtype=torch.bool), 1.0)


def test_detect_protects_a_secondary_sink_that_the_scorer_would_drop():
    from kvfold import Compressor
    from kvfold.methods.base import UniformBudget, detected_sinks

    x = _with_a_secondary_sink()
    found = detected_sinks(x, 20.0)[0, 0]
    assert torch.nonzero(found).flatten().tolist() == [30]  # softmax mass ~0.96 >= 20 / 60
    keep = torch.tensor([20])
    plain = UniformBudget().select(KNorm(ratio=0.5, window=4).score(x), keep)[0, 0]
    detecting = KNorm(ratio=0.5, window=4, detect=20.0)
    kept = UniformBudget().select(detecting.score(x), keep)[0, 0]
    assert not plain[30] and kept[30], "knorm drops the largest-norm key; detect keeps it as a sink"
    assert int(kept.sum()) == 20
    assert Compressor.parse("knorm:0.5,detect=20").scorer.detect == 20
    for bad in ("0.5", "1", "-3"):
        with pytest.raises(KVFoldError, match="detect must be 0"):
            Compressor.parse(f"snapkv:0.5,detect={bad}")
