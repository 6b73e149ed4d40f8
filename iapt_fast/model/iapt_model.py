"""IAPT on Hugging Face causal LMs: ``get_iapt_model`` / ``IAPTModel``, the front users call.

A prefill crosses six files (design.md §9): four of this package, ``generator/bank.py`` and
the generator op in ``generator/functional.py``:

* ``IAPTModel`` (here): adapter lifecycle, save/load, ``forward``, ``generate`` and manual
  decode steps, delegation of everything else to the wrapped model; and the compile gate (a
  generate() that may compile runs alone among concurrent calls);
* ``call_state.py``: a call validated into a ``Request``, planned into generator launches, and
  carried by the ``IAPTCache`` the backbone is called with;
* ``prefix_hooks.py``: the hooks that put the soft tokens into the KV cache;
* ``architectures.py``: what differs between model families;
* ``generator/bank.py``: the adapters' generator weights and the serving packs (same-shape
  adapters stacked once); ``generator/functional.py``: the generator op.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from iapt_fast.config import IAPTConfig
from iapt_fast.generator import functional as _functional
from iapt_fast.generator.bank import GeneratorBank, ServingPacks, check_adapter_name
from iapt_fast.model.adapter_io import (backbone_record, build_adapter, read_adapter, save_adapter,
                                        saved_backbone_record)
from iapt_fast.model.anchor import anchor_states, anchor_token_ids
from iapt_fast.model.architectures import get_architecture
from iapt_fast.model.call_state import (BASE_ADAPTER, VERIFIED_ATTENTION, IAPTCache, cache_implementation,
                                        check_checkpointing, check_generate_kwargs, check_inputs, check_labels,
                                        check_mask, decode_step_may_compile, make_request, max_new_tokens,
                                        positions, prompt_before_labels, require_active, static_cache_length)
from iapt_fast.model.prefix_hooks import PrefixHooks, hooks_installed_on

__all__ = ["IAPTModel", "get_iapt_model", "BASE_ADAPTER", "VERIFIED_ATTENTION", "CompileGate", "GATE", "gate"]


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
        if hooks_installed_on(model):
            raise ValueError("this model is already wrapped by an IAPTModel (its hooks would run twice); "
                             "add adapters to that one, or call its remove_hooks() first")
        self.base_model = model
        self._arch = arch
        self.backend = backend
        for param in model.parameters():
            param.requires_grad_(False)
        self.generators = GeneratorBank(arch.hidden_size, arch.num_layers,
                                        backbone=backbone_record(model.config, arch.num_layers))
        self._active_adapter: str | None = None
        self._packs = ServingPacks(self.generators)
        self._hooks = PrefixHooks(arch, self.generators, self._packs, backend=lambda: self.backend)
        self._hooks.install()
        self._static_cache_length = 0  # the longest static cache built so far: reused lengths keep compiled shapes
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
    def decoder_layers(self) -> list[nn.Module]:
        """The backbone's decoder layers, in order (FSDP's units of sharding)."""
        return list(self._arch.layers)

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
            with gate():  # a backbone call like any other (the compile gate below)
                anchors = anchor_states(self.base_model, anchor_token_ids(config, self.base_model, tokenizer), layers)
        adapter = self.generators.add_adapter(adapter_name, config, seed=seed, anchors=anchors)
        for layer in adapter.layer_indices:  # each generator lives with its layer (device_map="auto")
            adapter[layer].to(self._arch.layer_device(layer))
        adapter.set_trainable(adapter_name == self._active_adapter)
        self._adapters_changed()

    def load_adapter(self, path: str | os.PathLike, adapter_name: str, allow_other_backbone: bool = False) -> None:
        """Load a saved adapter under ``adapter_name``; the backbone is not touched or copied.

        Everything is read and validated before the bank changes, so a failure leaves the
        loaded adapters as they were. An adapter whose file records another backbone family,
        hidden size or depth is refused (its anchors are another model's hidden states)
        unless ``allow_other_backbone=True``; one saved without that record loads with a warning.
        """
        if not isinstance(allow_other_backbone, bool):
            raise TypeError(f"allow_other_backbone must be a bool, got {allow_other_backbone!r}")
        self._check_new_name(adapter_name)
        config, tensors = read_adapter(path, self._arch.hidden_size, self._arch.num_layers,
                                       backbone=self.generators.backbone, allow_other_backbone=allow_other_backbone)
        self._check_supported(config, f"adapter {os.fspath(path)!r}")
        # The record names the backbone the weights were made on; unrecorded ones are now this one's.
        adapter = build_adapter(config, tensors, self._arch.hidden_size, self._arch.num_layers,
                                self._arch.layer_device,
                                backbone=saved_backbone_record(path) or self.generators.backbone)
        for param in adapter.parameters():
            param.requires_grad_(False)
        self.generators.adapters[adapter_name] = adapter
        self._adapters_changed()
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
            self.generators[name].set_trainable(name == adapter_name)

    def generator_weights(self, layer: int, adapter_name: str | None = None) -> dict[str, Tensor]:
        """Detached copies of one layer's weights in the [A, ...] layout, A = 1 (see
        :meth:`GeneratorBank.layer_weights`); ``adapter_name`` defaults to the active one."""
        name = adapter_name if adapter_name is not None else self._require_active()
        return self.generators.layer_weights(name, layer)

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

    def _adapters_changed(self) -> None:
        self._packs.invalidate()

    def _require_hooks(self) -> None:
        if not self._hooks.installed:
            raise RuntimeError("this IAPTModel was detached from its backbone (remove_hooks()); wrap the backbone "
                               "again with get_iapt_model / IAPTModel.from_pretrained")

    def _require_active(self) -> str:
        return require_active(self.generators, self._active_adapter)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half() re-home parameters
        self._packs.invalidate()
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
                        backend: str = "auto", allow_other_backbone: bool = False) -> "IAPTModel":
        """Wrap ``model`` and load the adapter saved in ``path`` (bit for bit); see
        :meth:`load_adapter` for ``allow_other_backbone``."""
        wrapped = cls(model, None, backend=backend)
        try:
            wrapped.load_adapter(path, adapter_name, allow_other_backbone=allow_other_backbone)
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
        inputs = check_inputs(input_ids, kwargs.get("inputs_embeds"))
        batch, length = inputs.shape[:2]
        check_labels(labels, batch, length)
        if cache is not None and cache.get_seq_length() > 0:
            kwargs = self._hooks.decode_kwargs(input_ids, attention_mask, cache, kwargs)
            with gate():
                return self.base_model(input_ids=input_ids, labels=labels, **kwargs)
        if self.training and torch.is_grad_enabled():
            check_checkpointing(self._arch)
        mask = check_mask(attention_mask, "attention_mask", batch, length, inputs.device)
        if instruction_mask is None and labels is not None:
            instruction_mask = prompt_before_labels(labels, mask)
        request = make_request(self.generators, self._arch, self._active_adapter, mask, instruction_mask, adapter_names)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = positions(mask)
        carrier = IAPTCache(cache if cache is not None else DynamicCache(config=self.base_model.config), request)
        kwargs[self._hooks.model_cache_kw] = carrier
        try:
            with gate():
                return self.base_model(input_ids=input_ids, attention_mask=request.attention_mask, labels=labels,
                                       **kwargs)
        finally:
            carrier.end_prefill()  # also after a failure: the cache must never look mid-prefill

    def forward_body(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                     instruction_mask: Tensor | None = None, adapter_names: Sequence[str | None] | None = None,
                     **kwargs: Any) -> BaseModelOutputWithPast:
        """The backbone's final hidden states under the IAPT prefix, for a head of the caller's own
        (TRL's fused LM head projects them itself, without building [B, N, V] logits).

        It is a :meth:`forward` call (same validation, request and prefix), whose LM head runs
        on the last position only; the wrapped model's last hidden state (after its final norm)
        is taken from the call, so the body runs exactly as under :meth:`forward`.

        Args as in :meth:`forward`, without ``labels``: with no labels to derive it from,
        ``instruction_mask`` defaults to every non-padding token, so pass it when training.
        Returns:
            BaseModelOutputWithPast: ``last_hidden_state`` [B, N, d]; ``hidden_states`` (L + 1
            tensors [B, N, d]) only with ``output_hidden_states=True``; ``past_key_values``.
        """
        for key in ("labels", "logits_to_keep"):
            if kwargs.get(key) is not None:
                raise TypeError(f"forward_body() takes no {key}= (it returns hidden states, not logits)")
        kwargs.pop("logits_to_keep", None)
        want_all = bool(kwargs.pop("output_hidden_states", False))
        out = self.forward(input_ids=input_ids, attention_mask=attention_mask, instruction_mask=instruction_mask,
                           adapter_names=adapter_names, output_hidden_states=True, logits_to_keep=1, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=out.hidden_states[-1],
                                       past_key_values=getattr(out, "past_key_values", None),
                                       hidden_states=out.hidden_states if want_all else None,
                                       attentions=getattr(out, "attentions", None))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 instruction_mask: Tensor | None = None, adapter_names: Sequence[str | None] | None = None,
                 **generate_kwargs: Any):
        """``generate()`` of the wrapped model with the IAPT prefix computed once, at prefill.

        Greedy, sampling and beam search work (the prefix slots live in the KV cache and follow
        its reordering), with the dynamic cache or ``cache_implementation="static"`` (sized T
        slots longer; its decode step compiles, see ``iapt_fast.compat.decode_compile_config``).
        Args as in :meth:`forward`; ``instruction_mask`` defaults to the prompt's attention mask
        (the whole prompt is the instruction).
        """
        self._require_hooks()
        check_generate_kwargs(self.base_model, generate_kwargs)
        batch, length = check_inputs(input_ids, None).shape
        mask = check_mask(attention_mask, "attention_mask", batch, length, input_ids.device)
        new_tokens = max_new_tokens(self.base_model, length, generate_kwargs)
        request = make_request(self.generators, self._arch, self._active_adapter, mask, instruction_mask,
                               adapter_names, new_tokens=new_tokens)
        exclusive = decode_step_may_compile(self.base_model, generate_kwargs)
        carrier = IAPTCache(self._generation_cache(generate_kwargs, request.num_tokens, length, new_tokens), request)
        position_ids = generate_kwargs.pop("position_ids", None)
        if position_ids is None:
            position_ids = positions(mask)
        generate_kwargs[self._hooks.model_cache_kw] = carrier
        # A decode step that may compile runs alone (the compile gate below: torch's compile flag is process-wide).
        with gate(exclusive=exclusive):
            return self.base_model.generate(input_ids=input_ids, attention_mask=request.attention_mask,
                                            position_ids=position_ids, **generate_kwargs)

    def _generation_cache(self, generate_kwargs: dict, num_tokens: int, length: int, new_tokens: int):
        """The empty transformers cache a generate() call fills: static when asked (T slots longer, never
        shorter than the last one, so a compiled decode step keeps its shapes), else dynamic. The call's
        cache options are taken out of ``generate_kwargs``: the cache is passed in built."""
        config = self.base_model.config.get_text_config(decoder=True)
        static = cache_implementation(self.base_model, generate_kwargs) == "static"
        if static:
            needed = static_cache_length(self.base_model, generate_kwargs, num_tokens, length, new_tokens)
            self._static_cache_length = max(self._static_cache_length, needed)
        generate_kwargs["cache_implementation"] = None  # the cache is passed in built
        generate_kwargs.pop("max_cache_len", None)
        if not static:
            return DynamicCache(config=config)
        return StaticCache(config=config, max_cache_len=self._static_cache_length)

    def remove_hooks(self) -> nn.Module:
        """Detach IAPT from the backbone and return the bare model (the adapters are discarded)."""
        self._hooks.remove()
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


# ---------------------------------------------------------------------- the compile gate
# Compiled decode steps beside concurrent eager calls: a compile never overlaps an eager call.
#
# While any thread compiles, torch holds one process-wide flag (``torch.compiler.is_compiling()``
# is True in *every* thread, torch 2.13), and transformers and the ``kernels`` distribution take
# their compile-only paths in every thread that reads it. The attention classes transformers 5.25
# decorates with ``kernels``' ``use_kernelized_func`` (Llama, Qwen3, Mistral...) keep their
# routing in a ``CompileableContextVar``, which then switches a module-wide variable under the
# feet of eager calls in other threads: ``TypeError: expected an instance of Token`` in the eager
# thread, or dynamo's "Guard failed on the same frame it was created" in the compiling one.
#
# Neither class can be fixed from here, so the calls are kept apart instead: a ``generate()``
# whose decode step may compile holds GATE exclusively (it waits for the eager calls in
# flight and holds off new ones until it returns); eager calls hold it shared and run side by
# side as before. IAPT's own hooks read ``torch.compiler.is_dynamo_compiling()``, which is true
# only in the frame dynamo traces, never the process-wide flag.


class CompileGate:
    """A readers-writer gate: ``shared()`` blocks may overlap each other; an ``exclusive()``
    block overlaps nothing. A waiting exclusive holder is served before new shared ones (a
    stream of eager calls cannot starve a compiled one). Nested blocks in a thread that already
    holds the gate (a call made from inside another) pass straight through, and so does code
    that dynamo is tracing (a lock cannot enter a graph; the traced call's caller holds the gate
    if it is an IAPT call)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting
        self._depth = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._hold(exclusive=False):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._hold(exclusive=True):
            yield

    @contextlib.contextmanager
    def _hold(self, exclusive: bool) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        if depth or torch.compiler.is_dynamo_compiling():
            yield
            return
        self._acquire(exclusive)
        self._depth.value = 1
        try:
            yield
        finally:
            self._depth.value = 0
            self._release(exclusive)

    def _acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._waiting += 1
                try:
                    while self._exclusive or self._shared:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._shared += 1

    def _release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


GATE = CompileGate()


def gate(exclusive: bool = False) -> contextlib.AbstractContextManager:
    """``GATE.exclusive()`` or ``GATE.shared()``; nothing in a frame dynamo traces (checked
    here, so the traced code never meets the gate's lock)."""
    if torch.compiler.is_dynamo_compiling():
        return contextlib.nullcontext()
    return GATE.exclusive() if exclusive else GATE.shared()
