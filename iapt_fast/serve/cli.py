"""``iapt-serve``: vLLM's OpenAI-compatible server with IAPT adapters.

    iapt-serve --model BASE_DIR --adapter NAME=ADAPTER_DIR [--adapter ...] [--host H] [--port P]
               [vLLM engine options]

A request picks an adapter with its ``model`` field (as with vLLM's ``--lora-modules``), the
bare backbone with the base's served name. Runs vLLM's server in this process (the ``vllm``
command cannot start the CPU build, whose distribution has another name).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from iapt_fast.serve.adapters import AdapterSpec, ServedAdapters, parse_adapter_spec
from iapt_fast.serve.options import RequestPreparer, codec_for, engine_kwargs, load_front_adapters

__all__ = ["main", "build_parser"]

# Engine options that engine_kwargs checks, as argparse names them.
_CHECKED = ("enable_chunked_prefill", "enforce_eager", "speculative_config", "pipeline_parallel_size",
            "hf_overrides")


def build_parser():
    """vLLM's server parser plus ``--adapter``."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=ADAPTER_DIR",
                        help="an IAPT adapter to serve under NAME (repeatable)")
    return parser


def configure(args: argparse.Namespace) -> tuple[argparse.Namespace, ServedAdapters, int, tuple[str, ...]]:
    """Check the adapters against the backbone and set the engine options IAPT needs.

    Returns:
        (args for vLLM, the adapters, the backbone's vocabulary size, the base's served names).

    Raises:
        ValueError naming the adapter or option that cannot be served.
    """
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    if getattr(args, "lora_modules", None):
        raise ValueError("--lora-modules cannot be combined with IAPT adapters; serve them with --adapter")
    if getattr(args, "enable_lora", False):
        raise ValueError("--enable-lora cannot be combined with IAPT adapters")
    specs: list[AdapterSpec] = [parse_adapter_spec(text) for text in args.adapter]
    config, adapters = load_front_adapters(args.model, specs)
    served = list(args.served_model_name) if args.served_model_name else [args.model]
    clash = sorted(set(served) & {s.name for s in specs})
    if clash:
        raise ValueError(f"adapter names {clash} are the served base model's names")
    user = {key: getattr(args, key) for key in _CHECKED if getattr(args, key, None) is not None}
    if user.get("enforce_eager") is False:
        user.pop("enforce_eager")  # argparse's default, not a choice
    for key, value in engine_kwargs(config, specs, user).items():
        setattr(args, key, value)
    args.lora_modules = [LoRAModulePath(name=s.name, path=s.path, base_model_name=served[0]) for s in specs]
    return args, adapters, int(config.vocab_size), tuple(served)


async def serve(args: argparse.Namespace, adapters: ServedAdapters, vocab_size: int,
                base_names: tuple[str, ...]) -> None:
    """Start the engine and serve until the server stops (vLLM's ``run_server`` with the
    engine client wrapped)."""
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server

    from iapt_fast.serve.engine_client import IAPTEngineClient

    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine:
        codec = codec_for(vocab_size, len(adapters), engine.model_config.max_model_len)
        preparer = RequestPreparer(adapters, codec, base_names=base_names)
        shutdown = await build_and_serve(IAPTEngineClient(engine, preparer), listen_address, sock, args)
    try:
        await shutdown
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    import uvloop

    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = build_parser().parse_args(argv)
    try:
        args, adapters, vocab_size, base_names = configure(args)
    except ValueError as err:
        sys.exit(f"iapt-serve: {err}")
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(serve(args, adapters, vocab_size, base_names))


if __name__ == "__main__":
    main()
