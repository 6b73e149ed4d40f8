"""IAPT on Hugging Face causal LMs: ``get_iapt_model`` / ``IAPTModel``.

How the soft tokens get into the model (design.md §1, §7):

* Every IAPT forward starts as a *prefill*. A pre-hook on the wrapped ``*ForCausalLM`` seeds
  the KV cache with T placeholder slots per layer, so transformers itself builds the right
  mask for every attention implementation (queries at offset T, T+N keys) from a 2-D mask
  with T prefix columns prepended. Real tokens keep the positions the base model gives
  them: we pass cumsum-of-mask − 1 position ids explicitly.
* The prefill state (instruction mask, adapter groups) rides along with the model's extra
  keyword arguments, which transformers hands to every decoder layer. A pre-hook on each
  target layer reads H_l (its input), runs the generator once for the whole batch (one
  launch per adapter shape group), and turns P_l into the layer's prefix K/V
  (architectures.py); the K/V travel on to the layer's attention as a keyword argument.
* A pre-hook on the attention puts them in front of the real keys: into the KV cache (its
  placeholder slots) when the layer has one, so decode steps pay only T extra cache entries;
  otherwise (activation checkpointing drops the cache inside checkpointed layers) through a
  stateless proxy cache whose ``update`` returns cat(prefix, k). Checkpointing keeps a
  call's keyword arguments for the backward replay, so the replay sees the same prefix
  whether the hooks run outside the checkpoint (transformers 5.24) or inside it (5.17).
* Decode steps run no generator: the prefix is in the cache, ``generate()`` carries the
  T-extended mask and the positions; the hooks return at their first line.

Layers outside ``target_layers`` hold T unused slots too (one mask serves all layers); their
attention skips the slots (keys and mask columns are sliced off).
"""
from __future__ import annotations

import contextvars
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import functional as _functional
from .adapter_io import build_adapter, read_adapter, save_adapter
from .anchor import anchor_states, anchor_token_ids
from .architectures import cache_kwarg_name, get_architecture
from .config import IAPTConfig
from .generator import GeneratorBank, check_adapter_name
from .packing import AdapterPack, build_packs, group_key

__all__ = ["IAPTModel", "get_iapt_model", "BASE_ADAPTER"]

# Name a row of a mixed batch can use to run the bare backbone (its prefix slots are masked).
BASE_ADAPTER = "__base__"
# The prefill request of the call in flight, from forward()/generate() to the model pre-hook.
# A ContextVar is per thread and per asyncio task, so concurrent calls on one IAPTModel (a web
# server's threads, a batching front-end) never see each other's request; (model, request),
# so a call on one IAPTModel never hands its request to another.
_PENDING: contextvars.ContextVar[tuple["IAPTModel", "_Request"] | None] = contextvars.ContextVar(
    "iapt_pending_request", default=None)
_PACK_LOCK = threading.Lock()
_PREFIX_KW = "iapt_prefix"
_SKIP_KW = "iapt_skip"
_STATE_KW = "iapt_state"
VERIFIED_ATTENTION = ("eager", "sdpa")
_UNSUPPORTED_GENERATE = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "prefill_chunk_size": "chunked prefill",
    "inputs_embeds": "generation from inputs_embeds",
}


@dataclass
class _Group:
    """Rows of a batch that share one generator launch per layer."""

    key: tuple
    rows: Tensor | None  # None: every row of the batch
    ids: Tensor  # [rows] adapter ids into the stack
    names: list[str]  # training path: the adapters stacked, in id order
    pack: AdapterPack | None  # serving path: ids index the pack
    pool_input: str
    version: str


@dataclass
class _Request:
    """What one IAPT call needs at prefill (consumed by the model pre-hook)."""

    instruction_mask: Tensor  # [B, N] bool
    row_adapters: list[str | None]  # None = base row
    prefix_mask: Tensor  # [B, T] 1 where the row has a prefix
    num_tokens: int
    hides_prefix: bool  # some layer hides the T slots (untargeted layers, or only base rows)


class _Active:
    """State of the prefill in flight."""

    __slots__ = ("instruction_mask", "groups", "num_tokens", "rotary", "batch")

    def __init__(self, instruction_mask: Tensor, groups: list[_Group], num_tokens: int, batch: int) -> None:
        self.instruction_mask = instruction_mask
        self.groups = groups
        self.num_tokens = num_tokens
        self.rotary: tuple[Tensor, Tensor] | None = None
        self.batch = batch


