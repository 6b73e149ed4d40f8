"""IAPT with transformers' static KV cache (``generate(cache_implementation="static")``).

The prefix takes the first T slots of every layer's static buffers; the tokens must be those of
the dynamic cache (itself checked against the slow, literal reference in test_model.py), and
the generators must run once, at prefill. The compiled decode step is in test_compile_model.py.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from iapt_fast import IAPTConfig
from slow_reference import padded_batch, slow_greedy, tiny_model
from test_model import FAMILIES, CallCounter, weights_of, wrap

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 6


def _generate(wrapped, ids, mask, inst, **kwargs):
    return wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=NEW,
                            min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_gives_the_dynamic_tokens_with_the_prefix_in_the_first_slots(family, monkeypatch):
    model = tiny_model(family, "sdpa")
    wrapped = wrap(model)
    num_tokens = wrapped.peft_config["default"].num_soft_tokens
    ids, mask, inst = padded_batch(3, 9, "left", seed=hash(family) % 1000)
    dynamic = _generate(wrapped, ids, mask, inst, return_dict_in_generate=True)
    counter = CallCounter(monkeypatch)
    static = _generate(wrapped, ids, mask, inst, cache_implementation="static", return_dict_in_generate=True)
    assert counter.calls == model.config.num_hidden_layers  # once per layer, at prefill; decode steps: none
    assert isinstance(static.cache.storage, StaticCache) and isinstance(dynamic.cache.storage, DynamicCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.equal(static.sequences, slow_greedy(model, weights_of(wrapped), ids, mask, inst, NEW))
    filled = num_tokens + ids.shape[1] + NEW - 1  # the last token is never written back
    for layer, (s, d) in enumerate(zip(static.cache.layers, dynamic.cache.layers)):
        assert s.max_cache_len == num_tokens + ids.shape[1] + NEW, layer
        assert s.keys[:, :, :num_tokens].abs().max() > 0, "the prefix slots are empty"
        torch.testing.assert_close(s.keys[:, :, :filled], d.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(s.values[:, :, :filled], d.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("search", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)],
                         ids=["beam", "beam-return2"])
def test_static_cache_beam_search_with_mixed_adapters_and_base_rows(family, search):
    model = tiny_model(family, "sdpa")
    wrapped = wrap(model)
    wrapped.add_adapter("other", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=5)
    ids, mask, inst = padded_batch(3, 8, "left", seed=11)
    names = ["other", "__base__", "default"]
    dynamic = _generate(wrapped, ids, mask, inst, adapter_names=names, **search)
    static = _generate(wrapped, ids, mask, inst, adapter_names=names, cache_implementation="static", **search)
    assert torch.equal(static, dynamic)
    base = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, **search)
    rows = search.get("num_return_sequences", 1)
    assert torch.equal(static[rows:2 * rows], base[rows:2 * rows])  # the base row is the bare backbone's
    assert not torch.equal(static, base), "the adapters change nothing: the test is vacuous"


def test_static_cache_with_partial_target_layers_and_a_rolling_sliding_window():
    # Mistral's static sliding layers keep only the window: past it they roll, and the prefix
    # leaves the window as literally prepended tokens would (the slow reference).
    model = tiny_model("mistral", "sdpa")
    model.config.sliding_window = 7
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 9, "none", seed=71)
    static = _generate(wrapped, ids, mask, inst, cache_implementation="static")
    assert torch.equal(static, slow_greedy(model, weights_of(wrapped), ids, mask, inst, NEW))
    part = tiny_model("llama", "sdpa", layers=3)
    wrapped = wrap(part, target_layers=[1])
    ids, mask, inst = padded_batch(3, 8, "left", seed=13)
    assert torch.equal(_generate(wrapped, ids, mask, inst, cache_implementation="static"),
                       _generate(wrapped, ids, mask, inst))


def test_static_cache_from_the_generation_config_and_a_caller_max_cache_len():
    model = tiny_model("llama", "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 7, "left", seed=17)
    dynamic = _generate(wrapped, ids, mask, inst)
    model.generation_config.cache_implementation = "static"
    out = _generate(wrapped, ids, mask, inst, max_cache_len=40, return_dict_in_generate=True)
    assert isinstance(out.cache.storage, StaticCache) and torch.equal(out.sequences, dynamic)
    assert out.cache.layers[0].max_cache_len == 4 + 40  # room for 40 real tokens, as the caller asked
    with pytest.raises(ValueError, match="cache_implementation='quantized' is not supported"):
        _generate(wrapped, ids, mask, inst, cache_implementation="quantized")


def test_manual_decoding_with_a_static_cache_matches_the_dynamic_cache():
    model = tiny_model("qwen3", "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 7, "left", seed=19)
    logits = {}
    for kind in ("dynamic", "static"):
        cache = StaticCache(config=model.config, max_cache_len=4 + 7 + 3) if kind == "static" else None
        with torch.no_grad():
            out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, use_cache=True, cache=cache)
            steps, step_mask = [out.logits[:, -1]], mask
            for _ in range(3):
                token = steps[-1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)
                out = wrapped(input_ids=token, attention_mask=step_mask, cache=out.cache, use_cache=True)
                steps.append(out.logits[:, -1])
        logits[kind] = torch.stack(steps)
    torch.testing.assert_close(logits["static"], logits["dynamic"], rtol=0, atol=1e-5)


def test_a_static_cache_without_room_for_the_prefix_is_refused():
    model = tiny_model("llama", "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 7, "left", seed=23)
    with torch.no_grad(), pytest.raises(ValueError, match="the static cache holds 8 tokens per layer"):
        wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, use_cache=True,
                cache=StaticCache(config=model.config, max_cache_len=8))
    cache = StaticCache(config=model.config, max_cache_len=4 + 7)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, use_cache=True, cache=cache)
        with pytest.raises(ValueError, match="needs 12"):
            wrapped(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=out.cache)


def test_a_static_cache_reused_after_reset_and_one_initialised_early():
    # A cache object outlives its call: after reset() it must hold no trace of the previous
    # call's layout (which layers hid the prefix), and an early-initialised empty cache is a
    # prefill like a lazy one.
    model = tiny_model("llama", "sdpa", layers=3)
    wrapped = wrap(model)
    wrapped.add_adapter("part", IAPTConfig(bottleneck_dim=8, init_std_up=0.5, target_layers=[1]), seed=3)
    ids, mask, inst = padded_batch(2, 7, "left", seed=29)
    cache = StaticCache(config=model.config, max_cache_len=4 + 7)
    with torch.no_grad():
        for name in ("part", "default", "part"):
            want = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=[name] * 2).logits
            cache.reset()
            got = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=[name] * 2,
                          use_cache=True, cache=cache).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
        early = StaticCache(config=model.config, max_cache_len=4 + 7)
        early.early_initialization(batch_size=2, num_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
        got = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, use_cache=True, cache=early).logits
        want = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_which_generate_calls_may_compile_their_decode_step():
    """The calls that hold the compile gate exclusively: a static cache that transformers
    compiles (an accelerator, or a compile config for every device), never a dynamic cache."""
    from iapt_fast.compat import decode_compile_config
    from iapt_fast.model.call_state import decode_step_may_compile

    model = tiny_model("llama")
    cpu_config = decode_compile_config("cpu")
    assert decode_step_may_compile(model, dict(cache_implementation="static", compile_config=cpu_config))
    assert not decode_step_may_compile(model, dict(cache_implementation="static"))  # CPU: transformers does not
    assert not decode_step_may_compile(model, dict(cache_implementation="static", compile_config=cpu_config,
                                                   disable_compile=True))
    assert not decode_step_may_compile(model, dict(compile_config=cpu_config))  # dynamic cache
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = cpu_config
    assert decode_step_may_compile(model, {})
