"""The slow, literal IAPT reference: prepend the soft tokens to every layer's input.

Independent of iapt_fast.model on purpose: no hooks, no KV cache, no prefix K/V. Each decoder
layer l runs as a black box on cat(P_l, H_l) with positions 0…T−1 for the soft tokens and
T + (the base model's position) for real tokens (RoPE families; GPT-2's positions live in its
input embeddings only), under a hand-built mask: causal in the concatenated order, padding
keys masked. The outputs at the soft-token positions are discarded (design.md §1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from iapt_fast.generator import reference
from iapt_fast.generator.weights import GeneratorWeights

VOCAB = 97


def tiny_model(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0,
               layers: int = 2, hidden: int = 32):
    """A tiny random causal LM of ``family`` built from a config (no hub).

    initializer_range 0.2 (not 0.02) gives the backbone real-model-like leverage: with 0.02 every
    projection shrinks the prefix's effect ~50×, and a 30-step training test could not move.
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "mistral":  # keeps its default sliding window (4096): the sliding mask path runs
        model = tf.MistralForCausalLM(tf.MistralConfig(**common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=hidden // 4, **common))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4,
                                                 n_positions=256, attn_implementation=attn, pad_token_id=0, initializer_range=0.2,
                                                 bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 attn_pdrop=0.0))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def padded_batch(batch: int, length: int, side: str, seed: int = 0):
    """Random ids, an attention mask with ragged ``side`` padding ("left", "right", "none"),
    and an instruction mask that leaves the last two real tokens of row 0 out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = (row * 2) % max(1, length - 3) if side != "none" else 0
        if pad and side == "left":
            mask[row, :pad] = 0
        elif pad and side == "right":
            mask[row, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    inst = mask.clone()
    real = torch.nonzero(mask[0]).flatten()
    inst[0, real[-2:]] = 0
    return ids, mask, inst


def _layers(model):
    if model.config.model_type == "gpt2":
        return model.transformer.h
    return model.model.layers


def _input_norm(model, layer):
    return layer.ln_1 if model.config.model_type == "gpt2" else layer.input_layernorm


def slow_logits(model, generators: dict[int, dict[str, Tensor]], input_ids: Tensor, attention_mask: Tensor,
                instruction_mask: Tensor, pool_input: str = "normed", version: str = "B",
                prefix_rows: Tensor | None = None) -> Tensor:
    """Logits [B, N, V] of the literal reference.

    Args:
        generators: layer → weights in the design.md §3 layout, either A = 1 or A = B (row b
            uses adapter b: a per-row adapter list is expanded by the caller).
        prefix_rows: [B] bool, False = that row has no soft tokens (runs the bare backbone).
    Differentiable w.r.t. the generator weights (the gradient oracle).
    """
    gpt2 = model.config.model_type == "gpt2"
    batch, length = input_ids.shape
    mask = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
    if gpt2:
        hidden = model.transformer.wte(input_ids) + model.transformer.wpe(positions)
    else:
        hidden = model.model.embed_tokens(input_ids)
    if prefix_rows is None:
        prefix_rows = torch.ones(batch, dtype=torch.bool)
    sdpa = model.config._attn_implementation == "sdpa"
    for index, layer in enumerate(_layers(model)):
        weights = generators.get(index)
        if weights is not None:
            source = _input_norm(model, layer)(hidden) if pool_input == "normed" else hidden
            ids = None if weights["w_down"].shape[0] == 1 else torch.arange(batch)
            soft = reference.prompt_generator(source, instruction_mask.bool(), GeneratorWeights(**weights),
                                              adapter_ids=ids, version=version)
            num = soft.shape[1]
            x = torch.cat([soft.to(hidden.dtype), hidden], dim=1)
            full_pos = torch.cat([torch.arange(num).expand(batch, num), positions + num], dim=1)
            key_ok = torch.cat([prefix_rows[:, None].expand(batch, num), mask], dim=1)
        else:
            num = 0
            x, full_pos, key_ok = hidden, positions, mask
        size = x.shape[1]
        allowed = torch.ones(size, size, dtype=torch.bool).tril()[None] & key_ok[:, None, :]
        window = getattr(model.config, "sliding_window", None)
        if window is not None and model.config.model_type == "mistral":
            offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :]
            allowed = allowed & (offsets < window)[None]
        # A query with no visible key (a left-padding token) would give NaN; its output is never
        # read by a real token, so let it see itself.
        lonely = ~allowed.any(-1, keepdim=True)
        allowed = allowed | (lonely & torch.eye(size, dtype=torch.bool)[None])
        if sdpa:
            attn_mask = allowed[:, None]
        else:
            attn_mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)[:, None]
        if gpt2:
            out = layer(x, attention_mask=attn_mask)
        else:
            rotary = model.model.rotary_emb(x, full_pos)
            out = layer(x, attention_mask=attn_mask, position_embeddings=rotary, position_ids=full_pos)
        out = out[0] if isinstance(out, tuple) else out
        hidden = out[:, num:]
    if gpt2:
        hidden = model.transformer.ln_f(hidden)
    else:
        hidden = model.model.norm(hidden)
    return model.lm_head(hidden)


@torch.no_grad()
def slow_greedy(model, generators, input_ids: Tensor, attention_mask: Tensor, instruction_mask: Tensor,
                new_tokens: int, banned: tuple[int, ...] = (2,), **kwargs) -> Tensor:
    """Greedy continuation [B, N + new_tokens], one full slow forward per new token.

    ``banned`` tokens (default: EOS) are never picked, as ``generate(min_new_tokens=...)`` does.
    """
    ids, mask, inst = input_ids, attention_mask, instruction_mask
    for _ in range(new_tokens):
        logits = slow_logits(model, generators, ids, mask, inst, **kwargs)[:, -1]
        logits[:, list(banned)] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        inst = torch.cat([inst, torch.zeros_like(nxt)], dim=1)
    return ids