class _PrefixCache:
    """Stateless stand-in for a KV cache: prepends a fixed prefix (checkpoint-safe)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class _SkipPrefixCache:
    """Wraps the real cache of a non-target layer: stores everything, hides the T slots."""

    __slots__ = ("inner", "skip")

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner, self.skip = inner, skip

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = self.inner.update(key_states, value_states, *args, **kwargs)
        return keys[:, :, self.skip:], values[:, :, self.skip:]


class IAPTModel(nn.Module):
    """A frozen causal LM with IAPT prompt generators (one per target layer, per adapter).

    Build it with :func:`get_iapt_model` or :meth:`from_pretrained`.

    Args:
        model: a transformers causal LM of a supported family (architectures.py).
        config: the first adapter's IAPTConfig; None starts without adapters (a serving host
            that loads them later).
        adapter_name: its name.
        backend: generator backend, "auto" (Triton on CUDA, reference on CPU), "torch" or "triton".
        seed: optional seed of the first adapter's initialisation.
        tokenizer: needed only by ``anchor_init="text"`` (to tokenize ``prompt_init_text``).
    """

    def __init__(self, model: nn.Module, config: IAPTConfig | None, adapter_name: str = "default",
                 backend: str = "auto", seed: int | None = None, tokenizer: Any | None = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, IAPTConfig):
            raise TypeError(f"config must be an IAPTConfig (or None: no adapter yet), got {type(config).__name__}")
        arch = get_architecture(model)
        _functional.resolve_backend(backend, torch.device("cpu"))  # validates the name
        if getattr(model, "_iapt_wrapped", False):
            raise ValueError("this model is already wrapped by an IAPTModel (its hooks would run twice); "
                             "add adapters to that one, or call its remove_hooks() first")
        self.base_model = model
        self._arch = arch
        self.backend = backend
        for param in model.parameters():
            param.requires_grad_(False)
        self.generators = GeneratorBank(arch.hidden_size, arch.num_layers)
        self._active_adapter: str | None = None
        self._packs: dict[tuple, AdapterPack] | None = None
        self._group_keys: dict[str, tuple] = {}  # adapter name -> group_key, reset with the packs
        self._has_untargeted = False
        self._handles: list[Any] = []
        self._model_cache_kw = cache_kwarg_name(model.forward)
        self._install_hooks()
        model._iapt_wrapped = True
        if config is not None:
            try:
                self.add_adapter(adapter_name, config, seed=seed, tokenizer=tokenizer)
            except Exception:
                self.remove_hooks()  # the caller's model must stay wrappable
                raise
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        # As PEFT models do: anything IAPTModel does not define is the wrapped model's
        # (generation_config, gradient_checkpointing_enable, dtype, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or "base_model" not in self._modules:
                raise
            return getattr(self._modules["base_model"], name)

    # ================================================================== properties
    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return self.generators.adapter_names

    @property
    def active_adapter(self) -> str | None:
        """The adapter rows use when ``adapter_names`` is not given."""
        return self._active_adapter

    @property
    def peft_config(self) -> dict[str, IAPTConfig]:
        return {name: self.generators[name].config for name in self.adapter_names}

    @property
    def config(self):
        """The wrapped model's transformers config (as PEFT models expose it)."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # ================================================================== adapters
    def add_adapter(self, adapter_name: str, config: IAPTConfig | None = None, seed: int | None = None,
                    tokenizer: Any | None = None) -> None:
        """Add a freshly initialised, trainable adapter (``config`` defaults to the active one's).

        The anchored form runs the bare backbone once on the anchor's init sequence (T tokens)
        to start each layer's anchor; ``tokenizer`` is needed for ``anchor_init="text"``.
        """
        if config is None:
            if self._active_adapter is None:
                raise ValueError("config is required: there is no active adapter to copy it from")
            config = IAPTConfig.from_dict(self.generators[self._active_adapter].config.to_dict())
        if not isinstance(config, IAPTConfig):
            raise TypeError(f"config must be an IAPTConfig or None, got {type(config).__name__}")
        self._check_new_name(adapter_name)
        layers = config.resolved_layers(self._arch.num_layers)  # range check before anything is built
        self._check_supported(config, "config")
        anchors = None
        if config.anchored:
            anchors = anchor_states(self.base_model, anchor_token_ids(config, self.base_model, tokenizer), layers)
        adapter = self.generators.add_adapter(adapter_name, config, seed=seed, anchors=anchors)
        for layer in adapter.layer_indices:  # each generator lives with its layer (device_map="auto")
            adapter[layer].to(self._arch.layer_device(layer))
        for param in adapter.parameters():
            param.requires_grad_(adapter_name == self._active_adapter)
        self._adapters_changed(added=adapter_name)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str) -> None:
        """Load a saved adapter under ``adapter_name``; the backbone is not touched or copied.

        Everything is read and validated before the bank changes, so a failure leaves the
        loaded adapters as they were.
        """
        self._check_new_name(adapter_name)
        config, tensors = read_adapter(path, self._arch.hidden_size, self._arch.num_layers)
        self._check_supported(config, f"adapter {os.fspath(path)!r}")
        adapter = build_adapter(config, tensors, self._arch.hidden_size, self._arch.num_layers,
                                self._arch.layer_device)
        for param in adapter.parameters():
            param.requires_grad_(False)
        self.generators.adapters[adapter_name] = adapter
        self._adapters_changed(added=adapter_name)
        if self._active_adapter is None:  # a host started without adapters serves its first one
            self._active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Unload an adapter. Deleting the active one makes the first remaining one active."""
        self.generators.delete_adapter(adapter_name)
        if self._active_adapter == adapter_name:
            self._active_adapter = None
            if self.adapter_names:
                self.set_adapter(self.adapter_names[0])
        self._adapters_changed()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the default adapter and the only trainable one."""
        self.generators[adapter_name]  # raises ValueError for an unknown name
        self._active_adapter = adapter_name
        for name in self.adapter_names:
            for param in self.generators[name].parameters():
                param.requires_grad_(name == adapter_name)

    def generator_weights(self, layer: int, adapter_name: str | None = None) -> dict[str, Tensor]:
        """One layer's weights in the design.md §3 layout (adapter axis first, A = 1).

        Returns detached copies: w_down [1, d, m], w_pool [1, m, T], rat_num [1, p+1],
        rat_den [1, q], w_up [1, m, d]; anchored form also anchor [1, T, d], anchor_scale [1].
        """
        name = adapter_name if adapter_name is not None else self._require_active()
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        adapter = self.generators[name]
        if layer < 0:
            layer += self._arch.num_layers
        if layer not in adapter:
            raise ValueError(f"adapter {name!r} has no generator at layer {layer}; its layers: {adapter.layer_indices}")
        return {w: t.detach().clone() for w, t in adapter[layer].weights().items()}

    def _check_supported(self, config: IAPTConfig, what: str) -> None:
        """Refuse, before any work, an adapter this backbone and backend cannot run."""
        _functional.check_backend_limits(config.num_soft_tokens, self.backend, self.device,
                                         what=f"{what} (backend={self.backend!r})")
        self._arch.check_prefix_support(config.num_soft_tokens, hides_prefix=False)

    def _check_new_name(self, name: str) -> None:
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for rows that run the bare backbone")
        check_adapter_name(name)
        if name in self.generators.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")

    def _adapters_changed(self, added: str | None = None) -> None:
        self._packs = None
        self._group_keys = {}
        if added is not None:  # O(1) per load: 1,000 loads must not rescan 1,000 adapters
            partial = len(self.generators[added].layer_indices) != self._arch.num_layers
            self._has_untargeted = self._has_untargeted or partial
            return
        self._has_untargeted = any(
            len(self.generators[n].layer_indices) != self._arch.num_layers for n in self.adapter_names
        )

    def _require_hooks(self) -> None:
        if not self._handles:
            raise RuntimeError("this IAPTModel was detached from its backbone (remove_hooks()); wrap the backbone "
                               "again with get_iapt_model / IAPTModel.from_pretrained")

    def _require_active(self) -> str:
        if self._active_adapter is None:
            if self.adapter_names:
                raise ValueError(f"no active adapter; call set_adapter(name) or pass adapter_names= "
                                 f"(loaded: {self.adapter_names})")
            raise ValueError("no adapter is loaded; add_adapter or load_adapter first")
        return self._active_adapter

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half() re-home parameters
        self._packs = None
        self._group_keys = {}
        return super()._apply(fn, recurse)

    # ================================================================== parameters
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        trainable = self.num_trainable_parameters()
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ================================================================== save / load
    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write one adapter (default: the active one) as adapter_config.json + adapter_model.safetensors."""
        name = adapter_name if adapter_name is not None else self._require_active()
        save_adapter(self.generators[name], save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                        backend: str = "auto") -> "IAPTModel":
        """Wrap ``model`` and load the adapter saved in ``path`` (bit for bit)."""
        wrapped = cls(model, None, backend=backend)
        try:
            wrapped.load_adapter(path, adapter_name)
        except Exception:
            wrapped.remove_hooks()  # the caller's model must stay wrappable
            raise
        wrapped.set_adapter(adapter_name)
        return wrapped

    # ================================================================== forward / generate
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                instruction_mask: Tensor | None = None, labels: Tensor | None = None,
                adapter_names: Sequence[str | None] | None = None, **kwargs: Any):
        """Run the wrapped model with the IAPT prefix at every target layer.

        Args:
            input_ids: [B, N] (or pass ``inputs_embeds`` [B, N, d]).
            attention_mask: [B, N], 1 = real token; left or right padding.
            instruction_mask: [B, N], 1 = token the generators pool over (the instruction /
                prompt). Must be non-empty in every row and never mark padding. Default: with
                ``labels``, each row's tokens before its first label that is not −100 (the
                generators must never read the answer they are trained to predict); without
                labels, every non-padding token.
            labels: [B, N] as the wrapped model takes them (−100 = ignored).
            adapter_names: one adapter name per row (``"__base__"`` = no adapter); default:
                the active adapter for every row.
            **kwargs: passed to the wrapped model (e.g. ``use_cache``, ``logits_to_keep``).
        Returns:
            The wrapped model's output (logits [B, N, V], loss, cache ...).
        """
        self._require_hooks()
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        inputs = _check_inputs(input_ids, kwargs.get("inputs_embeds"))
        batch, length = inputs.shape[:2]
        if labels is not None and (not isinstance(labels, Tensor) or tuple(labels.shape) != (batch, length)):
            raise ValueError(f"labels must be a [B, N] = {(batch, length)} tensor like input_ids, "
                             f"got {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        if cache is not None and cache.get_seq_length() > 0:
            return self._decode_step(input_ids, attention_mask, cache, labels, kwargs)
        if self.training and torch.is_grad_enabled() and self._arch.reentrant_checkpointing():
            raise ValueError("IAPT needs non-reentrant activation checkpointing (the prefix reaches each layer as a "
                             "keyword argument, which reentrant checkpointing cannot differentiate): call "
                             "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
        mask = self._check_mask(attention_mask, "attention_mask", batch, length, inputs.device)
        if instruction_mask is None and labels is not None:
            instruction_mask = _prompt_before_labels(labels, mask)
        request = self._make_request(mask, instruction_mask, adapter_names, batch, length, inputs.device)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = _positions(mask)
        ext_mask = torch.cat([request.prefix_mask.to(mask.dtype), mask], dim=1)
        if cache is not None:
            kwargs[self._model_cache_kw] = cache
        token = _PENDING.set((self, request))
        try:
            return self.base_model(input_ids=input_ids, attention_mask=ext_mask, labels=labels, **kwargs)
        finally:
            _PENDING.reset(token)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 instruction_mask: Tensor | None = None, adapter_names: Sequence[str | None] | None = None,
                 **generate_kwargs: Any):
        """``generate()`` of the wrapped model with the IAPT prefix computed once, at prefill.

        Greedy, sampling and beam search work (the prefix slots live in the KV cache and follow
        its reordering). Args as in :meth:`forward`; ``instruction_mask`` defaults to the
        prompt's attention mask (the whole prompt is the instruction).
        """
        self._require_hooks()
        for key, what in _UNSUPPORTED_GENERATE.items():
            if generate_kwargs.get(key) is not None:
                raise ValueError(f"IAPTModel.generate does not support {what} ({key}=) yet")
        gen_config = generate_kwargs.get("generation_config")
        if generate_kwargs.get("use_cache") is False or (gen_config is not None and gen_config.use_cache is False):
            raise ValueError("IAPTModel.generate needs use_cache=True: the prefix lives in the KV cache")
        implementation = generate_kwargs.get("cache_implementation") or getattr(gen_config, "cache_implementation", None)
        if implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={implementation!r} is not supported with IAPT (use the dynamic cache)")
        for key in ("cache", "past_key_values"):
            if generate_kwargs.get(key) is not None:
                raise ValueError(f"IAPTModel.generate starts from an empty cache; do not pass {key}=")
        batch, length = _check_inputs(input_ids, None).shape
        mask = self._check_mask(attention_mask, "attention_mask", batch, length, input_ids.device)
        request = self._make_request(mask, instruction_mask, adapter_names, batch, length, input_ids.device,
                                     new_tokens=self._max_new_tokens(length, generate_kwargs))
        position_ids = generate_kwargs.pop("position_ids", None)
        if position_ids is None:
            position_ids = _positions(mask)
        ext_mask = torch.cat([request.prefix_mask.to(mask.dtype), mask], dim=1)
        token = _PENDING.set((self, request))
        try:
            return self.base_model.generate(input_ids=input_ids, attention_mask=ext_mask,
                                            position_ids=position_ids, **generate_kwargs)
        finally:
            _PENDING.reset(token)

    def _max_new_tokens(self, length: int, generate_kwargs: dict) -> int:
        config = generate_kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        new = generate_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if new is None:
            total = generate_kwargs.get("max_length", getattr(config, "max_length", None))
            new = max(0, total - length) if total is not None else 0
        return int(new)

    # ------------------------------------------------------------------ validation
    def _check_mask(self, mask: Tensor | None, name: str, batch: int, length: int, device) -> Tensor:
        if mask is None:
            return torch.ones(batch, length, dtype=torch.long, device=device)
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"{name} must be [B, N] = {(batch, length)}, got {tuple(mask.shape)}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool or integer (1 = token), got {mask.dtype}")
        if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{name} must hold only 0 and 1")
        return mask.to(device=device, dtype=torch.long)

    def _make_request(self, mask: Tensor, instruction_mask: Tensor | None, adapter_names, batch: int,
                      length: int, device, new_tokens: int = 0) -> _Request:
        implementation = getattr(self.base_model.config, "_attn_implementation", None)
        if implementation not in VERIFIED_ATTENTION:
            # Other kernels build their masks differently (flash: unpadding; flex: block
            # masks); until verified against the slow reference they are refused, not guessed.
            raise ValueError(f"attn_implementation={implementation!r} is not supported by IAPT yet; "
                             f"use one of {VERIFIED_ATTENTION}")
        if instruction_mask is None:
            inst = mask.bool()
        else:
            inst = self._check_mask(instruction_mask, "instruction_mask", batch, length, device).bool()
            if (inst & ~mask.bool()).any():
                rows = torch.nonzero((inst & ~mask.bool()).any(dim=1)).flatten().tolist()
                raise ValueError(f"instruction_mask marks padding tokens (attention_mask = 0) in rows {rows}")
        rows = self._row_adapters(adapter_names, batch)
        used = [n for n in rows if n is not None]
        if not used:
            num_tokens = self.generators[self._require_active()].config.num_soft_tokens
        else:
            num_tokens = self._check_compatible(used)
        hides = not used or len(self.generators[used[0]].layer_indices) != self._arch.num_layers
        self._arch.check_prefix_support(num_tokens, hides, length + new_tokens)
        empty = ~inst.any(dim=1)
        has_prefix = torch.tensor([n is not None for n in rows], device=device)
        if (empty & has_prefix).any():
            bad = torch.nonzero(empty & has_prefix).flatten().tolist()
            raise ValueError(f"rows {bad} have an empty instruction (instruction_mask is all zeros); "
                             "every row needs at least one instruction token")
        prefix_mask = has_prefix[:, None].expand(batch, num_tokens).long()
        return _Request(instruction_mask=inst, row_adapters=rows, prefix_mask=prefix_mask, num_tokens=num_tokens,
                        hides_prefix=hides)

    def _row_adapters(self, adapter_names, batch: int) -> list[str | None]:
        if adapter_names is None:
            return [self._require_active()] * batch
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {adapter_names!r}")
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
        rows: list[str | None] = []
        loaded = self.generators.adapters
        for name in adapter_names:
            if name is None or name == BASE_ADAPTER:
                rows.append(None)
            elif not isinstance(name, str):
                raise TypeError(f"adapter_names entries must be strings, got {name!r}")
            elif name not in loaded:
                raise ValueError(f"unknown adapter {name!r} in adapter_names; loaded adapters: {self.adapter_names}")
            else:
                rows.append(name)
        return rows

    def _check_compatible(self, names: Iterable[str]) -> int:
        seen: dict[tuple, str] = {}
        for name in dict.fromkeys(names):
            cfg = self.generators[name].config
            key = (tuple(self.generators[name].layer_indices), cfg.num_soft_tokens)
            seen.setdefault(key, name)
        if len(seen) > 1:
            desc = "; ".join(f"{n!r}: layers {k[0]}, T={k[1]}" for k, n in seen.items())
            raise ValueError("adapters in one batch must share target_layers and num_soft_tokens "
                             f"(their soft tokens share the KV cache slots); got {desc}")
        return next(iter(seen))[1]

    # ------------------------------------------------------------------ manual decoding
    def _decode_step(self, input_ids, attention_mask, cache, labels, kwargs):
        skip = getattr(cache, "_iapt_prefix_len", None)
        if skip is None:
            raise ValueError("the cache passed to forward() was not produced by an IAPTModel prefill")
        prefix_mask = cache._iapt_prefix_mask
        q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        past_real = cache.get_seq_length() - skip
        self._arch.check_prefix_support(skip, cache._iapt_hides_prefix, past_real + q)
        if attention_mask is not None:
            if attention_mask.shape[1] != past_real + q:
                raise ValueError(f"attention_mask must cover the {past_real} cached and {q} new tokens "
                                 f"(without the prefix), got length {attention_mask.shape[1]}")
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = _positions(attention_mask.long())[:, -q:]
            attention_mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
        elif kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(past_real, past_real + q, device=cache_device(cache))[None]
        kwargs[self._model_cache_kw] = cache
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    # ================================================================== hooks
    def _install_hooks(self) -> None:
        arch = self._arch
        self._handles.append(self.base_model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for index, layer in enumerate(arch.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index, layer), with_kwargs=True))
            attn = arch.attention(layer)
            self._handles.append(attn.register_forward_pre_hook(self._attention_hook(index, attn), with_kwargs=True))

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pending = _PENDING.get()
        if pending is None or pending[0] is not self:
            return None
        request = pending[1]
        _PENDING.set(None)  # one prefill per request; decode steps pass straight through
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        batch = inputs.shape[0]
        key = self._model_cache_kw
        cache = kwargs.get(key)
        if cache is None:
            cache = kwargs.get("past_key_values") if key != "past_key_values" else None
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.base_model.config)
        elif cache.get_seq_length() != 0:
            raise ValueError("IAPT prefill needs an empty cache")
        kwargs.pop("past_key_values", None)
        kwargs[key] = cache
        expand = batch // request.instruction_mask.shape[0]
        if expand * request.instruction_mask.shape[0] != batch:
            raise ValueError(f"batch of {batch} rows does not match the request's {request.instruction_mask.shape[0]}")
        inst = request.instruction_mask
        rows = request.row_adapters
        prefix_mask = request.prefix_mask
        if expand > 1:  # beam search / num_return_sequences expand rows with repeat_interleave
            inst = inst.repeat_interleave(expand, dim=0)
            prefix_mask = prefix_mask.repeat_interleave(expand, dim=0)
            rows = [n for n in rows for _ in range(expand)]
        groups = self._plan(rows, inst.device)
        self._seed_cache(cache, batch, request.num_tokens)
        cache._iapt_prefix_len = request.num_tokens
        cache._iapt_prefix_mask = prefix_mask
        cache._iapt_hides_prefix = request.hides_prefix
        cache._iapt_layers = frozenset(groups[0].key[0]) if groups else frozenset()
        active = _Active(inst, groups, request.num_tokens, batch)
        # transformers hands the model's extra keyword arguments down to every decoder layer.
        # Riding along with them, the prefill state reaches the layer hooks even when a
        # checkpointed layer is replayed during backward (transformers 5.17 runs the hooks
        # inside the checkpoint, 5.24 outside; both keep the call's keyword arguments).
        kwargs[_STATE_KW] = active
        return args, kwargs

    def _seed_cache(self, cache, batch: int, num_tokens: int) -> None:
        dtype = _activation_dtype(self.base_model)
        for index, layer in enumerate(self._arch.layers):
            heads, head_dim = self._arch.kv_shape(layer)
            slots = torch.zeros(batch, heads, num_tokens, head_dim, dtype=dtype, device=self._arch.layer_device(index))
            cache.update(slots, slots, index)

    def _plan(self, rows: list[str | None], device) -> list[_Group]:
        """Split the rows of a batch into generator launches (one per shape group)."""
        serving = not torch.is_grad_enabled() or not any(
            p.requires_grad for n in set(r for r in rows if r is not None) for p in self.generators[n].parameters()
        )
        by_key: dict[tuple, list[int]] = {}
        keys = self._group_keys
        for row, name in enumerate(rows):
            if name is None:
                continue
            key = keys.get(name)
            if key is None:
                key = keys[name] = group_key(self.generators, name)
            by_key.setdefault(key, []).append(row)
        packs = self._current_packs() if serving else None
        groups = []
        for key, members in by_key.items():
            names = [rows[r] for r in members]
            row_index = None if len(members) == len(rows) else torch.tensor(members, device=device)
            if packs is not None:
                pack = packs[key]
                ids = torch.tensor([pack.index[n] for n in names], device=device)
                distinct = pack.names
            else:
                pack = None
                distinct = list(dict.fromkeys(names))
                position = {n: i for i, n in enumerate(distinct)}
                ids = torch.tensor([position[n] for n in names], device=device)
            cfg = self.generators[names[0]].config
            groups.append(_Group(key=key, rows=row_index, ids=ids, names=distinct, pack=pack,
                                 pool_input=cfg.pool_input, version=cfg.rational_version))
        return groups

    def _current_packs(self) -> dict[tuple, AdapterPack]:
        packs = self._packs
        if packs is None or not all(p.is_live() for p in packs.values()):
            with _PACK_LOCK:  # concurrent first calls must not re-point the parameters twice
                packs = self._packs
                if packs is None or not all(p.is_live() for p in packs.values()):
                    packs = self._packs = build_packs(self.generators)
        return packs

    def _layer_hook(self, index: int, layer: nn.Module):
        arch = self._arch

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            active = kwargs.pop(_STATE_KW, None)
            if active is None:
                if not self._has_untargeted:
                    return None
                cache = _find_cache(args, kwargs)
                skip = getattr(cache, "_iapt_prefix_len", 0) if cache is not None else 0
                if not skip or index in cache._iapt_layers:
                    return None
                kwargs[_SKIP_KW] = skip
                return args, kwargs
            hidden = args[0] if args else kwargs["hidden_states"]
            groups = [g for g in active.groups if index in g.key[0]]
            if not groups:
                kwargs[_SKIP_KW] = active.num_tokens
                return args, kwargs
            soft = self._soft_tokens(index, layer, hidden, active, groups)
            if arch.family != "gpt2" and active.rotary is None:
                active.rotary = arch.rotary(hidden, active.num_tokens)
            kwargs[_PREFIX_KW] = arch.prefix_kv(layer, soft, active.rotary)
            return args, kwargs

        return hook

    def _soft_tokens(self, index: int, layer: nn.Module, hidden: Tensor, active: _Active,
                     groups: list[_Group]) -> Tensor:
        """P_l [B, T, d] for every row: one prompt_generator call per shape group."""
        norm = self._arch.input_norm(layer)
        normed = None
        out = None
        for group in groups:
            source = hidden
            if group.pool_input == "normed":
                normed = norm(hidden) if normed is None else normed
                source = normed
            mask, ids, rows = active.instruction_mask, group.ids, group.rows
            if mask.device != hidden.device:  # layers spread over devices (device_map)
                mask, ids = mask.to(hidden.device), ids.to(hidden.device)
                rows = rows.to(hidden.device) if rows is not None else None
            if rows is not None:
                source, mask = source.index_select(0, rows), mask.index_select(0, rows)
            if group.pack is not None:
                weights = group.pack.weights[index]
            else:
                weights = self.generators.stacked_weights(index, group.names)
            soft = _functional.prompt_generator(
                source, mask, **weights, adapter_ids=ids if len(weights["w_down"]) > 1 else None,
                backend=self.backend, rational_version=group.version,
                check_ids=False,  # built on the host from validated adapter names: no device sync
            )
            if rows is None:
                return soft
            if out is None:
                # Rows without an adapter keep P = 0: finite through the norms, masked anyway.
                out = hidden.new_zeros(active.batch, soft.shape[1], hidden.shape[-1])
            out = out.index_copy(0, rows, soft)
        return out

    def _attention_hook(self, index: int, attn: nn.Module):
        cache_kw = cache_kwarg_name(attn.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            prefix = kwargs.pop(_PREFIX_KW, None)
            skip = kwargs.pop(_SKIP_KW, None)
            if prefix is None and skip is None:
                return None
            cache = kwargs.get(cache_kw)
            if prefix is not None:
                keys, values = prefix
                if cache is None:
                    kwargs[cache_kw] = _PrefixCache(keys, values)
                else:
                    slot = cache.layers[index]
                    if slot.keys is None or slot.keys.shape[-2] != keys.shape[-2]:
                        raise RuntimeError(f"IAPT: layer {index} of the cache does not hold exactly the seeded prefix slots")
                    slot.keys, slot.values = keys, values
                return args, kwargs
            if cache is not None:
                kwargs[cache_kw] = _SkipPrefixCache(cache, skip)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 4:
                kwargs["attention_mask"] = mask[..., skip:]
            return args, kwargs

        return hook

    def remove_hooks(self) -> nn.Module:
        """Detach IAPT from the backbone and return the bare model (the adapters are discarded)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.base_model._iapt_wrapped = False
        return self.base_model


