"""Packaging for iapt_fast.

The top-level folder ``kernels/`` is installed as ``iapt_fast.kernels``: a bare top-level
``kernels`` module would clash with other distributions that ship one (design.md §2).
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
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft", "accelerate", "matplotlib"],
        "bench": ["matplotlib", "peft"],
    },
    entry_points={"console_scripts": ["iapt-train=iapt_fast.train:main"]},
)
