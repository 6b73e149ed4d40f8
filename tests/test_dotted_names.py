"""Every dotted ``iapt_fast.…`` name written in the package's code, docstrings and comments, in the
kernel folder and the benchmarks, in docs/ and in README.md names something that exists: a module, or an attribute
of one (a class, a function, a constant, a method). Docs that point at a moved module mislead."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOTTED = re.compile(r"\biapt_fast(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _sources() -> list[str]:
    found = [os.path.join(ROOT, "README.md")]
    for folder, suffix in (("iapt_fast", ".py"), ("kernels", ".py"), ("benchmarks", ".py"), ("docs", ".md")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            found += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(suffix)]
    return found


def resolves(name: str) -> bool:
    """Whether ``name`` is a module or a chain of attributes below the longest importable module.
    A trailing ``.py``/``.md`` means a file was named, which is checked as a module path."""
    parts = name.removesuffix(".py").split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and not module.startswith(err.name) and importlib.util.find_spec(module) is not None:
                # The module exists but needs an optional dependency this environment lacks (vLLM
                # lives in the serving environment): its attributes cannot be checked here.
                return cut == len(parts)
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _names() -> list[tuple[str, int, str]]:
    out = []
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                for match in DOTTED.finditer(line):
                    out.append((os.path.relpath(path, ROOT), lineno, match.group(0).rstrip(".")))
    return out


def test_there_are_names_to_check():
    assert len(_names()) > 50


def test_resolver_rejects_a_missing_module_and_attribute():
    assert resolves("iapt_fast.generator.functional.prompt_generator")
    assert not resolves("iapt_fast.functional")
    assert not resolves("iapt_fast.generator.functional.no_such_function")


def test_every_dotted_name_imports():
    broken = [f"{path}:{lineno}: {name}" for path, lineno, name in _names() if not resolves(name)]
    assert not broken, "names that do not import:\n" + "\n".join(broken)


FILE_PATH = re.compile(r"\b(?:iapt_fast|benchmarks|tests|docs)/[A-Za-z0-9_/]+\.(?:py|md|sh)\b")


def test_every_file_path_named_exists():
    """The same for file paths (``iapt_fast/training/trainer.py``) written in code and docs."""
    broken = []
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                broken += [f"{os.path.relpath(path, ROOT)}:{lineno}: {m}" for m in FILE_PATH.findall(line)
                           if not os.path.exists(os.path.join(ROOT, m))]
    assert not broken, "paths that do not exist:\n" + "\n".join(broken)
