"""Evaluation helpers shared by the trainer and the quality report.

Works for any causal LM whose forward takes ``input_ids``/``attention_mask`` and returns
``.logits`` — IAPTModel (which also gets the ``instruction_mask``), PEFT models, plain
transformers models — so every method of a comparison is measured by the same code.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iapt_fast.training.data import IGNORE_INDEX, IAPTCollator, _special_prefix, tokenize_pair

__all__ = ["accepts_instruction_mask", "model_inputs", "response_loss_sum", "evaluate_loss", "score_choices", "choice_examples", "response_loss_totals",
           "wilson_interval"]


def accepts_instruction_mask(model: nn.Module) -> bool:
    """Whether ``model.forward`` names an ``instruction_mask`` argument (IAPTModel does).

    ``**kwargs`` does not count: PEFT models forward unknown keywords to the backbone, which
    would reject it.
    """
    try:
        return "instruction_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(batch: Mapping[str, Tensor], with_instruction_mask: bool, device: torch.device | str) -> dict[str, Tensor]:
    """The keyword arguments of one forward (no labels: the caller computes the loss)."""
    out = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if with_instruction_mask:
        out["instruction_mask"] = batch["instruction_mask"].to(device)
    return out


def _align(logits: Tensor, n: int) -> Tensor:
    # Input-level prompt tuning returns logits for its virtual tokens too, prepended: keep the
    # last n positions, the ones of the real tokens.
    return logits[:, -n:] if logits.shape[1] != n else logits


def response_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    logits: [B, N', V] (N' ≥ N, extra leading positions dropped); labels: [B, N] with
    IGNORE_INDEX where no loss is wanted. Only labelled rows of the logits are upcast to
    float32, never the whole [B, N, V] tensor.
    """
    logits = _align(logits, labels.shape[1])
    targets = labels[:, 1:]
    keep = targets.ne(IGNORE_INDEX)
    picked = logits[:, :-1][keep].float()
    count = int(keep.sum())
    if count == 0:
        return logits.new_zeros((), dtype=torch.float32), 0
    return F.cross_entropy(picked, targets[keep], reduction="sum"), count


@torch.no_grad()
def response_loss_totals(model: nn.Module, examples: Sequence[Any], collator: IAPTCollator, batch_size: int,
                         with_mask: bool, device: torch.device | str, real: int | None = None) -> tuple[float, int]:
    """(summed response loss, response-token count) over ``examples`` in eval mode.

    Rows from index ``real`` on are padding (a sharded evaluation's filler): they run the
    forward, so every rank does the same work, but add nothing.
    """
    real = len(examples) if real is None else real
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start:start + batch_size])
            labels = batch["labels"]
            if start + batch_size > real:
                labels = labels.clone()
                labels[max(real - start, 0):] = IGNORE_INDEX
            logits = model(**model_inputs(batch, with_mask, device)).logits
            loss, n = response_loss_sum(logits, labels.to(device))
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total, count


def evaluate_loss(model: nn.Module, examples: Sequence[Mapping[str, Sequence[int]]], collator: IAPTCollator,
                  batch_size: int = 32, device: torch.device | str | None = None) -> float:
    """Token-weighted mean response loss over ``examples`` (tokenized, with labels)."""
    device = device or next(model.parameters()).device
    total, count = response_loss_totals(model, examples, collator, batch_size,
                                        accepts_instruction_mask(model), device)
    return total / max(count, 1)


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer: Any, prompts: Sequence[str], choices: Sequence[str],
                  batch_size: int = 32, max_length: int | None = None, padding_side: str = "right",
                  device: torch.device | str | None = None, progress: Any = None) -> Tensor:
    """Log-likelihood of every choice after every prompt: [len(prompts), len(choices)] float32.

    When every choice is one token, one forward per batch of prompts reads the next-token
    distribution at the prompt's last position; otherwise each (prompt, choice) pair is run
    and the choice's token log-probabilities are summed. The instruction mask is the prompt,
    as in training.
    """
    if len(choices) < 2:
        raise ValueError(f"choices must name at least two options, got {list(choices)!r}")
    device = device or next(model.parameters()).device
    with_mask = accepts_instruction_mask(model)
    collator = IAPTCollator.from_tokenizer(tokenizer, padding_side=padding_side)
    prefix = _special_prefix(tokenizer)
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if any(len(ids) == 0 for ids in choice_ids):
        raise ValueError(f"a choice tokenizes to nothing: {list(choices)!r}")
    single = all(len(ids) == 1 for ids in choice_ids)
    was_training = model.training
    model.eval()
    scores = torch.empty(len(prompts), len(choices), dtype=torch.float32)
    try:
        if single:
            ids = torch.tensor([c[0] for c in choice_ids], device=device)
            # Room for the answer token, as in training.
            limit = None if max_length is None else max_length - 1
            exs = [tokenize_pair(tokenizer, p, None, limit, special_prefix=prefix) for p in prompts]
            # Batches of similar length waste little on padding; rows go back in place below.
            order = sorted(range(len(exs)), key=lambda i: len(exs[i]["input_ids"]))
            for start in range(0, len(exs), batch_size):
                idx = order[start:start + batch_size]
                batch = collator([exs[i] for i in idx])
                logits = _align(model(**model_inputs(batch, with_mask, device)).logits, batch["input_ids"].shape[1])
                mask = batch["attention_mask"].to(device)
                last = (mask.shape[1] - 1 - mask.flip(1).argmax(1)) if padding_side == "right" else \
                    torch.full((mask.shape[0],), mask.shape[1] - 1, device=device)
                rows = logits[torch.arange(len(last), device=device), last].float().log_softmax(-1)
                scores[idx] = rows[:, ids].cpu()
                if progress is not None:
                    progress.update(len(last))
        else:
            for c, choice in enumerate(choices):
                exs = [tokenize_pair(tokenizer, p, choice, max_length, add_eos=False, special_prefix=prefix)
                       for p in prompts]
                order = sorted(range(len(exs)), key=lambda i: len(exs[i]["input_ids"]))
                for start in range(0, len(exs), batch_size):
                    idx = order[start:start + batch_size]
                    batch = collator([exs[i] for i in idx])
                    logits = _align(model(**model_inputs(batch, with_mask, device)).logits, batch["input_ids"].shape[1])
                    labels = batch["labels"].to(device)[:, 1:]
                    logp = logits[:, :-1].float().log_softmax(-1)
                    keep = labels.ne(IGNORE_INDEX)
                    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                    scores[idx, c] = (tok * keep).sum(1).cpu()
                    if progress is not None:
                        progress.update(len(labels) / len(choices))
    finally:
        model.train(was_training)
    return scores


def choice_examples(pairs: Sequence[tuple[str, str]], choices: Sequence[str]) -> tuple[list[str], list[int]]:
    """(prompts, gold choice index) of the (prompt, response) pairs whose response is a choice."""
    prompts, gold = [], []
    for prompt, response in pairs:
        if response in choices:
            prompts.append(prompt)
            gold.append(list(choices).index(response))
    return prompts, gold


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
