"""The Triton kernels of iapt_fast: the package ``iapt_fast.kernels``, whose modules live in the
checkout's top-level ``kernels/`` folder (installed as ``iapt_fast/kernels/`` in a wheel).

Why a module stands in for the package: since transformers 5.25 every install has a distribution
whose top-level module is ``kernels``, imported as soon as a model module is. Whenever a checkout's
root is on ``sys.path`` (``python -c``/``-m`` from the root, torchrun, notebooks), a top-level
``kernels/__init__.py`` would win over site-packages and break transformers. So ``kernels/`` has no
``__init__.py``: a folder without one is only a namespace portion, which Python's import system never
prefers to a regular package or module of the same name, so it cannot shadow the distribution from
any working directory. A namespace folder cannot carry this package's exports, and setuptools'
editable finder serves only folders with an ``__init__.py``; so this module is ``iapt_fast.kernels``
and makes itself a package by setting ``__path__`` (any module with ``__path__`` is a package,
Python reference §5.2.1) to the folder that holds the kernel modules. docs/design.md §2.

``triton_prompt_generator`` is the fused generator (forward and backward) that
``iapt_fast.generator.functional.prompt_generator(..., backend="triton")`` dispatches to.
"""
import os


def _kernel_folder() -> str:
    """The folder of the kernel modules: ``iapt_fast/kernels/`` in a wheel, ``<checkout>/kernels/``
    in a checkout or an editable install (checked by a file only this project's folder holds, so the
    ``kernels`` distribution's folder is never taken for it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "kernels"), os.path.join(os.path.dirname(here), "kernels")):
        if os.path.isfile(os.path.join(folder, "generator_fwd.py")):
            return folder
    raise ImportError(f"iapt_fast.kernels: the kernel modules (generator_fwd.py) are in neither "
                      f"{os.path.join(here, 'kernels')} nor {os.path.join(os.path.dirname(here), 'kernels')}")


__path__ = [_kernel_folder()]

from iapt_fast.kernels.autograd import PromptGeneratorFunction, recompute_backward, triton_prompt_generator  # noqa: E402
from iapt_fast.kernels.launch import LaunchSpec, poison_buffers, record_launches  # noqa: E402

__all__ = ["triton_prompt_generator", "PromptGeneratorFunction", "recompute_backward", "record_launches", "poison_buffers",
           "LaunchSpec"]
