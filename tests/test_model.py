"""IAPTModel on tiny random models of every supported family.

The oracle is tests/slow_reference.py: it literally prepends the soft tokens to every layer's
input, with no hooks and no KV cache.
"""
from __future__ import annotations

import pytest
import torch

from iapt_fast.generator.tolerance import assert_close_by_rule
from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.generator import functional
from slow_reference import VOCAB, padded_batch, slow_greedy, slow_logits, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4  # fp32 logits vs the slow reference


def wrap(model, seed: int = 1, **overrides) -> IAPTModel:
    # W_up larger than the default 0.02 so the prefix visibly changes the logits (a test that
    # compares with and without it must be able to fail).
    cfg = dict(bottleneck_dim=8, init_std_up=0.5)
    cfg.update(overrides)
    return get_iapt_model(model, IAPTConfig(**cfg), seed=seed, backend="torch")


def weights_of(wrapped: IAPTModel, name: str | None = None) -> dict:
    adapter = wrapped.generators[name or wrapped.active_adapter]
    return {layer: adapter[layer].weights() for layer in adapter.layer_indices}


class CallCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = functional.prompt_generator

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(functional, "prompt_generator", counted)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_logits_and_greedy_match_slow_reference(family, attn, side, monkeypatch):
    model = tiny_model(family, attn)
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(3, 9, side, seed=hash((family, attn, side)) % 1000)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        ref = slow_logits(model, weights_of(wrapped), ids, mask, inst)
        base = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    err = (out - ref)[real].abs().max().item()
    assert err <= TOL, f"logits differ from the slow reference by {err:.2e}"
    assert (base - ref)[real].abs().max().item() > 100 * TOL, "the prefix has no visible effect: test is vacuous"
    if side == "right":  # generate() wants left padding (transformers warns); logits are checked above
        return
    counter = CallCounter(monkeypatch)
    tokens = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert counter.calls == len(wrapped.generators[wrapped.active_adapter].layer_indices)
    expected = slow_greedy(model, weights_of(wrapped), ids, mask, inst, 6)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_slow_reference(family):
    model = tiny_model(family, "sdpa")
    wrapped = wrap(model, init_std_up=0.1)
    ids, mask, inst = padded_batch(3, 8, "left", seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, labels=labels).loss.backward()
    params = dict(wrapped.generators.named_parameters())
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    logits = slow_logits(model, weights_of(wrapped), ids, mask, inst)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    for name, p in params.items():
        scale = p.grad.abs().max().item()
        assert scale > 0, f"{name}: zero reference gradient"
        err = (got[name] - p.grad).abs().max().item()
        assert err <= 1e-4 * max(1.0, scale), f"{name}: gradient error {err:.2e} (scale {scale:.2e})"
    assert all(p.grad is None for p in model.parameters()), "the backbone received gradients"


