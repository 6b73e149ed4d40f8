"""IAPT causal LMs for vLLM: vLLM's own models whose decoder loop injects the soft tokens.

One class per served family (llama, mistral, qwen2, qwen3), each vLLM's ``*ForCausalLM`` with
the loop of :func:`iapt_decoder_loop` as its forward. Registered with ``vllm.ModelRegistry`` by
the plugin (plugin.py); a served model selects its class through ``hf_overrides`` (options.py),
which also names the adapter folders (``iapt_adapters``, JSON). Imported only inside vLLM.
"""
from __future__ import annotations

import json
from itertools import islice

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from iapt_fast.model.architectures import FAMILIES
from iapt_fast.serve.adapters import AdapterSpec, ServedAdapters
from iapt_fast.serve.injection import LayerInjector, find_fresh_prefills
from iapt_fast.serve.options import ADAPTERS_KEY, check_engine_config, codec_for
from iapt_fast.serve.placeholders import PlaceholderCodec

__all__ = ["IAPTLlamaForCausalLM", "IAPTMistralForCausalLM", "IAPTQwen2ForCausalLM", "IAPTQwen3ForCausalLM",
           "iapt_decoder_loop", "layer_with_injection"]


class ServingState:
    """The adapters one engine serves and the codec of their placeholder headers."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        check_engine_config(vllm_config)
        config = vllm_config.model_config.hf_config
        if getattr(config, "ada_rms_norm_t_cond", False):
            raise ValueError("IAPT serving does not support time-conditioned norms (ada_rms_norm_t_cond)")
        specs = [AdapterSpec(name, path) for name, path in json.loads(getattr(config, ADAPTERS_KEY, "[]"))]
        self.adapters = ServedAdapters(specs, config.model_type, config.hidden_size, config.num_hidden_layers,
                                       device=device)
        # The same per-family definition as the Hugging Face path: where the soft tokens enter a layer.
        self.input_norm = FAMILIES[config.model_type].input_norm
        self.codec: PlaceholderCodec = codec_for(config.vocab_size, len(specs), vllm_config.model_config.max_model_len)
        block_size = vllm_config.cache_config.block_size
        for slot in self.adapters.slots:
            self.codec.encode(0, slot.num_tokens, 1)  # raises when T cannot carry the header
            if block_size is not None and slot.num_tokens > block_size:
                # A prefix-cache hit is whole blocks: a hit ending inside the placeholders would
                # leave rows that need P_l without the header that names their adapter.
                raise ValueError(f"adapter {slot.name!r}: num_soft_tokens={slot.num_tokens} exceeds the KV "
                                 f"cache block size {block_size}")

    def injector(self, input_ids: torch.Tensor | None, positions: torch.Tensor) -> LayerInjector | None:
        """The step's injector, or None when no request of the step is a fresh IAPT prefill."""
        if not len(self.adapters) or input_ids is None or not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or not metadata:  # profiling and dummy runs carry none
            return None
        bounds = getattr(next(iter(metadata.values())), "query_start_loc", None)
        if bounds is None:
            return None
        fresh = find_fresh_prefills(input_ids, positions, bounds.cpu(), self.codec, self.adapters)
        return LayerInjector(self.adapters, fresh, positions.shape[0], positions.device) if fresh else None


def iapt_decoder_loop(decoder: nn.Module, state: ServingState, input_ids: torch.Tensor | None,
                      positions: torch.Tensor, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """The pre-norm decoder loop of vLLM's llama-like models (embed, layers with a fused
    residual, final norm), with P_l written into fresh prefills' placeholder rows before each layer.

    Args:
        decoder: the family's vLLM decoder (``embed_input_ids``, ``layers``, ``norm``).
        input_ids, positions: [R] the step's rows.
    Returns:
        [R, d] final hidden states.
    """
    if inputs_embeds is not None and len(state.adapters):
        raise ValueError("IAPT serving reads each request's adapter from its token ids; prompt embeddings "
                         "are not supported")
    injector = state.injector(input_ids, positions)
    hidden = decoder.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
    residual = None
    for index, layer in enumerate(islice(decoder.layers, decoder.start_layer, decoder.end_layer),
                                  start=decoder.start_layer):
        if injector is None:
            hidden, residual = layer(positions, hidden, residual)
        else:
            hidden, residual = layer_with_injection(layer, index, positions, hidden, residual, injector,
                                                    state.input_norm(layer))
    hidden, _ = decoder.norm(hidden, residual)
    return hidden


def layer_with_injection(layer: nn.Module, index: int, positions: torch.Tensor, hidden: torch.Tensor,
                         residual: torch.Tensor | None, injector: LayerInjector,
                         input_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of the served families' vLLM decoder layer (llama, mistral, qwen2, qwen3 share
    it: fused-residual input norm, attention, fused-residual post-attention norm, MLP), with P_l
    injected after the input norm and the MLP run on the injector's kept rows only.

    The placeholder rows of a fresh prefill are computed for their keys and values, which the
    attention writes into the paged cache; what the layer outputs for them is overwritten by the
    next layer's P_l and never read after the last (the first prompt token has no logprob), so
    their MLP — most of a layer's work per row — is skipped (they output zeros).

    Args:
        index: the layer's index (which P_l).
        hidden, residual: [R, d] the step's rows; ``residual`` None before the first layer.
        input_norm: ``layer``'s input norm as the family defines it (``Architecture.input_norm``).
    Returns:
        (hidden, residual) [R, d], as the layer's own forward returns them.
    """
    if residual is None:
        residual = hidden
        hidden = input_norm(hidden)
    else:
        hidden, residual = input_norm(hidden, residual)
    injector(index, hidden, residual, input_norm)
    hidden = layer.self_attn(positions=positions, hidden_states=hidden)
    hidden, residual = layer.post_attention_layernorm(hidden, residual)
    out = torch.zeros_like(hidden)
    kept = injector.kept_rows
    out.index_copy_(0, kept, layer.mlp(hidden.index_select(0, kept)))
    return out, residual


class _IAPTServing:
    """Mixin for a vLLM ``*ForCausalLM``: loads the adapters, runs the IAPT decoder loop."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.iapt = ServingState(vllm_config, self.model.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return iapt_decoder_loop(self.model, self.iapt, input_ids, positions, inputs_embeds)


class IAPTLlamaForCausalLM(_IAPTServing, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM serving IAPT adapters."""


class IAPTMistralForCausalLM(_IAPTServing, MistralForCausalLM):
    """vLLM's MistralForCausalLM serving IAPT adapters."""


class IAPTQwen2ForCausalLM(_IAPTServing, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM serving IAPT adapters."""


class IAPTQwen3ForCausalLM(_IAPTServing, Qwen3ForCausalLM):
    """vLLM's Qwen3ForCausalLM serving IAPT adapters."""
