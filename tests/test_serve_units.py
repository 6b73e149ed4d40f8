"""The parts of vLLM serving that need no engine: placeholder headers, finding fresh prefills,
injecting P_l, and the refusals at start (runs with or without vLLM installed)."""
from __future__ import annotations

import random

import pytest
import torch

from iapt_fast import IAPTConfig
from iapt_fast.generator import functional
from iapt_fast.serve.adapters import AdapterSpec, ServedAdapters, parse_adapter_spec
from iapt_fast.serve.injection import LayerInjector, find_fresh_prefills
from iapt_fast.serve.options import RequestPreparer, codec_for, engine_kwargs
from iapt_fast.serve.placeholders import PlaceholderCodec
from serve_fixtures import save_adapters
from slow_reference import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("vocab,adapters,max_len", [(448, 4, 256), (50, 7, 4096), (32000, 100, 131072)])
def test_codec_round_trips_every_slot_and_length(vocab, adapters, max_len):
    codec = PlaceholderCodec(vocab, adapters, max_len)
    rng = random.Random(vocab)
    for _ in range(300):
        slot, length = rng.randrange(adapters), rng.randint(1, max_len)
        ids = codec.encode(slot, codec.min_soft_tokens + rng.randrange(3), length)
        assert all(0 <= t < vocab for t in ids) and ids.count(codec.marker) == 1
        assert codec.decode(ids[:codec.min_soft_tokens]) == (slot, length)
    assert codec.decode([codec.marker - 1] + [0] * codec.digits) is None  # no marker: a base prompt


def test_codec_refuses_too_few_soft_tokens_and_bad_lengths():
    codec = PlaceholderCodec(448, 4, 256)
    with pytest.raises(ValueError, match="num_soft_tokens >= 3"):
        codec.encode(0, 1, 10)
    with pytest.raises(ValueError, match="prompt_length"):
        codec.encode(0, 4, 257)
    with pytest.raises(ValueError, match="slot"):
        codec.encode(4, 4, 10)


def _save(tmp_path, model, configs: dict[str, IAPTConfig]) -> list[AdapterSpec]:
    return [AdapterSpec(name, path) for name, path in save_adapters(model, str(tmp_path), configs).items()]


def test_adapters_that_do_not_fit_are_refused_naming_them(tmp_path):
    model = tiny_model("llama")
    specs = _save(tmp_path, model, {"ok": IAPTConfig(bottleneck_dim=8),
                                    "partial": IAPTConfig(bottleneck_dim=8, target_layers=[1])})
    cfg = model.config
    served = ServedAdapters(specs[:1], "llama", cfg.hidden_size, cfg.num_hidden_layers)
    assert served.names == ["ok"] and served.slots[0].num_tokens == 4
    with pytest.raises(ValueError, match="'partial'.*target_layers"):
        ServedAdapters(specs, "llama", cfg.hidden_size, cfg.num_hidden_layers)
    with pytest.raises(ValueError, match="'ok'.*does not fit"):
        ServedAdapters(specs[:1], "llama", cfg.hidden_size * 2, cfg.num_hidden_layers)
    with pytest.raises(ValueError, match="families"):
        ServedAdapters(specs[:1], "gpt2", cfg.hidden_size, cfg.num_hidden_layers)
    with pytest.raises(ValueError, match="reserved"):
        ServedAdapters([AdapterSpec("base", specs[0].path)], "llama", cfg.hidden_size, cfg.num_hidden_layers,
                       base_name="base")
    with pytest.raises(ValueError, match="NAME=ADAPTER_DIR"):
        parse_adapter_spec("no-equals-sign")


@pytest.mark.parametrize("option,value,message", [
    ("enable_chunked_prefill", True, "enable_chunked_prefill"),
    ("enforce_eager", False, "enforce_eager"),
    ("speculative_config", {"method": "ngram"}, "speculative"),
    ("pipeline_parallel_size", 2, "pipeline_parallel"),
])
def test_engine_options_that_would_serve_wrong_are_refused(option, value, message):
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match=message):
        engine_kwargs(config, [], {option: value})
    kwargs = engine_kwargs(config, [], {"dtype": "float32"})
    assert kwargs["enable_chunked_prefill"] is False and kwargs["enforce_eager"] is True
    assert kwargs["hf_overrides"]["architectures"] == ["IAPTLlamaForCausalLM"]