def get_iapt_model(model: nn.Module, config: IAPTConfig | None = None, adapter_name: str = "default",
                   backend: str = "auto", seed: int | None = None, tokenizer: Any | None = None) -> IAPTModel:
    """Wrap a transformers causal LM with IAPT: freezes the backbone, adds one generator per
    target layer. ``config`` defaults to ``IAPTConfig()`` (the anchored form, normed pooling);
    ``tokenizer`` is needed only for ``anchor_init="text"``. See :class:`IAPTModel`."""
    config = IAPTConfig() if config is None else config
    if not isinstance(config, IAPTConfig):
        raise TypeError(f"config must be an IAPTConfig, got {type(config).__name__}")
    return IAPTModel(model, config, adapter_name=adapter_name, backend=backend, seed=seed, tokenizer=tokenizer)


# ====================================================================== helpers
def _prompt_before_labels(labels: Tensor, mask: Tensor) -> Tensor:
    """[B, N] instruction mask: each row's real tokens before its first label that is not −100.

    Rows without labels keep every real token (they predict nothing). A row whose first real
    token is already labelled (plain language-model data) has no instruction to read.
    """
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"labels must be a [B, N] = {tuple(mask.shape)} tensor like input_ids, "
                         f"got {getattr(labels, 'shape', type(labels).__name__)}")
    labelled = labels.to(mask.device).ne(-100) & mask.bool()
    before = labelled.long().cumsum(-1).eq(0)
    inst = before & mask.bool()
    has_labels = labelled.any(-1)
    inst = torch.where(has_labels[:, None], inst, mask.bool())
    empty = has_labels & ~inst.any(-1)
    if empty.any():
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"rows {rows} are labelled from their first token on, so no instruction can be derived "
                         "from labels (the generators would read the answer they predict): pass instruction_mask=, "
                         "1 on the prompt tokens")
    return inst.long()


