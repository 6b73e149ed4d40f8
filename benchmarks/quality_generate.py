"""Scoring of the quality report's generative tasks: greedy ``generate()`` (the path users serve)
scored by exact match, token F1 and chrF, with 95 % intervals.

Every method goes through its own ``generate()``: ``IAPTModel.generate`` for IAPT, PEFT's for
LoRA / prompt / prefix tuning, transformers' for the zero-shot backbone; the same prompts, the
same left padding, greedy decoding, the same answer budget and the same scorer.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter
from typing import Any, Sequence

import torch

Z95 = 1.959963984540054


def normalize(text: str) -> str:
    """The answer as scored: its first line, surrounding space stripped, inner space collapsed."""
    return " ".join(text.strip().split("\n", 1)[0].split()) if text.strip() else ""


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", normalize(text).lower())


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style F1 over lower-cased word and punctuation tokens (1.0 when both are empty)."""
    p, g = _tokens(pred), _tokens(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def chrf(pred: str, gold: str, max_order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF (Popović 2015): character n-gram F-beta, n = 1..6 averaged, spaces removed,
    case kept (a capitalisation task must count case); orders longer than both strings are skipped."""
    p, g = normalize(pred).replace(" ", ""), normalize(gold).replace(" ", "")
    if not p or not g:
        return float(p == g)
    precisions, recalls = [], []
    for n in range(1, max_order + 1):
        pn = Counter(p[i:i + n] for i in range(len(p) - n + 1))
        gn = Counter(g[i:i + n] for i in range(len(g) - n + 1))
        if not pn or not gn:
            continue
        common = sum((pn & gn).values())
        precisions.append(common / sum(pn.values()))
        recalls.append(common / sum(gn.values()))
    prec, rec = statistics.mean(precisions), statistics.mean(recalls)
    if prec + rec == 0:
        return 0.0
    return (1 + beta ** 2) * prec * rec / (beta ** 2 * prec + rec)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """95 % normal interval of the mean of ``values`` (clipped to [0, 1]; scores live there)."""
    n = len(values)
    if n == 0:
        raise ValueError("values must not be empty")
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(n) if n > 1 else 0.0
    return max(0.0, mean - half), min(1.0, mean + half)


def score_answers(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, Any]:
    """Exact match (with its Wilson interval), token F1 and chrF (means, normal intervals)."""
    from iapt_fast.training.evaluation import wilson_interval

    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"predictions and golds must be non-empty and of one length, got "
                         f"{len(predictions)} and {len(golds)}")
    exact = [normalize(p) == normalize(g) for p, g in zip(predictions, golds)]
    f1 = [token_f1(p, g) for p, g in zip(predictions, golds)]
    cf = [chrf(p, g) for p, g in zip(predictions, golds)]
    correct = sum(exact)
    return {"accuracy": correct / len(golds), "ci95": list(wilson_interval(correct, len(golds))), "n": len(golds),
            "correct": correct, "f1": statistics.fmean(f1), "f1_ci95": list(mean_interval(f1)),
            "f1_scores": f1, "chrf": statistics.fmean(cf), "chrf_ci95": list(mean_interval(cf)), "chrf_scores": cf}


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int = 32, progress: Any = None) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (decoded new tokens, special tokens dropped).

    The prompt is tokenized as in training (BOS, no chat template) and left-padded; decoding
    stops at EOS or after ``max_new_tokens``.
    """
    from iapt_fast.training.data import IAPTCollator, _special_prefix, tokenize_pair

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    collator = IAPTCollator.from_tokenizer(tokenizer, padding_side="left")
    prefix = _special_prefix(tokenizer)
    exs = [tokenize_pair(tokenizer, p, None, special_prefix=prefix) for p in prompts]
    order = sorted(range(len(exs)), key=lambda i: len(exs[i]["input_ids"]))
    out: list[str] = [""] * len(exs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(exs), batch_size):
            idx = order[start:start + batch_size]
            batch = collator([exs[i] for i in idx])
            ids = batch["input_ids"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=collator.pad_token_id)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True)
            if progress is not None:
                progress.update(len(idx))
    finally:
        model.train(was_training)
    return out


def generative_score(model: torch.nn.Module, tokenizer: Any, data: Sequence[tuple[str, str]], prompt: str,
                     max_new_tokens: int, batch_size: int = 32, progress: Any = None, keep: int = 20
                     ) -> dict[str, Any]:
    """Score ``model`` on (text, answer) rows: greedy answers to ``prompt.format(text=...)``.

    Returns score_answers' dict (per-example F1/chrF lists kept: seeds are pooled from them) plus
    ``examples``: the first ``keep`` (prompt text, gold, prediction) triples, and ``eval_seconds``.
    """
    t0 = time.perf_counter()
    preds = generate_answers(model, tokenizer, [prompt.format(text=t) for t, _ in data], max_new_tokens,
                             batch_size, progress)
    result = score_answers(preds, [a for _, a in data])
    result["examples"] = [[t, a, p] for (t, a), p in list(zip(data, preds))[:keep]]
    result["eval_seconds"] = time.perf_counter() - t0
    return result
