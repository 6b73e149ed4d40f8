"""The hooks that put IAPT's soft tokens into a transformers causal LM (design.md §7).

Every hook reads the call's state from the cache argument it is called with, an
:class:`~iapt_fast.model.call_state.IAPTCache` (transformers hands the model's cache to every
decoder layer and attention); anything else (no cache, a plain one) is a call of the bare backbone.

1. **model** pre-hook: at a prefill (the IAPTCache still holds its request), plan the generator
   launches, seed every layer of the cache with T slots, start the :class:`PrefillState`.
2. **decoder layer** pre-hook: at a prefill, run the generator on the layer's input H_l (one
   launch per shape group), turn P_l into prefix keys/values (``Architecture.prefix_kv``) and
   write them into the layer's T slots.
3. **attention** pre-hook: a layer that hides the prefix drops the mask's T leading columns
   (``IAPTCache.update`` drops the T slots).
4. **model** post-hook: the prefill is over; decode steps run no generator.

transformers runs an activation-checkpointed layer without its cache argument. For such a
layer (training only) the prefill state rides one keyword argument instead, ``iapt_prefill``,
which transformers passes on to the layer and its attention, in the forward and in the
backward replay: the attention then reads the prefix through a stateless :class:`PrefixOnlyCache`.

Decode steps read nothing but the cache they are called with, so torch.compile traces them
whole (no graph break) and CUDA graphs can capture them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn

from iapt_fast.compat import cache_kwarg_name
from iapt_fast.generator import functional
from iapt_fast.generator.bank import GeneratorBank, ServingPacks, stack_layers
from iapt_fast.model.architectures import Architecture
from iapt_fast.model.call_state import (IAPTCache, Launch, PrefillState, PrefixOnlyCache, check_cache_room,
                                        plan_launches, positions, write_prefix)

__all__ = ["PrefixHooks", "PREFILL_KW", "hooks_installed_on"]

# PrefillState, model → the checkpointed decoder layers and their attention (which transformers
# runs without the cache argument); absent otherwise.
PREFILL_KW = "iapt_prefill"


def hooks_installed_on(model: nn.Module) -> bool:
    """Whether an IAPTModel's hooks are installed on ``model`` (they would run twice)."""
    return any(isinstance(getattr(hook, "__self__", None), PrefixHooks) for hook in model._forward_pre_hooks.values())


