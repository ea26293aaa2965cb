"""A local model folder with random weights of a real model's shape and the embedded model's tokenizer, for GPU runs
of the CLI and `kvfold serve` (weights do not travel to the device, so they are made there; their values do not
change speed or memory, only the text, which is noise).

    python benchmarks/random_model.py --tokenizer-only --out benchmarks/captured/tokenizer     # here, once
    python benchmarks/random_model.py --shape llama-3.1-8b --tokenizer benchmarks/captured/tokenizer --out /tmp/llama8b

The vocabulary is the tokenizer's (SmolLM2's 49152 tokens, not Llama-3.1's 128256): the embedding and output
matrices are 0.8 GB in bfloat16 instead of 2.1 GB; every other shape is the real one. `--shape tiny` (2 layers)
checks the pipeline on a CPU. `benchmarks/captured/` is gitignored and carried to the device (`carry`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunked_prefill import CONFIGS  # noqa: E402

SHAPES = {**CONFIGS, "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)}


def export_tokenizer(out: Path) -> None:
    from kvfold.models import load_model

    _, tokenizer = load_model()
    tokenizer.save_pretrained(out)


def write_random_model(shape: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    fields = {k: v for k, v in SHAPES[shape].items() if k != "vocab_size"}
    config = LlamaConfig(**fields, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {shape} shape, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"vocab {len(tokenizer)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parent / "captured/tokenizer")
    parser.add_argument("--tokenizer-only", action="store_true", help="export the embedded model's tokenizer")
    args = parser.parse_args()
    if args.tokenizer_only:
        export_tokenizer(args.out)
    else:
        write_random_model(args.shape, args.tokenizer, args.out)


if __name__ == "__main__":
    main()
