"""The hooks that put IAPT's soft tokens into a transformers causal LM (design.md §7).

Three forward pre-hooks, installed by :class:`PrefixHooks`:

1. **model** (the ``*ForCausalLM``): at a prefill (a :class:`~iapt_fast.model.prefill_state.Request`
   is pending for this model), seed the KV cache with T slots per layer (prefix_cache.py),
   register its :class:`CacheState`, plan the generator launches and hand a
   :class:`PrefillState` to the decoder layers with the model's keyword arguments. Decode
   steps pass straight through.
2. **decoder layer**: at a prefill, run the generator on the layer's input H_l (one launch per
   shape group) and turn P_l into prefix keys/values (``Architecture.prefix_kv``), passed on as
   a keyword argument; layers outside ``target_layers`` are told to hide the T slots instead.
3. **attention**: write the prefix into the cache's slots (decode steps then pay only T cache
   entries); inside an activation-checkpointed layer, which drops the cache, prepend it
   through a stateless proxy cache, so the backward replay sees the same prefix. A layer that
   hides the prefix drops the mask's T leading columns (its cache layer drops the T slots).

Decode steps read nothing but the flag of pending requests and the cache they are called
with, so torch.compile traces them whole (no graph break) and CUDA graphs can capture them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from iapt_fast.generator import functional
from iapt_fast.model.architectures import Architecture
from iapt_fast.compat import cache_kwarg_name
from iapt_fast.generator.bank import GeneratorBank, stack_layers
from iapt_fast.model.packing import ServingPacks
from iapt_fast.model.prefill_state import PENDING, CacheState, Launch, PrefillState, cache_state, register_cache
from iapt_fast.model.prefix_cache import (HiddenPrefixLayer, PrefixOnlyCache, cache_in_use, cache_layer, check_cache_room,
                                          seed_cache, write_prefix)
from iapt_fast.model.requests import plan_launches, positions

__all__ = ["PrefixHooks", "PREFILL_KW"]

PREFILL_KW = "iapt_prefill"  # PrefillState, model → decoder layers
_PREFIX_KW = "iapt_prefix"  # (keys, values), decoder layer → its attention
_SKIP_KW = "iapt_skip"  # T, decoder layer → its attention: hide the T slots


class PrefixHooks:
    """Installs and runs the three hooks for one wrapped model.

    Args:
        owner: the IAPTModel whose pending requests these hooks serve.
        arch: the backbone's accessors.
        bank, packs: the adapters and their serving packs.
        backend: () → the generator backend name (the owner's current setting).
    """

    def __init__(self, owner: nn.Module, arch: Architecture, bank: GeneratorBank, packs: ServingPacks,
                 backend: Callable[[], str]) -> None:
        self.owner, self.arch, self.bank, self.packs = owner, arch, bank, packs
        self.backend = backend
        self.model_cache_kw = cache_kwarg_name(arch.model.forward)
        self._handles: list[Any] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        arch = self.arch
        self._handles.append(arch.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for index, layer in enumerate(arch.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index, layer), with_kwargs=True))
            attn = arch.attention(layer)
            self._handles.append(attn.register_forward_pre_hook(self._attention_hook(index, attn), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ manual decode steps
    def decode_kwargs(self, input_ids: Tensor | None, attention_mask: Tensor | None, cache, kwargs: dict) -> dict:
        """The wrapped model's keyword arguments for a step after an IAPT prefill: the prefix
        is in the cache; its mask columns are prepended and the positions continue the real ones."""
        state = cache_state(cache)
        if state is None:
            raise ValueError("the cache passed to forward() was not produced by an IAPTModel prefill")
        skip = state.num_tokens
        q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        past_real = int(cache.get_seq_length()) - skip
        check_cache_room(cache, skip + past_real + q, skip)
        self.arch.check_prefix_support(skip, state.hides_prefix, past_real + q)
        if attention_mask is not None:
            if attention_mask.shape[1] != past_real + q:
                raise ValueError(f"attention_mask must cover the {past_real} cached and {q} new tokens "
                                 f"(without the prefix), got length {attention_mask.shape[1]}")
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = positions(attention_mask.long())[:, -q:]
            attention_mask = torch.cat([state.prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
        elif kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(past_real, past_real + q, device=state.prefix_mask.device)[None]
        kwargs[self.model_cache_kw] = cache
        return {**kwargs, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ 1. the model
    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not PENDING.any:  # no request waits anywhere: a decode step, or a call of the bare backbone
            return None
        # Other threads' requests may be waiting. Eagerly, this thread's own ContextVar says;
        # torch.compile cannot trace a ContextVar, so a compiled call whose cache holds entries
        # is taken for the decode step it is (one graph, no break; compiling an IAPT prefill
        # needs a fresh cache or none).
        if torch.compiler.is_dynamo_compiling() and cache_in_use(kwargs.get(self.model_cache_kw,
                                                                     kwargs.get("past_key_values"))):
            return None
        request = PENDING.take(self.owner)
        if request is None:
            return None
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        batch = inputs.shape[0]
        cache = self._empty_cache(kwargs)
        expand = batch // request.instruction_mask.shape[0]
        if expand * request.instruction_mask.shape[0] != batch:
            raise ValueError(f"batch of {batch} rows does not match the request's {request.instruction_mask.shape[0]}")
        inst, rows, prompt_mask = request.instruction_mask, request.row_adapters, request.attention_mask
        if expand > 1:  # beam search / num_return_sequences expand rows with repeat_interleave
            inst = inst.repeat_interleave(expand, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(expand, dim=0)
            rows = [n for n in rows for _ in range(expand)]
        prefix_mask = prompt_mask[:, :request.num_tokens]
        launches = plan_launches(self.packs, rows, request.adapters, inst.device)
        check_cache_room(cache, prompt_mask.shape[1], request.num_tokens)
        seed_cache(cache, self.arch, batch, request.num_tokens, hidden_layers=(
            i for i in range(self.arch.num_layers) if i not in request.target_layers))
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            # generate() builds the 4D mask of a static cache before this hook seeds the T slots,
            # so that mask places the prompt at 0…N−1: hand the model the 2D mask instead, from
            # which it builds the right one (the prefill is never the compiled step).
            kwargs["attention_mask"] = prompt_mask
        register_cache(cache, CacheState(num_tokens=request.num_tokens, prefix_mask=prefix_mask,
                                         hides_prefix=request.hides_prefix))
        # transformers hands the model's extra keyword arguments down to every decoder layer.
        # Riding along with them, the prefill state reaches the layer hooks even when a
        # checkpointed layer is replayed during backward (transformers 5.17 runs the hooks
        # inside the checkpoint, 5.24 outside; both keep the call's keyword arguments).
        kwargs[PREFILL_KW] = PrefillState(instruction_mask=inst, launches=launches, num_tokens=request.num_tokens,
                                          row_adapters=rows)
        return args, kwargs

    def _empty_cache(self, kwargs: dict):
        """The call's cache (a new DynamicCache if none), under the argument name this release uses."""
        key = self.model_cache_kw
        cache = kwargs.get(key)
        if cache is None and key != "past_key_values":
            cache = kwargs.get("past_key_values")
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.arch.model.config)
        elif int(cache.get_seq_length()) != 0:
            raise ValueError("IAPT prefill needs an empty cache")
        kwargs.pop("past_key_values", None)
        kwargs[key] = cache
        return cache

    # ------------------------------------------------------------------ 2. a decoder layer
    def _layer_hook(self, index: int, layer: nn.Module):
        arch = self.arch

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state = kwargs.pop(PREFILL_KW, None)
            if state is None:  # a decode step: the prefix is in the cache already
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            launches = [g for g in state.launches if index in g.key.layers]
            if not launches:
                kwargs[_SKIP_KW] = state.num_tokens
                return args, kwargs
            soft = self.soft_tokens(index, layer, hidden, state, launches)
            if not torch.compiler.is_dynamo_compiling():  # a traced step would break its graph at the host read
                check_finite(index, soft, state)
            if state.rotary is None:
                state.rotary = arch.rotary(hidden, state.num_tokens)
            kwargs[_PREFIX_KW] = arch.prefix_kv(layer, soft, state.rotary)
            return args, kwargs

        return hook

    def soft_tokens(self, index: int, layer: nn.Module, hidden: Tensor, state: PrefillState,
                    launches: list[Launch]) -> Tensor:
        """P_l [B, T, d] for every row: one prompt_generator call per launch."""
        norm = self.arch.input_norm(layer)
        normed = None
        out = None
        for launch in launches:
            source = hidden
            if launch.key.pool_input == "normed":
                normed = norm(hidden) if normed is None else normed
                source = normed
            mask, ids, rows = state.instruction_mask, launch.ids, launch.rows
            if mask.device != hidden.device:  # layers spread over devices (device_map)
                mask, ids = mask.to(hidden.device), ids.to(hidden.device)
                rows = rows.to(hidden.device) if rows is not None else None
            if rows is not None:
                source, mask = source.index_select(0, rows), mask.index_select(0, rows)
            weights = launch.pack.weights[index] if launch.pack is not None else \
                stack_layers([adapter[index] for adapter in launch.members])
            backend = self.backend()
            # Serving packs cache W_down·W_pool per weights version: the inference forward is one launch.
            products = None if launch.pack is None else launch.pack.inference_products(index, backend, hidden.device)
            soft = functional.prompt_generator(
                source, mask, **weights, adapter_ids=ids if len(weights["w_down"]) > 1 else None,
                backend=backend, rational_version=launch.key.rational_version, weight_products=products,
                check_ids=False,  # built on the host from validated adapter names: no device sync
            )
            if rows is None:
                return soft
            if out is None:
                # Rows without an adapter keep P = 0: finite through the norms, masked anyway.
                out = hidden.new_zeros(state.instruction_mask.shape[0], soft.shape[1], hidden.shape[-1])
            out = out.index_copy(0, rows, soft)
        return out

    # ------------------------------------------------------------------ 3. an attention
    def _attention_hook(self, index: int, attn: nn.Module):
        cache_kw = cache_kwarg_name(attn.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            prefix = kwargs.pop(_PREFIX_KW, None)
            skip = kwargs.pop(_SKIP_KW, None)
            cache = kwargs.get(cache_kw)
            if prefix is not None:
                keys, values = prefix
                if cache is None:
                    kwargs[cache_kw] = PrefixOnlyCache(keys, values)
                else:
                    write_prefix(cache.layers[index], index, keys, values)
                return args, kwargs
            if skip is None:  # a decode step: does this layer's cache hide the prefix?
                slot = cache_layer(cache, index)
                if not isinstance(slot, HiddenPrefixLayer):
                    return None
                skip = slot.num_tokens
            # The layer's cache (a HiddenPrefixLayer) drops the T slots from its keys; the
            # mask's T leading columns go too.
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 4:
                kwargs["attention_mask"] = mask[..., skip:]
            return args, kwargs

        return hook


def check_finite(index: int, soft: Tensor, state: PrefillState) -> None:
    """Refuse soft tokens that are not finite: finite weights can still overflow (a weight of
    1e38 in a file passes every load check), and NaN keys would turn the rows' logits into NaN
    without an error. A flag per row accumulates on the device over the target layers and is
    read once, at the last one: one host sync per prefill, none per decode step.

    Args:
        soft: [B, T, d] the soft tokens of layer ``index`` (rows without an adapter hold zeros).
    """
    finite = torch.isfinite(soft).flatten(1).all(dim=1)
    state.finite = finite if state.finite is None else state.finite & finite.to(state.finite.device)
    if index != state.last_layer or bool(state.finite.all()):
        return
    rows = torch.nonzero(~state.finite).flatten().tolist()
    names = list(dict.fromkeys(state.row_adapters[r] for r in rows))
    raise ValueError(f"adapter{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)} produced "
                     f"non-finite soft tokens (NaN or Inf) for rows {rows}: its weights are finite but overflow "
                     "on this input (e.g. a weight of 1e38); the call is refused instead of returning NaN logits")