def test_fresh_prefills_and_injection_match_the_generator_on_each_prompt(tmp_path):
    """A step of four segments: a fresh IAPT prefill, a decode row, a base prefill, and a fresh
    prefill recomputed after preemption (its generated tokens follow the prompt and must not be
    pooled). The placeholder rows' layer input becomes P_l of each prompt alone (pooled from the
    normed or the raw layer input, as the adapter says) and their normed input its norm; no other
    row changes."""
    model = tiny_model("llama")
    cfg = model.config
    specs = _save(tmp_path, model, {"a": IAPTConfig(bottleneck_dim=8, init_std_up=0.5),
                                    "c": IAPTConfig.paper(bottleneck_dim=8, init_std_up=0.5)})
    adapters = ServedAdapters(specs, "llama", cfg.hidden_size, cfg.num_hidden_layers)
    codec = codec_for(cfg.vocab_size, 2, 64)
    prep = RequestPreparer(adapters, codec)
    gen = torch.Generator().manual_seed(3)
    prompt_a = torch.randint(3, 60, (7,), generator=gen).tolist()
    prompt_c = torch.randint(3, 60, (5,), generator=gen).tolist()
    generated = [11, 12, 13]
    seg_a, _ = prep.prepare(prompt_a, "a")
    seg_c, _ = prep.prepare(prompt_c, "c")
    segments = [(seg_a, 0), ([9], 20), (torch.randint(3, 60, (6,), generator=gen).tolist(), 0),
                (seg_c + generated, 0)]
    ids, pos, bounds = [], [], [0]
    for seg, first in segments:
        ids += seg
        pos += list(range(first, first + len(seg)))
        bounds.append(len(ids))
    fresh = find_fresh_prefills(torch.tensor(ids), torch.tensor(pos), torch.tensor(bounds), codec, adapters)
    assert [(f.start, f.slot, f.num_tokens, f.prompt_length) for f in fresh] == \
        [(0, 0, 4, 7), (bounds[3], 1, 4, 5)]
    layer_input = torch.randn(len(ids), cfg.hidden_size, generator=gen)
    norm = model.model.layers[1].input_layernorm
    normed = norm(layer_input)
    injector = LayerInjector(adapters, fresh, len(ids), torch.device("cpu"))
    # Every row but the two fresh prefills' 4 placeholders keeps its MLP (serve/vllm_model.py).
    placeholders = set(range(0, 4)) | set(range(bounds[3], bounds[3] + 4))
    assert injector.kept_rows.tolist() == [r for r in range(len(ids)) if r not in placeholders]
    out_normed, out_input = normed.clone(), layer_input.clone()
    injector(1, out_normed, out_input, norm)
    touched = torch.zeros(len(ids), dtype=torch.bool)
    for item, name, length in ((fresh[0], "a", 7), (fresh[1], "c", 5)):
        rows = slice(item.start + 4, item.start + 4 + length)
        config = adapters.configs[name]
        source = (normed if config.pool_input == "normed" else layer_input)[rows][None]
        slot = adapters.slots[adapters.slot_of(name)]
        weights = {w: t[slot.index:slot.index + 1] for w, t in slot.pack.weights[1].items()}
        expect = functional.prompt_generator(source, torch.ones(1, length, dtype=torch.long), **weights, backend="torch",
                                             rational_version=config.rational_version)[0]
        placeholder_rows = slice(item.start, item.start + 4)
        assert (out_input[placeholder_rows] - expect).abs().max().item() <= 1e-5
        assert (out_normed[placeholder_rows] - norm(expect)).abs().max().item() <= 1e-5
        touched[placeholder_rows] = True
    assert torch.equal(out_input[~touched], layer_input[~touched]) and torch.equal(out_normed[~touched], normed[~touched])


def test_base_prompts_that_look_like_a_header_are_refused():
    cfg = tiny_model("llama").config
    codec = codec_for(cfg.vocab_size, 1, 256)
    prep = RequestPreparer(ServedAdapters([], "llama", cfg.hidden_size, cfg.num_hidden_layers), codec)
    assert prep.prepare([codec.marker - 1, 5, 6], None) == ([codec.marker - 1, 5, 6], None)
    with pytest.raises(ValueError, match="placeholder header"):
        prep.prepare([codec.marker, 5, 6], None)
