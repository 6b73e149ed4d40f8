"""``iapt-serve``: vLLM's OpenAI server with IAPT adapters, driven by the ``openai`` client.

Needs vLLM and openai (the serve environment, see README "Serving"). The server runs on
127.0.0.1 on a free port; every wait is bounded.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_fixtures import make_adapters, make_backbone, reference_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

START_TIMEOUT_S = 400  # vLLM's imports and engine start on one core


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(base: str, adapters: dict[str, str], port: int) -> list[str]:
    cmd = [sys.executable, "-m", "iapt_fast.serve.cli", "--model", base, "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--enable-prefix-caching"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return cmd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    base = os.path.join(root, "base")
    model = make_backbone(base)
    paths = make_adapters(model, os.path.join(root, "adapters"))
    port = free_port()
    log = open(os.path.join(root, "server.log"), "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(serve_command(base, paths, port), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"iapt-serve exited with {proc.returncode}:\n" + open(log.name).read()[-4000:])
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("iapt-serve did not start in time:\n" + open(log.name).read()[-4000:])
            time.sleep(2)
        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        yield model, paths, client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def exact(n: int) -> dict:
    """Greedy, exactly n tokens, token ids in the response."""
    return dict(max_tokens=n, temperature=0.0, extra_body={"min_tokens": n, "return_token_ids": True})


def test_models_lists_the_base_and_every_adapter(server):
    _, paths, client = server
    assert [m.id for m in client.models.list().data] == ["base", *paths]


def test_completions_pick_the_adapter_by_model_and_equal_iapt_generate(server):
    model, paths, client = server
    names = ["base", "a", "c", "wide"]
    prompts = [[1, 17, 220, 33, 5, 81], [1, 90, 12], [1, *range(40, 75)], [1, 300, 301, 302, 9, 9, 9, 7]]
    # Arriving together: the engine batches them, each with its own adapter.
    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda a: client.completions.create(model=a[0], prompt=a[1], **exact(8)),
                                  zip(names, prompts)))
    got = [r.choices[0].token_ids for r in responses]
    ref = reference_tokens(model, paths, prompts, [None if n == "base" else n for n in names], 8)
    assert got == ref
    assert [r.usage.prompt_tokens for r in responses] == [len(p) for p in prompts]
    text = client.completions.create(model="b", prompt="good movie, great acting", **exact(6)).choices[0]
    assert text.token_ids == reference_tokens(model, paths, [text.prompt_token_ids], ["b"], 6)[0]


def test_chat_and_streaming_equal_iapt_generate(server):
    model, paths, client = server
    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hello there"}],
                                          **exact(6))
    prompt_ids = chat.prompt_token_ids
    assert chat.choices[0].token_ids == reference_tokens(model, paths, [prompt_ids], ["b"], 6)[0]
    whole = client.completions.create(model="wide", prompt=[1, 50, 60, 70, 80], **exact(7)).choices[0]
    stream = client.completions.create(model="wide", prompt=[1, 50, 60, 70, 80], stream=True, **exact(7))
    streamed = [t for chunk in stream for choice in chunk.choices for t in (choice.token_ids or [])]
    assert streamed == whole.token_ids == reference_tokens(model, paths, [[1, 50, 60, 70, 80]], ["wide"], 7)[0]


def test_beam_search_is_refused_on_adapters_and_served_on_the_base(server):
    import openai

    _, _, client = server
    beams = dict(max_tokens=3, temperature=0.0, n=2, extra_body={"use_beam_search": True})
    assert len(client.completions.create(model="base", prompt=[1, 5, 6, 7], **beams).choices) == 2
    with pytest.raises(openai.APIStatusError, match="beam search is not supported for IAPT adapters"):
        client.completions.create(model="a", prompt=[1, 5, 6, 7], **beams)


def test_unknown_adapter_gets_404(server):
    import openai

    _, _, client = server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hello", max_tokens=2)


def test_an_adapter_that_does_not_fit_is_refused_at_start(tmp_path):
    from iapt_fast import IAPTConfig, get_iapt_model

    base = os.path.join(tmp_path, "base")
    model = make_backbone(base)
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8, target_layers=[0]), adapter_name="partial", seed=0)
    wrapped.save_pretrained(os.path.join(tmp_path, "partial"))
    result = subprocess.run(serve_command(base, {"partial": os.path.join(tmp_path, "partial")}, free_port()),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "adapter 'partial'" in result.stderr and "target_layers" in result.stderr


@pytest.mark.parametrize("option,message", [("--enable-chunked-prefill", "enable_chunked_prefill"),
                                            ("--pipeline-parallel-size=2", "pipeline_parallel"),
                                            ("--lora-modules=x=/tmp", "--lora-modules")])
def test_cli_refuses_options_that_would_serve_wrong(option, message, tmp_path):
    from iapt_fast.serve.cli import build_parser, configure

    base = os.path.join(tmp_path, "base")
    paths = make_adapters(make_backbone(base), os.path.join(tmp_path, "adapters"))
    args = build_parser().parse_args(serve_command(base, {"a": paths["a"]}, 1)[3:] + [option])
    with pytest.raises(ValueError, match=message):
        configure(args)
    args = configure(build_parser().parse_args(serve_command(base, {"a": paths["a"]}, 1)[3:]))[0]
    assert args.enable_chunked_prefill is False and args.enforce_eager is True
    assert [m.name for m in args.lora_modules] == ["a"]
