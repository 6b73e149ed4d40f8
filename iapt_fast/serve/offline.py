"""Offline serving in vLLM's ``LLM`` style, with an adapter name per request."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from iapt_fast.serve.adapters import AdapterSpec
from iapt_fast.serve.options import RequestPreparer, codec_for, engine_kwargs, load_front_adapters
from iapt_fast.serve.outputs import strip_placeholders

__all__ = ["IAPTLLM"]


class IAPTLLM:
    """A vLLM ``LLM`` serving one backbone and its IAPT adapters.

    Args:
        model: the backbone's folder (as vLLM's ``LLM(model=...)``).
        adapters: adapter name → adapter folder.
        **kwargs: vLLM engine options (``enable_chunked_prefill`` and ``enforce_eager`` are set
            for IAPT; speculative decoding and pipeline parallelism are refused).

    Example::

        llm = IAPTLLM("path/to/llama", {"sql": "adapters/sql"}, dtype="float32")
        outs = llm.generate(["Write a query"], SamplingParams(max_tokens=32), adapter_names=["sql"])
    """

    def __init__(self, model: str, adapters: Mapping[str, str], **kwargs: Any) -> None:
        from vllm import LLM

        specs = [AdapterSpec(name, path) for name, path in adapters.items()]
        config, self.adapters = load_front_adapters(model, specs)
        self.llm = LLM(model=model, **engine_kwargs(config, specs, kwargs))
        max_len = self.llm.llm_engine.model_config.max_model_len
        self.preparer = RequestPreparer(self.adapters, codec_for(config.vocab_size, len(specs), max_len))

    def engine_prompt(self, prompt: str | Sequence[int], adapter_name: str | None) -> dict[str, Any]:
        """The engine's form of one request (a ``TokensPrompt``: placeholder header + prompt ids,
        cache salt), for callers that drive ``self.llm.llm_engine`` themselves.

        Args:
            prompt: a text (tokenized with the model's tokenizer) or token ids.
            adapter_name: a served adapter, or None for the bare backbone.
        """
        from vllm.inputs import TokensPrompt

        ids = self.llm.get_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids, salt = self.preparer.prepare(ids, adapter_name)
        engine_prompt = TokensPrompt(prompt_token_ids=ids)
        if salt is not None:
            engine_prompt["cache_salt"] = salt
        return engine_prompt

    def generate(self, prompts: Sequence[str | Sequence[int]], sampling_params: Any = None,
                 adapter_names: Sequence[str | None] | None = None, use_tqdm: bool = False) -> list[Any]:
        """``LLM.generate`` with one adapter per prompt (None: the bare backbone).

        Args:
            prompts: texts (tokenized with the model's tokenizer) or token id lists.
            sampling_params: one ``SamplingParams`` or one per prompt.
            adapter_names: one per prompt; default: all None.
        Returns:
            vLLM's ``RequestOutput`` per prompt; ``prompt_token_ids`` and ``prompt_logprobs``
            are the prompt's own (the placeholders are removed).
        """
        if adapter_names is None:
            adapter_names = [None] * len(prompts)
        if len(adapter_names) != len(prompts):
            raise ValueError(f"adapter_names must give one name per prompt: {len(prompts)} prompts, "
                             f"{len(adapter_names)} names")
        engine_prompts = [self.engine_prompt(prompt, name) for prompt, name in zip(prompts, adapter_names)]
        outputs = self.llm.generate(engine_prompts, sampling_params, use_tqdm=use_tqdm)
        return [strip_placeholders(output, self.preparer.num_tokens(name))
                for output, name in zip(outputs, adapter_names)]

    def shutdown(self) -> None:
        """Stop the engine's processes now (otherwise they stop when the interpreter exits)."""
        self.llm.llm_engine.engine_core.shutdown()
