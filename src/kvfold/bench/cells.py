"""One cell of a `kvfold bench` sweep and the code that answers it: rows from a model, no file access, so the
same code runs in the driver and in a Ray worker (:mod:`.distributed`). A `ppl` sample is teacher-forced
(:mod:`kvfold.perplexity`) instead of answered."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..api import generate
from ..compressor import Compressor
from ..perplexity import TeacherForced, teacher_forced
from ..replay import generate_shared
from .records import PeakMemory, environment, make_key, timestamp, uncompressed_bytes
from .tasks import PERPLEXITY, Sample, score

if TYPE_CHECKING:
    from .runner import BenchConfig


def method_ratio(compressor: Compressor) -> float | None:
    """The eviction ratio a compressor runs at, or None when it evicts nothing or keeps a fixed token count."""
    if not compressor.evicts or compressor.scorer.fixed_size:
        return None
    return float(compressor.scorer.ratio)


@dataclass(frozen=True)
class Cell:
    """One (method, task, length, setting) of the sweep; it answers every question of every sample."""

    compressor: Compressor
    task: str
    length: int
    setting: str

    @property
    def method(self) -> str:
        return self.compressor.spec

    @property
    def ratio(self) -> float | None:
        return method_ratio(self.compressor)

    def key(self, model: str, sample: int, question: int) -> str:
        return make_key(model, self.method, self.ratio, self.task, self.length, self.setting, sample, question)


def sample_hash(sample: Sample) -> str:
    blob = json.dumps([sample.context, list(sample.questions), [list(a) if isinstance(a, tuple) else a
                                                               for a in sample.answers]], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CellWork:
    """What one cell still has to answer, self-contained (picklable) so that a Ray worker can run it: the cell's
    samples, each prompt's token count, the samples' hashes and, per sample, the question indices still missing."""

    cell: Cell
    samples: tuple[Sample, ...]
    prompts: tuple[tuple[int, ...], ...]
    hashes: tuple[str, ...]
    todo: tuple[tuple[int, ...], ...]

    @property
    def label(self) -> str:
        c = self.cell
        return f"{c.method} · {c.task} · {c.length} · {c.setting}"

    @property
    def total(self) -> int:
        return sum(map(len, self.todo))


def cell_events(model, tokenizer, config: BenchConfig, work: Iterable[CellWork], model_name: str) -> Iterator[tuple]:
    """Answer the missing questions of each cell: yields ``("start", label, total)`` when a cell begins, then
    ``("row", row)`` per answered question. Runs in the driver or in a Ray worker; writes nothing.
    `config.shared_prefill`: the cells of one (task, length, setting) run together, each prompt's forward once."""
    if config.shared_prefill:
        yield from _shared_events(model, tokenizer, config, work, model_name)
        return
    env, device = environment(model), next(model.parameters()).device
    for item in work:
        yield "start", item.label, item.total
        for i in range(len(item.samples)):
            yield from _own_rows(model, tokenizer, config, item, i, model_name, env, device)


def _own_rows(model, tokenizer, config: BenchConfig, item: CellWork, i: int, model_name: str, env: dict, device
              ) -> Iterator[tuple]:
    """The ``("row", row)`` events of sample `i`'s missing questions in `item`'s cell, prefilled by its own method."""
    sample = item.samples[i]
    for q, answer, memory in _answers(model, tokenizer, config, item.cell, sample, item.todo[i], device):
        yield "row", _row(model, config, item.cell, model_name, i, q, sample, answer, memory, item.prompts[i][q],
                          item.hashes[i], env)


def prompt_group(cell: Cell) -> tuple[str, int, str]:
    """Cells with the same prompts: a shared prefill serves them all."""
    return cell.task, cell.length, cell.setting


def _shared_events(model, tokenizer, config: BenchConfig, work: Iterable[CellWork], model_name: str
                   ) -> Iterator[tuple]:
    """`cell_events` with one prompt forward per (sample, question) — per sample, query-agnostic — replayed into
    each method's cache (`kvfold.replay.generate_shared`, the same answers). Teacher-forced samples run per cell."""
    env, device = environment(model), next(model.parameters()).device
    groups: dict[tuple, list[CellWork]] = {}
    for item in work:
        groups.setdefault(prompt_group(item.cell), []).append(item)
    for items in groups.values():
        for item in items:
            yield "start", item.label, item.total
        for i, sample in enumerate(items[0].samples):
            needing = [item for item in items if item.todo[i]]
            if not needing:
                continue
            if sample.metric == PERPLEXITY:
                for item in needing:
                    yield from _own_rows(model, tokenizer, config, item, i, model_name, env, device)
                continue
            answers = generate_shared(model, tokenizer, context=sample.context, questions=sample.questions,
                                      methods=[item.cell.compressor for item in needing],
                                      wanted={m: item.todo[i] for m, item in enumerate(needing)},
                                      agnostic=items[0].cell.setting == "agnostic",
                                      max_new_tokens=config.max_new_tokens, fast=config.fast)
            while True:
                with PeakMemory(device) as memory:
                    found = next(answers, None)
                if found is None:
                    break
                m, q, answer = found
                item = needing[m]
                yield "row", _row(model, config, item.cell, model_name, i, q, sample, answer, memory,
                                  item.prompts[i][q], item.hashes[i], env, shared=True)


