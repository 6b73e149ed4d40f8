"""Concurrent calls on one IAPTModel: every call sees only its own prefill request.

A serving library is called from threads (web servers, batching front-ends). Each call below
runs on a shared IAPTModel from several threads at once and must give exactly what the same
call gives alone, whatever the other threads do (other adapters, batch sizes, generate
settings, forward with and without a cache).
"""
from __future__ import annotations

import random
import sys
import threading
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


def _delete_after_validation(model, name):
    """Delete adapter ``name`` once the call has been validated, just before its prefill (a
    thread's delete_adapter landing in that window, deterministically)."""
    def hook(module, args, kwargs):
        if name in model.adapter_names:
            model.delete_adapter(name)
    return model.base_model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


@pytest.mark.parametrize("deleted", ["B", "C"])
def test_a_call_racing_delete_adapter_runs_the_adapters_it_validated(deleted):
    """Deleting an adapter while a call runs never fails the call, and never changes what it
    computes: it runs the adapters it validated (C: another one; B: its own)."""
    model = get_iapt_model(tiny_model("llama"), IAPTConfig(bottleneck_dim=8, init_std_up=0.5), adapter_name="A",
                           seed=1, backend="torch")
    model.add_adapter("B", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2)
    model.add_adapter("C", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=3)
    sc = _scenarios()[3]  # rows B, base, A
    alone = _call(model, sc)
    handle = _delete_after_validation(model, deleted)
    try:
        raced = _call(model, sc)
    finally:
        handle.remove()
    assert deleted not in model.adapter_names
    assert torch.equal(raced, alone)
    if deleted == "B":
        with pytest.raises(ValueError, match="unknown adapter 'B'"):
            _call(model, sc)


def test_calls_while_another_thread_adds_and_deletes_adapters():
    """A thread that adds and deletes an adapter the calls never use cannot make them fail or
    change their result (the serving packs are rebuilt underneath them all the while)."""
    model = get_iapt_model(tiny_model("gpt2"), IAPTConfig(bottleneck_dim=8, init_std_up=0.5), adapter_name="A",
                           seed=1, backend="torch")
    model.add_adapter("B", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2)
    scenarios = [sc for sc in _scenarios() if sc["kind"] in ("forward", "greedy")]
    alone = [_call(model, sc) for sc in scenarios]
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            model.add_adapter("X", IAPTConfig.paper(bottleneck_dim=8), seed=i)  # no backbone run: a short cycle
            model.delete_adapter("X")
            i += 1

    churner = threading.Thread(target=churn)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race windows are a few bytecodes wide
    churner.start()
    try:
        results = [(k, _call(model, scenarios[k])) for k in list(range(len(scenarios))) * 20]
    finally:
        stop.set()
        churner.join()
        sys.setswitchinterval(interval)
    wrong = [k for k, got in results if not torch.equal(got, alone[k])]
    assert not wrong, wrong


@pytest.mark.parametrize("family", ["llama"])  # its attention is one transformers routes through `kernels`
def test_a_decode_step_compiling_while_other_threads_call_eagerly(family):
    """torch's is-compiling flag is process-wide: while one thread compiles a decode step, eager
    calls in other threads must not run transformers' and kernels' code (they would take its
    compile-only paths: `TypeError: expected an instance of Token`). Each repetition compiles
    afresh while two threads are calling eagerly; every result must be the one of the call alone."""
    from iapt_fast.compat import decode_compile_config

    model = get_iapt_model(tiny_model(family), IAPTConfig(bottleneck_dim=8, init_std_up=0.5), adapter_name="A",
                           seed=1, backend="torch")
    model.add_adapter("B", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2)
    scenarios = [sc for sc in _scenarios() if sc["kind"] in ("forward", "greedy", "beam")]
    alone = [_call(model, sc) for sc in scenarios]
    ids, mask, inst = padded_batch(2, 7, "left", seed=7)
    compiled_kwargs = dict(attention_mask=mask, instruction_mask=inst, adapter_names=["A", "B"], max_new_tokens=4,
                           min_new_tokens=4, pad_token_id=0, do_sample=False)
    want = model.generate(ids, **compiled_kwargs)  # the dynamic cache's tokens: what the static cache gives
    for repetition in range(4):
        torch._dynamo.reset()  # this repetition compiles again
        stop, started, errors, results = threading.Event(), threading.Barrier(3), [], []

        def eager(seed: int) -> None:
            rng = random.Random(seed)
            try:
                started.wait()
                while not stop.is_set():
                    k = rng.randrange(len(scenarios))
                    results.append((k, _call(model, scenarios[k])))
            except Exception as err:  # noqa: BLE001 - reported below, with its type
                errors.append(err)

        threads = [threading.Thread(target=eager, args=(repetition * 10 + i,)) for i in range(2)]
        for t in threads:
            t.start()
        started.wait()
        while len(results) < 2 and not errors:  # the eager threads are in full swing
            threading.Event().wait(0.01)
        try:
            got = model.generate(ids, cache_implementation="static",
                                 compile_config=decode_compile_config("cpu", fullgraph=True), **compiled_kwargs)
            assert hasattr(model.base_model, "_compiled_call"), "generate() did not compile the decode step"
        finally:
            count = len(results)
            while len(results) < count + 2 and not errors:  # and go on after the compile
                threading.Event().wait(0.01)
            stop.set()
            for t in threads:
                t.join()
        assert not errors, f"repetition {repetition}: {errors[0]!r}"
        assert torch.equal(got, want)
        wrong = [k for k, out in results if out.shape != alone[k].shape or not torch.equal(out, alone[k])]
        assert not wrong, f"repetition {repetition}: {len(wrong)} of {len(results)} eager calls differ"


def test_the_compile_gate_keeps_an_exclusive_holder_apart_from_shared_ones():
    """Shared holders overlap; an exclusive one waits for those in flight, and shared ones that
    come while it waits or runs wait for it (it cannot be starved)."""
    from iapt_fast.model.iapt_model import CompileGate

    gate, log, lock = CompileGate(), [], threading.Lock()
    inside, release = threading.Event(), threading.Event()

    def hold(kind: str, event: threading.Event | None = None) -> None:
        with (gate.exclusive() if kind == "x" else gate.shared()):
            with lock:
                log.append(f"{kind}+")
            if event is not None:
                event.set()
                release.wait(10)
            with lock:
                log.append(f"{kind}-")

    first = threading.Thread(target=hold, args=("s1", inside))
    first.start()
    inside.wait(10)
    with gate.shared():  # shared holders overlap (and a nested hold in one thread passes through)
        with gate.exclusive():
            pass
    exclusive = threading.Thread(target=hold, args=("x",))
    exclusive.start()
    while not gate._waiting:  # the exclusive holder waits for s1
        threading.Event().wait(0.001)
    late = threading.Thread(target=hold, args=("s2",))
    late.start()
    threading.Event().wait(0.05)
    assert log == ["s1+"]  # neither the exclusive nor the late shared holder got in
    release.set()
    for t in (first, exclusive, late):
        t.join(10)
    assert log == ["s1+", "s1-", "x+", "x-", "s2+", "s2-"]