def _toy_task(seed: int):
    """Instruction = 6 random tokens; response = two fixed tokens (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (8, 6), generator=g)
    ids = torch.cat([prompt, torch.full((8, 1), 5), torch.full((8, 1), 7)], dim=1)
    inst = torch.zeros_like(ids)
    inst[:, :6] = 1
    labels = ids.masked_fill(inst.bool(), -100)
    return ids, inst, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_training_with_and_without_checkpointing(family):
    ids, inst, labels = _toy_task(3)
    curves, grads = {}, {}
    for ckpt in (False, True):
        model = tiny_model(family, "sdpa")
        wrapped = wrap(model, seed=5, init_std_up=0.1)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped.train()
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        assert trainable and all(any(p is q for q in wrapped.generators.parameters()) for p in trainable)
        opt = torch.optim.Adam(trainable, lr=3e-2)
        losses = []
        for step in range(30):
            opt.zero_grad()
            loss = wrapped(input_ids=ids, instruction_mask=inst, labels=labels).loss
            loss.backward()
            if step == 0:
                grads[ckpt] = [p.grad.clone() for p in trainable]
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            losses.append(loss.item())
        curves[ckpt] = losses
        assert losses[-1] < 0.5 * losses[0], f"checkpointing={ckpt}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    # Checkpointing replays the layers with the same prefix: identical first-step gradients.
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_scores_follow_the_prefix(family):
    model = tiny_model(family, "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 7, "left", seed=11)
    beams, new = 3, 5
    out = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, num_beams=beams,
                           num_return_sequences=beams, max_new_tokens=new, min_new_tokens=new,
                           length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
                           do_sample=False, pad_token_id=0)
    seqs = out.sequences
    assert seqs.shape == (2 * beams, 7 + new)
    rep = lambda t: t.repeat_interleave(beams, dim=0)  # noqa: E731
    full_mask = torch.cat([rep(mask), torch.ones(2 * beams, new, dtype=torch.long)], dim=1)
    full_inst = torch.cat([rep(inst), torch.zeros(2 * beams, new, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logp = slow_logits(model, weights_of(wrapped), seqs, full_mask, full_inst).log_softmax(-1)
    picked = logp[:, 6:-1].gather(-1, seqs[:, 7:, None])[..., 0].sum(-1)
    # A beam's score is the sum of its tokens' log-probs (length_penalty=0): every beam, after
    # the cache reorders, must still see its own row's prefix.
    torch.testing.assert_close(out.sequences_scores, picked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_sampling_draws_from_the_prefixed_distribution(family):
    model = tiny_model(family, "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 6, "left", seed=13)
    torch.manual_seed(0)
    top_k, new = 3, 6
    seqs = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, do_sample=True, top_k=top_k,
                            num_return_sequences=2, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    rep = lambda t: t.repeat_interleave(2, dim=0)  # noqa: E731
    full_mask = torch.cat([rep(mask), torch.ones(4, new, dtype=torch.long)], dim=1)
    full_inst = torch.cat([rep(inst), torch.zeros(4, new, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = slow_logits(model, weights_of(wrapped), seqs, full_mask, full_inst)
    logits[..., 2] = float("-inf")  # min_new_tokens bans EOS before the top-k filter
    allowed = logits[:, 5:-1].topk(top_k, dim=-1).indices
    assert (allowed == seqs[:, 6:, None]).any(-1).all(), "a sampled token is outside the reference top-k"


def test_target_layers_subset_and_normed_pooling():
    model = tiny_model("llama", "sdpa", layers=3)
    wrapped = wrap(model, target_layers=[-1, 0], pool_input="normed")
    assert wrapped.generators["default"].layer_indices == [0, 2]
    for attn in ("eager", "sdpa"):
        model.config._attn_implementation = attn
        ids, mask, inst = padded_batch(3, 8, "left", seed=17)
        with torch.no_grad():
            out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
            ref = slow_logits(model, weights_of(wrapped), ids, mask, inst, pool_input="normed")
        assert (out - ref)[mask.bool()].abs().max().item() <= TOL
        tokens = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=5,
                                  min_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = slow_greedy(model, weights_of(wrapped), ids, mask, inst, 5, pool_input="normed")
        assert torch.equal(tokens, expected)


def test_manual_decoding_with_the_returned_cache():
    model = tiny_model("qwen2", "eager")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 9, "left", seed=19)
    with torch.no_grad():
        full = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst[:, :9]).logits
        first = wrapped(input_ids=ids[:, :6], attention_mask=mask[:, :6], instruction_mask=inst[:, :6],
                        use_cache=True)
        ref = slow_logits(model, weights_of(wrapped), ids, mask,
                          torch.cat([inst[:, :6], torch.zeros(2, 3, dtype=torch.long)], 1))
        step = wrapped(input_ids=ids[:, 6:], attention_mask=mask, cache=first.cache if hasattr(first, "cache")
                       else first.past_key_values).logits
    torch.testing.assert_close(step, ref[:, 6:], rtol=0, atol=TOL)
    assert (full[:, 6:] - step).abs().max() > TOL  # a longer instruction gives another prefix


def test_bfloat16_by_the_tolerance_rule():
    model32 = tiny_model("llama", "sdpa")
    wrapped = wrap(model32, init_std_up=0.1)
    weights = weights_of(wrapped)
    ids, mask, inst = padded_batch(3, 8, "left", seed=23)
    with torch.no_grad():
        ref = slow_logits(model32, weights, ids, mask, inst)
        model16 = tiny_model("llama", "sdpa", dtype=torch.bfloat16)
        wrapped16 = IAPTModel(model16, wrapped.generators["default"].config, backend="torch")
        wrapped16.generators.adapters["default"].load_state_dict(wrapped.generators["default"].state_dict())
        out = wrapped16(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        pt = slow_logits(model16, weights, ids, mask, inst)
    real = mask.bool()
    assert_close_by_rule(out[real], ref[real], pt[real], name="bf16 logits")
    tokens = wrapped16.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=3, pad_token_id=0)
    assert tokens.shape == (3, 11)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model("qwen3", "sdpa")
    wrapped = wrap(model, rational_init="silu")
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in wrapped.generators.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ids, mask, inst = padded_batch(2, 7, "left", seed=29)
    with torch.no_grad():
        before = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_model("qwen3", "sdpa")
    loaded = IAPTModel.from_pretrained(fresh, tmp_path, backend="torch")
    for layer in range(2):
        a, b = wrapped.generator_weights(layer), loaded.generator_weights(layer)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
    assert torch.equal(before, after)


def test_generator_weights_layout():
    model = tiny_model("llama", "sdpa", hidden=64)
    wrapped = wrap(model, bottleneck_dim=12, num_soft_tokens=5, rational_degrees=(4, 3))
    w = wrapped.generator_weights(1)
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "w_down": (1, 64, 12), "w_pool": (1, 12, 5), "rat_num": (1, 5), "rat_den": (1, 3), "w_up": (1, 12, 64),
        "anchor": (1, 5, 64), "anchor_scale": (1,)}
    gen = wrapped.generators["default"][1]
    assert torch.equal(w["w_up"][0], gen.w_up) and torch.equal(w["rat_num"][0], gen.rat_num)
    assert torch.equal(wrapped.generator_weights(-1)["w_down"], w["w_down"])
    # The anchor trains; its scale is a fixed buffer.
    assert wrapped.num_trainable_parameters() == 2 * (2 * 64 * 12 + 12 * 5 + 5 + 3 + 5 * 64)
    paper = wrap(tiny_model("llama", "sdpa", hidden=64), bottleneck_dim=12, num_soft_tokens=5,
                 generator_form="paper")
    assert set(paper.generator_weights(0)) == {"w_down", "w_pool", "rat_num", "rat_den", "w_up"}


def test_triton_backend_matches_reference_backend():
    from iapt_fast.kernels import triton_prompt_generator  # noqa: F401  (must exist: no skip)
    model = tiny_model("llama", "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 6, "left", seed=31)
    with torch.no_grad():
        ref = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        wrapped.backend = "triton"
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
    assert (out - ref)[mask.bool()].abs().max().item() <= TOL


# ------------------------------------------------------------------------------ errors
def test_unsupported_family_names_the_supported_ones():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="unsupported model family 'gpt_neox'.*llama.*gpt2"):
        get_iapt_model(model, IAPTConfig())
    with pytest.raises(TypeError, match="model must be"):
        get_iapt_model(torch.nn.Linear(2, 2), IAPTConfig())
    with pytest.raises(TypeError, match="config must be an IAPTConfig"):
        get_iapt_model(tiny_model("llama"), {"num_soft_tokens": 4})
    with pytest.raises(ValueError, match="out of range"):
        get_iapt_model(tiny_model("llama"), IAPTConfig(target_layers=[5]))
    model = tiny_model("llama")
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8))
    with pytest.raises(ValueError, match="already wrapped"):
        get_iapt_model(model, IAPTConfig())
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        assert (wrapped(input_ids=ids).logits - base_logits).abs().max() > 0
        assert wrapped.remove_hooks() is model
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    get_iapt_model(model, IAPTConfig(bottleneck_dim=8))  # wrappable again


def test_bad_inputs_raise_before_any_computation(monkeypatch):
    wrapped = wrap(tiny_model("llama"))
    counter = CallCounter(monkeypatch)
    ids, mask, inst = padded_batch(2, 6, "left", seed=37)
    empty = inst.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty instruction"):
        wrapped(input_ids=ids, attention_mask=mask, instruction_mask=empty)
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty instruction"):
        wrapped.generate(ids, attention_mask=mask, instruction_mask=empty, max_new_tokens=2)
    pad_inst = inst.clone()
    pad_inst[1, 0] = 1  # row 1 is left-padded at position 0
    with pytest.raises(ValueError, match="instruction_mask marks padding"):
        wrapped(input_ids=ids, attention_mask=mask, instruction_mask=pad_inst)
    with pytest.raises(ValueError, match="instruction_mask must be"):
        wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst[:, :3])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        wrapped(input_ids=ids, attention_mask=mask.float())
    with pytest.raises(ValueError, match="use_cache=True"):
        wrapped.generate(ids, attention_mask=mask, use_cache=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="chunked prefill"):
        wrapped.generate(ids, attention_mask=mask, prefill_chunk_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported"):
        wrapped.generate(ids, attention_mask=mask, cache_implementation="offloaded", max_new_tokens=2)
    with pytest.raises(ValueError, match="pass input_ids .* or inputs_embeds"):
        wrapped(attention_mask=mask)
    wrapped.base_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported"):
        wrapped(input_ids=ids, attention_mask=mask)
    wrapped.base_model.config._attn_implementation = "sdpa"
    assert counter.calls == 0
    # ... and the model still works afterwards
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask)
    assert counter.calls == 2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_behaves_as_literal_prepending(attn):
    # A window shorter than the prompt: the soft tokens leave the window exactly like real
    # prepended tokens would (the reference masks by distance in the concatenated sequence).
    model = tiny_model("mistral", attn)
    model.config.sliding_window = 5
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 9, "none", seed=71)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        ref = slow_logits(model, weights_of(wrapped), ids, mask, inst)
    assert (out - ref).abs().max().item() <= TOL
    tokens = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, slow_greedy(model, weights_of(wrapped), ids, mask, inst, 5))


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_layer_subset_gradients_under_checkpointing(family):
    model = tiny_model(family, "eager", layers=3)
    wrapped = wrap(model, target_layers=[1], pool_input="normed", init_std_up=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped.train()
    ids, mask, inst = padded_batch(3, 8, "left", seed=73)
    # No loss on a token predicted from a padding position: what a padding query attends to
    # is unspecified (transformers and the reference differ when it sees no key at all).
    after_pad = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1) == 0
    labels = ids.masked_fill(after_pad, -100)
    wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, labels=labels).loss.backward()
    params = dict(wrapped.generators.named_parameters())
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    model.eval()  # the reference calls layers directly; checkpointing only acts in training mode
    logits = slow_logits(model, weights_of(wrapped), ids, mask, inst, pool_input="normed")
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)).backward()
    for name, p in params.items():
        scale = p.grad.abs().max().item()
        assert scale > 0 and (got[name] - p.grad).abs().max().item() <= 1e-4 * max(1.0, scale), name


def test_inputs_embeds_forward_matches_input_ids():
    model = tiny_model("llama", "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 7, "left", seed=79)
    with torch.no_grad():
        a = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        b = wrapped(inputs_embeds=model.model.embed_tokens(ids), attention_mask=mask, instruction_mask=inst).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_from_pretrained_failure_leaves_the_model_wrappable(tmp_path):
    model = tiny_model("gpt2")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        IAPTModel.from_pretrained(model, tmp_path)
    empty = IAPTModel(model, None, backend="torch")  # a serving host without adapters yet
    assert empty.adapter_names == [] and empty.active_adapter is None
    with pytest.raises(ValueError, match="no adapter is loaded"):
        empty(input_ids=torch.randint(3, VOCAB, (1, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton kernels on the GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_backend_end_to_end(dtype):
    # On CUDA, backend="auto" picks the Triton kernels; the reference backend is the oracle.
    model = tiny_model("qwen3", "sdpa", dtype=dtype, hidden=64).cuda()
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=16, init_std_up=0.5), seed=1)
    wrapped.add_adapter("other", IAPTConfig(bottleneck_dim=16, init_std_up=0.5), seed=2)
    ids, mask, inst = (t.cuda() for t in padded_batch(4, 12, "left", seed=83))
    names = ["default", "other", "other", "default"]
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=names).logits
        wrapped.backend = "torch"
        ref = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=names).logits
        wrapped.backend = "auto"
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert (out - ref)[mask.bool()].abs().max().item() <= tol
    tokens = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, adapter_names=names,
                              max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (4, 16)
    wrapped.train()
    labels = ids.masked_fill(mask == 0, -100)
    loss = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in wrapped.generators["default"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
