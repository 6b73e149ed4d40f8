"""What the engine returns for an IAPT request, as the client must see it: without the T
placeholder rows before the prompt.

The placeholders' own rows carry no prediction of a prompt token that ``IAPTModel`` would make
(there, the prefix lives only in the KV cache), so the first prompt token's log-probability is
None, as for any request's first token; every later prompt token's is the engine's, which
equals ``IAPTModel``'s logits at the position before it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["strip_placeholders"]


def strip_placeholders(output: Any, skip: int) -> Any:
    """Drop the ``skip`` placeholder rows from a vLLM ``RequestOutput`` (in place; returned).

    Args:
        output: a ``RequestOutput`` of a request the engine got with ``skip`` placeholder ids
            before its prompt (0: a base request, left as it is).
        skip: T, the number of placeholder ids.
    """
    if not skip:
        return output
    ids = output.prompt_token_ids
    if ids is not None and len(ids) >= skip:
        output.prompt_token_ids = ids[skip:]
    logprobs = getattr(output, "prompt_logprobs", None)
    if logprobs is not None and len(logprobs) > skip:
        kept = [None] + [logprobs[i] for i in range(skip + 1, len(logprobs))]
        if isinstance(logprobs, list):
            output.prompt_logprobs = kept
        else:  # FlatLogprobs (SamplingParams.flat_logprobs): rebuilt position by position
            from vllm.logprobs import create_prompt_logprobs

            flat = create_prompt_logprobs(True)
            for position in kept:
                flat.append(position)
            output.prompt_logprobs = flat
    return output