def _check_inputs(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """The batch's input tensor, after checking it is [B, N] ids (or [B, N, d] embeddings), B, N >= 1."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids [B, N] or inputs_embeds [B, N, d]")
    name, inputs, dims = ("input_ids", input_ids, 2) if input_ids is not None else ("inputs_embeds", inputs_embeds, 3)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() != dims:
        raise ValueError(f"{name} must be {'[B, N]' if dims == 2 else '[B, N, d]'}, got shape {tuple(inputs.shape)}"
                         + (" (a single sequence needs a batch axis: input_ids[None])" if inputs.dim() == dims - 1 else ""))
    if dims == 2 and (inputs.dtype.is_floating_point or inputs.dtype == torch.bool):
        raise TypeError(f"input_ids must be integer token ids, got {inputs.dtype}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one token, got shape {tuple(inputs.shape)}")
    return inputs


def _positions(mask: Tensor) -> Tensor:
    """Position ids as the base model gives them: cumsum of the mask − 1, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _find_cache(args: tuple, kwargs: dict):
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None and len(args) > 1 and hasattr(args[1], "get_seq_length"):  # gpt2 passes it positionally
        cache = args[1]
    return cache


def _activation_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def cache_device(cache) -> torch.device:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            return layer.keys.device
    return torch.device("cpu")