class PrefixHooks:
    """Installs and runs the hooks for one wrapped model.

    Args:
        arch: the backbone's accessors.
        bank, packs: the adapters and their serving packs.
        backend: () → the generator backend name (the owner's current setting).
    """

    def __init__(self, arch: Architecture, bank: GeneratorBank, packs: ServingPacks,
                 backend: Callable[[], str]) -> None:
        self.arch, self.bank, self.packs = arch, bank, packs
        self.backend = backend
        self.model_cache_kw = cache_kwarg_name(arch.model.forward)
        self._handles: list[Any] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        arch = self.arch
        self._handles.append(arch.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(arch.model.register_forward_hook(self._after_model_call, with_kwargs=True))
        for index, layer in enumerate(arch.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index, layer), with_kwargs=True))
            attn = arch.attention(layer)
            self._handles.append(attn.register_forward_pre_hook(self._attention_hook(index, attn), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ manual decode steps
    def decode_kwargs(self, input_ids: Tensor | None, attention_mask: Tensor | None, cache: Any, kwargs: dict) -> dict:
        """The wrapped model's keyword arguments for a step after an IAPT prefill: the prefix
        is in the cache; its mask columns are prepended and the positions continue the real ones."""
        if not isinstance(cache, IAPTCache) or cache.prefix_mask is None:
            raise ValueError("the cache passed to forward() was not produced by an IAPTModel prefill (pass the "
                             "cache its output returned)")
        skip = cache.num_tokens
        q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        past_real = int(cache.get_seq_length()) - skip
        check_cache_room(cache, skip + past_real + q, skip)
        self.arch.check_prefix_support(skip, cache.hides_prefix, past_real + q)
        if attention_mask is not None:
            if attention_mask.shape[1] != past_real + q:
                raise ValueError(f"attention_mask must cover the {past_real} cached and {q} new tokens "
                                 f"(without the prefix), got length {attention_mask.shape[1]}")
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = positions(attention_mask.long())[:, -q:]
            attention_mask = torch.cat([cache.prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
        elif kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(past_real, past_real + q, device=cache.prefix_mask.device)[None]
        kwargs[self.model_cache_kw] = cache
        return {**kwargs, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ 1. the model
    def _model_cache(self, kwargs: dict) -> Any:
        cache = kwargs.get(self.model_cache_kw)
        return kwargs.get("past_key_values") if cache is None else cache

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = self._model_cache(kwargs)
        if not isinstance(cache, IAPTCache) or cache.request is None:
            return None  # a decode step, or a call of the bare backbone
        request = cache.request
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        batch = inputs.shape[0]
        expand = batch // request.instruction_mask.shape[0]
        if expand * request.instruction_mask.shape[0] != batch:
            raise ValueError(f"batch of {batch} rows does not match the request's {request.instruction_mask.shape[0]}")
        inst, rows, prompt_mask = request.instruction_mask, request.row_adapters, request.attention_mask
        if expand > 1:  # beam search / num_return_sequences expand rows with repeat_interleave
            inst = inst.repeat_interleave(expand, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(expand, dim=0)
            rows = [n for n in rows for _ in range(expand)]
        launches = plan_launches(self.packs, rows, request.adapters, inst.device)
        check_cache_room(cache, prompt_mask.shape[1], request.num_tokens)
        reference = torch.empty(0, dtype=self.arch.activation_dtype(), device=self.arch.layer_device(0))
        state = PrefillState(instruction_mask=inst, launches=launches, num_tokens=request.num_tokens,
                             rotary=self.arch.rotary(reference, request.num_tokens), row_adapters=rows,
                             hidden_layers=request.hidden_layers)
        cache.start_prefill(state, prompt_mask[:, :request.num_tokens], self.arch, reference.dtype)
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            # generate() builds the 4D mask of a static cache before this hook seeds the T slots,
            # so that mask places the prompt at 0…N−1: hand the model the 2D mask instead, from
            # which it builds the right one (the prefill is never the compiled step).
            kwargs["attention_mask"] = prompt_mask
        if module.training and any(getattr(layer, "gradient_checkpointing", False) for layer in self.arch.layers):
            # transformers may run these layers without the cache; it hands the model's extra
            # keyword arguments to every layer, and each layer's on to its attention.
            kwargs[PREFILL_KW] = state
        return args, kwargs

    def _after_model_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = self._model_cache(kwargs)
        if isinstance(cache, IAPTCache) and cache.prefill is not None:
            cache.end_prefill()

    # ------------------------------------------------------------------ 2. a decoder layer
    def _layer_hook(self, index: int, layer: nn.Module):
        arch = self.arch
        find_cache = _argument_finder(layer.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            cache = find_cache(args, kwargs)
            state = kwargs.get(PREFILL_KW)  # a checkpointed layer: the state rides on to its attention
            if state is None:
                state = cache.prefill if isinstance(cache, IAPTCache) else None
            if state is None or index in state.hidden_layers:
                return None  # a decode step (the prefix is in the cache already), or a layer without soft tokens
            hidden = args[0] if args else kwargs["hidden_states"]
            launches = [g for g in state.launches if index in g.key.layers]
            soft = self.soft_tokens(index, layer, hidden, state, launches)
            if not torch.compiler.is_dynamo_compiling():  # a traced step would break its graph at the host read
                check_finite(index, soft, state)
            keys, values = arch.prefix_kv(layer, soft, state.rotary)
            if PREFILL_KW in kwargs:  # its attention may run without the cache: it reads them here
                state.prefix[index] = (keys, values)
            if isinstance(cache, IAPTCache):
                write_prefix(cache, index, keys, values)
            return None

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
            state = kwargs.pop(PREFILL_KW, None)
            cache = kwargs.get(cache_kw)
            if isinstance(cache, IAPTCache):  # the prefix is in the cache's slots, or hidden by it
                carrier = cache if index in cache.hidden_layers else None
            elif state is not None:  # inside an activation-checkpointed layer, which runs without the cache
                if index not in state.hidden_layers:
                    kwargs[cache_kw] = PrefixOnlyCache(*state.prefix[index])
                    return args, kwargs
                carrier = state
            else:
                return None  # a call of the bare backbone
            if carrier is not None:
                # The layer's keys come without the T slots; the mask's T leading columns go too.
                mask = kwargs.get("attention_mask")
                if isinstance(mask, Tensor) and mask.dim() == 4:
                    kwargs["attention_mask"] = mask[..., carrier.num_tokens:]
            return args, kwargs

        return hook


def _argument_finder(fn: Callable) -> Callable[[tuple, dict], Any]:
    """(args, kwargs) → the cache argument of ``fn``, passed by name or by position (GPT-2's
    decoder passes it positionally)."""
    name = cache_kwarg_name(fn)
    params = list(inspect.signature(fn).parameters)
    position = params.index(name) if name in params else None

    def find(args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[position] if position is not None and position < len(args) else None

    return find


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