def _row(model, config: BenchConfig, cell: Cell, model_name: str, i: int, q: int, sample: Sample, answer,
         memory: PeakMemory, prompt_tokens: int, digest: str, env: dict, shared: bool = False) -> dict:
    """One results line: question `q` of sample `i` of `cell` (fields: see the README's `kvfold bench`)."""
    gold = sample.answers[q]
    outcome = (_perplexity_fields(model, answer) if isinstance(answer, TeacherForced)
               else _answer_fields(model, sample, answer, gold, prompt_tokens))
    return {
        "key": cell.key(model_name, i, q), "model": model_name, "method": cell.method, "ratio": cell.ratio,
        "task": cell.task, "metric": sample.metric, "length": cell.length, "setting": cell.setting, "sample": i,
        "question": q, "questions": len(sample.questions), "seed": config.seed, "sample_seed": sample.meta.get("seed"),
        "sample_hash": digest, "question_text": sample.questions[q],
        "answer": list(gold) if isinstance(gold, tuple) else gold, **outcome,
        "peak_memory_bytes": memory.bytes, "peak_memory_source": memory.source,
        "max_new_tokens": config.max_new_tokens, "prefill_chunk": config.prefill_chunk, "fast_decode": config.fast,
        "prefill": "shared" if shared else "own",
        **env,
        "timestamp": timestamp(),
    }


def _answer_fields(model, sample: Sample, answer, gold, prompt_tokens: int) -> dict:
    """What a generated answer adds to its line: prediction, score, tokens, bytes and timings."""
    return {
        "prediction": answer.text, "score": score(sample.metric, answer.text, gold),
        "context_tokens": sample.meta.get("n_tokens"), "prompt_tokens": prompt_tokens,
        "new_tokens": len(answer.tokens), "kv_bytes": answer.kv_bytes,
        "kv_bytes_uncompressed": uncompressed_bytes(model, prompt_tokens),
        "prefill_seconds": answer.prefill_seconds, "decode_seconds": answer.decode_seconds,
        "decode_tokens_per_second": len(answer.tokens) / answer.decode_seconds
        if answer.tokens and answer.decode_seconds > 0 else None,
    }


def _perplexity_fields(model, result: TeacherForced) -> dict:
    """What a `ppl` sample adds: the score is top-1 next-token accuracy; ``nll``, ``perplexity``, ``eval_tokens``."""
    fed = result.context_tokens + result.eval_tokens - 1
    return {
        "prediction": "", "score": result.accuracy, "nll": result.nll, "perplexity": result.perplexity,
        "eval_tokens": result.eval_tokens, "context_tokens": result.context_tokens, "prompt_tokens": fed,
        "new_tokens": 0, "kv_bytes": result.kv_bytes, "kv_bytes_uncompressed": uncompressed_bytes(model, fed),
        "prefill_seconds": result.prefill_seconds, "decode_seconds": result.eval_seconds,
        "decode_tokens_per_second": None,
    }


def _answers(model, tokenizer, config: BenchConfig, cell: Cell, sample: Sample, missing: list[int], device):
    """(question index, Answer, PeakMemory) for each missing question. Query-agnostic asks every question of the
    sample on forks of one compressed context (question 0's prefill time includes it) and yields the missing ones;
    query-aware runs each missing question as its own prompt."""
    if sample.metric == PERPLEXITY:  # no question: both settings compress the text alone
        with PeakMemory(device) as memory:
            result = teacher_forced(model, tokenizer, sample.context, method=cell.compressor,
                                    eval_tokens=sample.meta["eval_tokens"], prefill_chunk=config.prefill_chunk)
        yield 0, result, memory
        return
    kwargs = dict(method=cell.compressor, max_new_tokens=config.max_new_tokens, prefill_chunk=config.prefill_chunk,
                  fast=config.fast)
    if cell.setting == "agnostic":
        with PeakMemory(device) as memory:
            answers = generate(model, tokenizer, context=sample.context, question=list(sample.questions),
                               agnostic=True, **kwargs)
        for q in missing:
            yield q, answers[q], memory
        return
    for q in missing:
        with PeakMemory(device) as memory:
            answer = generate(model, tokenizer, context=sample.context, question=sample.questions[q], **kwargs)[0]
        yield q, answer, memory
