"""What an IAPT engine needs from vLLM's configuration, checked on both sides.

The front ends (offline.py, cli.py) build the engine options with :func:`engine_kwargs`; the
model inside the engine checks the resulting configuration again (:func:`check_engine_config`),
so an engine built some other way is refused rather than served wrong.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from iapt_fast.serve.adapters import SERVED_FAMILIES, AdapterSpec, ServedAdapters
from iapt_fast.serve.placeholders import PlaceholderCodec

__all__ = ["ADAPTERS_KEY", "engine_kwargs", "check_engine_config", "codec_for", "load_front_adapters",
           "RequestPreparer"]

# hf_config attribute (set through hf_overrides) naming the adapters: JSON [[name, dir], ...].
ADAPTERS_KEY = "iapt_adapters"

# Options the front ends set and that a user may not override.
_FORCED = {
    # A prompt split over steps would let the generators pool part of the instruction.
    "enable_chunked_prefill": False,
    # The injection is data-dependent host work between layers: no graph capture around it.
    "enforce_eager": True,
}


def codec_for(vocab_size: int, num_adapters: int, max_model_len: int) -> PlaceholderCodec:
    """The placeholder codec both sides of one engine agree on."""
    return PlaceholderCodec(int(vocab_size), max(int(num_adapters), 1), int(max_model_len))


def load_front_adapters(model: str, specs: list[AdapterSpec], **config_kwargs: Any) -> tuple[Any, ServedAdapters]:
    """(HF config of the backbone in ``model``, its adapters checked on CPU) — refuses, naming
    it, an adapter that does not fit before any engine starts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, **config_kwargs)
    adapters = ServedAdapters(specs, config.model_type, config.hidden_size, config.num_hidden_layers)
    return config, adapters


def engine_kwargs(config: Any, specs: list[AdapterSpec], user: dict[str, Any]) -> dict[str, Any]:
    """vLLM engine options for serving ``specs`` on a backbone with HF ``config``.

    Args:
        user: the caller's own engine options (``hf_overrides`` is merged; the forced options
            may be given only with their forced values).
    Raises:
        ValueError naming an option that IAPT serving cannot honour.
    """
    for key, value in _FORCED.items():
        if key in user and user[key] != value:
            raise ValueError(f"{key}={user[key]!r} cannot serve IAPT adapters exactly; it must be {value!r}")
    for key in ("speculative_config", "speculative_model"):
        if user.get(key):
            raise ValueError(f"{key}: speculative decoding is not supported with IAPT adapters")
    if int(user.get("pipeline_parallel_size", 1)) > 1:
        raise ValueError("pipeline_parallel_size > 1 is not supported with IAPT adapters (the generators need "
                         "every layer's input on the rank that holds the layer's adapters)")
    overrides = dict(user.get("hf_overrides") or {})
    overrides["architectures"] = [SERVED_FAMILIES[config.model_type]]
    overrides[ADAPTERS_KEY] = json.dumps([[s.name, s.path] for s in specs])
    return {**user, **_FORCED, "hf_overrides": overrides}


def check_engine_config(vllm_config: Any) -> None:
    """Refuse an engine configuration under which IAPT adapters would be served wrong."""
    sched, model_config = vllm_config.scheduler_config, vllm_config.model_config
    if sched.enable_chunked_prefill:
        raise ValueError("IAPT serving needs enable_chunked_prefill=False (a prompt split over steps would let "
                         "the generators pool part of the instruction)")
    if sched.max_num_batched_tokens < model_config.max_model_len:
        raise ValueError(f"IAPT serving needs max_num_batched_tokens ({sched.max_num_batched_tokens}) >= "
                         f"max_model_len ({model_config.max_model_len}): every prompt must fit one step")
    if vllm_config.speculative_config is not None:
        raise ValueError("speculative decoding is not supported with IAPT adapters")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("pipeline parallelism is not supported with IAPT adapters")
    if not model_config.enforce_eager:
        raise ValueError("IAPT serving needs enforce_eager=True (the injection is host work between layers)")


class RequestPreparer:
    """Turns (prompt ids, adapter name) into the ids and cache salt the engine gets.

    Args:
        adapters: the served adapters (slot order).
        codec: the engine's placeholder codec.
        base_names: names that select the bare backbone (None is always one).
    """

    def __init__(self, adapters: ServedAdapters, codec: PlaceholderCodec, base_names: tuple[str, ...] = ()) -> None:
        self.adapters, self.codec, self.base_names = adapters, codec, base_names

    def num_tokens(self, adapter: str | None) -> int:
        """T placeholder rows a request on ``adapter`` carries (0 for the bare backbone)."""
        if adapter is None or adapter in self.base_names:
            return 0
        return self.adapters.slots[self.adapters.slot_of(adapter)].num_tokens

    def prepare(self, prompt_ids: list[int], adapter: str | None) -> tuple[list[int], str | None]:
        """(engine prompt ids, cache salt or None).

        Every key and value of an IAPT request depends on its whole prompt (the generators pool
        it), so its prefix-cache entries are salted with the adapter and the whole prompt.
        """
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("prompt must hold at least one token")
        if adapter is None or adapter in self.base_names:
            if ids[0] == self.codec.marker:
                raise ValueError(f"a prompt may not start with token id {self.codec.marker}: the engine reads it as "
                                 "the placeholder header of an IAPT request")
            return ids, None
        slot = self.adapters.slot_of(adapter)
        header = self.codec.encode(slot, self.adapters.slots[slot].num_tokens, len(ids))
        digest = hashlib.sha256(json.dumps([adapter, ids]).encode()).hexdigest()
        return header + ids, f"iapt:{digest}"
