"""The scorer contract: protected tokens outrank every raw score, newest first, and invalid slots rank last."""

import torch

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
