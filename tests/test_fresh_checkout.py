"""Run from the checkout's root, as a new user does: the top-level kernels/ folder must never shadow
the ``kernels`` distribution that transformers imports (docs/design.md §2).

Each command runs in a fresh interpreter whose working directory is the checkout's root, so the
root is on ``sys.path`` by Python's own rules (``-c``, ``-m``, torchrun's ``-m``); nothing here adds
it or removes it.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys


from train_fixtures import save_tiny_model, sentiment_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("PYTHONPATH", "PYTHONSAFEPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_the_kernels_distribution_is_installed():
    """Without it the tests below would prove nothing: the shadowing needs both packages."""
    assert importlib.metadata.version("kernels")


def test_transformers_and_iapt_fast_import_from_the_root():
    code = ("import json, kernels, torch\n"
            "from transformers import LlamaForCausalLM\n"
            "import iapt_fast, iapt_fast.kernels\n"
            "print(json.dumps({'kernels': kernels.__file__, 'ours': iapt_fast.kernels.__path__[0],\n"
            "                  'op': hasattr(torch.ops.iapt_fast, 'prompt_generator')}))")
    got = json.loads(_run([sys.executable, "-c", code], timeout=120).stdout.strip().splitlines()[-1])
    assert not os.path.realpath(got["kernels"]).startswith(os.path.join(os.path.realpath(ROOT), "kernels")), got
    assert os.path.realpath(got["ours"]) == os.path.realpath(os.path.join(ROOT, "kernels")), got
    assert got["op"], "import iapt_fast must register torch.ops.iapt_fast.prompt_generator"


def test_the_custom_operator_is_callable_after_import():
    """torch.ops.iapt_fast.prompt_generator exists after `import iapt_fast` alone (no compile first),
    computes exactly what the eager call computes, and the float64 operator is the literal reference."""
    code = ("import torch, iapt_fast\n"
            "from iapt_fast.generator import functional, reference\n"
            "from iapt_fast.generator.weights import GeneratorWeights\n"
            "torch.manual_seed(0)\n"
            "h = torch.randn(2, 5, 8); m = torch.ones(2, 5, dtype=torch.bool)\n"
            "num, den, _ = iapt_fast.fit_rational('gelu')\n"
            "w = [torch.randn(1, 8, 4), torch.randn(1, 4, 3), num[None].clone(), den[None].clone(), torch.randn(1, 4, 8)]\n"
            "out = torch.ops.iapt_fast.prompt_generator(h, m, *w, None, None, None, 'B')\n"
            "eager = functional.prompt_generator(h, m, *w, backend='torch')\n"
            "d = [x.double() for x in [h, *w]]\n"
            "out64 = torch.ops.iapt_fast.prompt_generator(d[0], m, *d[1:], None, None, None, 'B')\n"
            "ref64 = reference.prompt_generator(d[0], m, GeneratorWeights(*d[1:], None, None), None, 'B')\n"
            "print(float((out - eager).abs().max()), float((out64 - ref64).abs().max()))")
    assert _run([sys.executable, "-c", code], timeout=120).stdout.split()[-2:] == ["0.0", "0.0"]


def _cli_args(tmp_path) -> list[str]:
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(24, seed=3))
    return ["--model", model_dir, "--train-file", data, "--prompt-template", "Review: {text}\\nSentiment:",
            "--response-template", " {label}", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2",
            "--bottleneck-dim", "8", "--num-soft-tokens", "2", "--no-progress", "--max-length", "32"]


def test_cli_runs_from_the_root(tmp_path):
    out = tmp_path / "out"
    _run([sys.executable, "-m", "iapt_fast.train", *_cli_args(tmp_path), "--output-dir", str(out)], timeout=300)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "adapter_model.safetensors").is_file()


def test_torchrun_job_runs_from_the_root(tmp_path):
    out = tmp_path / "out"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "iapt_fast.train", *_cli_args(tmp_path), "--output-dir", str(out)], timeout=300)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["world_size"] == 2


def test_a_wheel_install_imports_its_own_kernel_folder(tmp_path):
    """Built as a wheel, the kernel modules live in iapt_fast/kernels/ and iapt_fast.kernels finds
    them there (never the checkout's folder, never the `kernels` distribution's)."""
    import shutil
    import zipfile

    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("iapt_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
          "-w", str(tmp_path / "dist")], timeout=300)
    wheel = next((tmp_path / "dist").glob("iapt_fast-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    assert (site / "iapt_fast" / "kernels" / "generator_fwd.py").is_file()
    assert not (site / "kernels").exists(), "the wheel must not install a top-level kernels package"
    code = ("import json, sys, kernels\n"
            "from transformers import LlamaForCausalLM\n"
            "import iapt_fast, iapt_fast.kernels, iapt_fast.kernels.generator_fwd as fwd\n"
            "print(json.dumps([iapt_fast.__file__, iapt_fast.kernels.__path__[0], fwd.__file__, kernels.__file__]))")
    env = {**_env(), "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    package, folder, module, theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert package.startswith(str(site)) and folder == str(site / "iapt_fast" / "kernels"), (package, folder)
    assert module.startswith(folder) and not theirs.startswith(str(site)), (module, theirs)
