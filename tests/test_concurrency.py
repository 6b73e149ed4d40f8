"""Concurrent calls on one IAPTModel: every call sees only its own prefill request.

A serving library is called from threads (web servers, batching front-ends). Each call below
runs on a shared IAPTModel from several threads at once and must give exactly what the same
call gives alone, whatever the other threads do (other adapters, batch sizes, generate
settings, forward with and without a cache).
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from iapt_fast import IAPTConfig, get_iapt_model
from slow_reference import padded_batch, tiny_model

THREADS = 4
CALLS_PER_THREAD = 30


def _scenarios():
    out = []
    for i, (rows, side, kind) in enumerate([
        (["A", "A"], "left", "greedy"),
        (["B", "B", "B"], "left", "greedy"),
        (["A", "B"], "left", "beam"),
        (["B", "__base__", "A"], "left", "greedy"),
        (["A"], "none", "forward"),
        (["B", "A", "B", "A"], "right", "forward"),
        (["A", "B", "B"], "left", "return2"),
    ]):
        ids, mask, inst = padded_batch(len(rows), 7 + i, side, seed=100 + i)
        out.append(dict(rows=rows, ids=ids, mask=mask, inst=inst, kind=kind))
    return out


def _call(model, sc):
    with torch.no_grad():
        if sc["kind"] == "forward":
            return model(input_ids=sc["ids"], attention_mask=sc["mask"], instruction_mask=sc["inst"],
                         adapter_names=sc["rows"]).logits
        extra = {"greedy": dict(do_sample=False), "beam": dict(num_beams=2, do_sample=False),
                 "return2": dict(num_beams=2, num_return_sequences=2, do_sample=False)}[sc["kind"]]
        return model.generate(sc["ids"], attention_mask=sc["mask"], instruction_mask=sc["inst"],
                              adapter_names=sc["rows"], max_new_tokens=4, min_new_tokens=4, pad_token_id=0, **extra)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_threads_get_their_own_results(family):
    model = get_iapt_model(tiny_model(family), IAPTConfig(bottleneck_dim=8, init_std_up=0.5), adapter_name="A",
                           seed=1, backend="torch")
    model.add_adapter("B", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2)
    scenarios = _scenarios()
    alone = [_call(model, sc) for sc in scenarios]
    # The adapters matter for every scenario (else a lost prefix could pass unnoticed).
    bare = [_call(model, dict(sc, rows=["__base__"] * len(sc["rows"]))) for sc in scenarios]
    assert all(not torch.equal(a, b) for a, b in zip(alone, bare))

    def worker(seed: int) -> list[tuple[int, torch.Tensor]]:
        rng = random.Random(seed)
        done = []
        for _ in range(CALLS_PER_THREAD):
            k = rng.randrange(len(scenarios))
            done.append((k, _call(model, scenarios[k])))
        return done

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for chunk in pool.map(worker, range(THREADS)) for r in chunk]
    wrong = [k for k, got in results if got.shape != alone[k].shape or not torch.allclose(got, alone[k], rtol=0, atol=1e-6)]
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent calls differ from the same call alone: {wrong[:10]}"
