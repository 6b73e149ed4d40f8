"""Serving IAPT adapters in vLLM (docs/serving.md). Nothing here imports vLLM at import time.

    plugin.py          the ``vllm.general_plugins`` entry point: registers the model classes
    vllm_model.py      vLLM's llama / mistral / qwen2 / qwen3 with the IAPT decoder loop (in the engine)
    injection.py       finding a step's fresh IAPT prefills, writing P_l into their placeholder rows
    placeholders.py    the placeholder ids that carry a request's adapter and prompt length
    adapters.py        the served adapters: read, checked against the backbone, packed
    options.py         engine options IAPT needs (checked on both sides), request preparation
    offline.py         ``IAPTLLM``: vLLM's ``LLM`` with an adapter per request
    engine_client.py   the OpenAI server's engine client, adapters named by ``model``
    cli.py             ``iapt-serve``
"""
