"""The anchored form's start: per-layer hidden states of an init sequence, from the backbone.

The soft tokens of layer l enter that layer exactly as if prepended to its input. So if
P_l = B_l where B_l is the *input of layer l* for T tokens of some sequence run through the
frozen backbone alone, the adapter is the frozen model with that sequence prepended (exactly
on RoPE families, where relative positions are all attention sees). Training starts from a
real, sensible model instead of L layers of random prefix entries, which a layer's input norm
would rescale to unit RMS whatever the init scale of W_up (the deep-prompt analogue of PEFT's
prompt-tuning TEXT init).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from iapt_fast.config import IAPTConfig

__all__ = ["anchor_token_ids", "anchor_states"]


def anchor_token_ids(config: IAPTConfig, model: nn.Module, tokenizer: Any | None = None) -> list[int]:
    """The T token ids whose hidden states start the anchors of an adapter with ``config``.

    ``anchor_init="bos"``: T copies of the model's BOS token id (its EOS id if it has no BOS).
    ``anchor_init="text"``: the first T tokens of ``config.prompt_init_text`` (no special
    tokens), cycled when the text is shorter.

    Raises:
        ValueError: "text" without a tokenizer, an empty tokenization, or "bos" on a model
            whose config names neither a BOS nor an EOS token.
    """
    num = config.num_soft_tokens
    if config.anchor_init == "text":
        if tokenizer is None:
            raise ValueError('anchor_init="text" needs a tokenizer: pass tokenizer= to get_iapt_model / add_adapter')
        ids = list(tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompt_init_text {config.prompt_init_text!r} tokenizes to no tokens")
        return list(itertools.islice(itertools.cycle(ids), num))
    token = None
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                token = int(value)
                break
        if token is not None:
            break
    if token is None:
        raise ValueError('anchor_init="bos" needs a model whose config names a bos_token_id or eos_token_id; '
                         'this one has neither: use anchor_init="text" with prompt_init_text and a tokenizer')
    return [token] * num


@torch.no_grad()
def anchor_states(model: nn.Module, token_ids: list[int], layers: list[int]) -> dict[int, Tensor]:
    """{layer: [T, d] float32}: the input hidden states of each of ``layers`` for ``token_ids``,
    computed by the bare backbone (no adapter, no gradient, eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([token_ids], dtype=torch.long, device=device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    finally:
        model.train(was_training)
    # hidden_states[l] is the input of decoder layer l (hidden_states[0]: the embeddings).
    return {layer: out.hidden_states[layer][0].float() for layer in layers}
