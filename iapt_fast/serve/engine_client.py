"""The OpenAI server's engine client, with IAPT adapters named by the request's ``model``.

The server maps a request's ``model`` to an adapter as it does for ``--lora-modules``: the
adapters are registered as its static LoRA modules (so ``/v1/models`` lists them, an unknown
name gets the server's 404, and the serving code hands the request to the engine client with
that "LoRA request"). :class:`IAPTEngineClient` wraps vLLM's engine client and turns such a
request into the engine's form of an IAPT request — the placeholder header before the prompt
and a cache salt — so the engine itself never sees a LoRA request.
"""
from __future__ import annotations

import re
from typing import Any, AsyncGenerator

from iapt_fast.serve.options import RequestPreparer
from iapt_fast.serve.outputs import strip_placeholders

__all__ = ["IAPTEngineClient"]

# The server's beam search resubmits each beam as a new prompt (the prompt plus the beam's tokens),
# under the request id "<id>-<uuid>-beam-<i>": the generators would pool the beam's tokens too.
_BEAM_REQUEST = re.compile(r"-beam-\d+$")


class IAPTEngineClient:
    """Delegates everything to ``engine`` except requests on (and registration of) IAPT adapters.

    Args:
        engine: vLLM's engine client (``AsyncLLM``).
        preparer: the served adapters and the engine's placeholder codec.
    """

    def __init__(self, engine: Any, preparer: RequestPreparer) -> None:
        self._engine = engine
        self._preparer = preparer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _adapter_of(self, lora_request: Any) -> str | None:
        name = getattr(lora_request, "lora_name", None)
        return name if name in self._preparer.adapters.names else None

    async def add_lora(self, lora_request: Any) -> bool:
        if self._adapter_of(lora_request) is not None:
            return True  # its generators live in the engine's model since the engine started
        return await self._engine.add_lora(lora_request)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None,
                 **kwargs: Any) -> AsyncGenerator[Any, None]:
        adapter = self._adapter_of(lora_request)
        if adapter is None:
            if isinstance(prompt, dict) and prompt.get("prompt_token_ids"):
                self._preparer.prepare(prompt["prompt_token_ids"], None)  # refuses a forged header
            return self._engine.generate(prompt, sampling_params, request_id, lora_request=lora_request, **kwargs)
        return self._generate(adapter, prompt, sampling_params, request_id, kwargs)

    async def _generate(self, adapter: str, prompt: Any, sampling_params: Any, request_id: str,
                        kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        if _BEAM_REQUEST.search(request_id):
            raise ValueError(f"adapter {adapter!r}: beam search is not supported for IAPT adapters (each beam would "
                             "be resubmitted as a longer instruction, so its soft tokens would differ from "
                             "IAPTModel.generate's); use greedy decoding or sampling")
        if not isinstance(prompt, dict) or prompt.get("type", "token") != "token" or "prompt_token_ids" not in prompt:
            raise ValueError(f"adapter {adapter!r} takes text or token prompts only (no embeddings or multimodal "
                             "inputs)")
        ids, salt = self._preparer.prepare(prompt["prompt_token_ids"], adapter)
        skip = len(ids) - len(prompt["prompt_token_ids"])
        engine_prompt = {**prompt, "prompt_token_ids": ids, "cache_salt": salt}
        engine_prompt.pop("prompt_token_offsets", None)  # offsets of the prompt without placeholders
        params = sampling_params.clone()
        room = self._engine.model_config.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            # The server sized max_tokens without the T placeholder rows.
            params.max_tokens = max(room, 1)
        async for output in self._engine.generate(engine_prompt, params, request_id, lora_request=None, **kwargs):
            yield strip_placeholders(output, skip)
