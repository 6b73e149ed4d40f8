"""A call's state has one explicit carrier (the IAPTCache the backbone is called with).

What must hold: no module-level mutable state in the model package (so concurrent calls can
share nothing through it); nothing written onto transformers' objects by wrapping, forward,
generate (dynamic and static), manual decoding or a checkpointed training step; the library
files a prefill crosses before the soft tokens enter the first attention are the listed ones.
Results are checked elsewhere (test_model.py against the slow reference); here, the structure.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import types
import typing

import pytest
import torch
from transformers import DynamicCache, StaticCache

import iapt_fast
import iapt_fast.model
from iapt_fast import IAPTConfig
from iapt_fast.generator import functional
from iapt_fast.model.call_state import IAPTCache, PrefillState, Request
from iapt_fast.model.prefix_hooks import hooks_installed_on
from slow_reference import padded_batch, tiny_model
from test_model import wrap

pytestmark = pytest.mark.usefixtures("one_thread")

# The one process-wide object of the model package: the gate that keeps a compiling generate()
# apart from eager calls mirrors torch's compile flag, which is process-wide (iapt_model.py).
ALLOWED_MUTABLE = {"iapt_fast.model.iapt_model.GATE"}
IMMUTABLE = (str, bytes, int, float, bool, type(None), frozenset, types.MappingProxyType, range)


def _immutable(value) -> bool:
    if isinstance(value, tuple):
        return all(_immutable(item) for item in value)
    return isinstance(value, IMMUTABLE)


def _model_modules():
    yield iapt_fast.model
    for info in pkgutil.walk_packages(iapt_fast.model.__path__, "iapt_fast.model."):
        yield importlib.import_module(info.name)


def test_the_model_package_holds_no_module_level_mutable_state():
    found = []
    for module in _model_modules():
        for name, value in vars(module).items():
            if name.startswith("__") or name in ("annotations",):
                continue
            if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)) \
                    or callable(value) and not hasattr(value, "__dict__") \
                    or type(value).__module__ == "typing" or isinstance(value, typing.TypeVar):
                continue
            owner = getattr(value, "__module__", None)
            if owner is not None and owner != module.__name__ and not isinstance(value, IMMUTABLE):
                continue  # imported from elsewhere (checked where it is defined)
            if not _immutable(value) and f"{module.__name__}.{name}" not in ALLOWED_MUTABLE:
                found.append(f"{module.__name__}.{name}: {type(value).__name__}")
    assert not found, f"module-level mutable state in iapt_fast.model: {found}"


def test_the_state_scan_sees_a_mutable_global():
    # The scan above must be able to fail: a dict or a plain object at module level is found.
    fake = types.ModuleType("iapt_fast.model.fake")
    fake.REGISTRY = {}
    assert not _immutable(fake.REGISTRY) and _immutable(("a", 1, frozenset()))


def _attributes(model: torch.nn.Module) -> dict:
    """Every module's class and attribute names, and the config's attribute names."""
    state = {f"module {name}": (type(module), frozenset(vars(module))) for name, module in model.named_modules()}
    state["config"] = frozenset(vars(model.config))
    state["generation_config"] = frozenset(vars(model.generation_config))
    return state


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_call_writes_onto_transformers_objects(family):
    model = tiny_model(family, "sdpa", layers=3)
    ids, mask, inst = padded_batch(2, 7, "left", seed=5)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    labels = ids.masked_fill(mask == 0, -100)
    # transformers' own lazily written state (first generate, hidden-state capture, checkpointing on
    # and off), before the snapshot
    model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **gen)
    model(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # installs transformers' capture hooks
    _checkpointed_step(model, input_ids=ids, attention_mask=mask, labels=labels)
    before = _attributes(model)
    wrapped = wrap(model)
    assert _iapt_hooks(model) > 0
    wrapped.add_adapter("part", IAPTConfig(bottleneck_dim=8, init_std_up=0.5, target_layers=[1]), seed=2)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, use_cache=True)
        step = torch.ones(2, 1, dtype=torch.long)
        wrapped(input_ids=step, attention_mask=torch.cat([mask, step], 1), cache=out.cache)
        with pytest.raises(ValueError, match="not produced by an IAPTModel prefill"):  # the storage alone
            wrapped(input_ids=step, attention_mask=torch.cat([mask, step, step], 1), cache=out.cache.storage)
        for names in (["default", "default"], ["part", "__base__"]):
            for cache in ("dynamic", "static"):
                result = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, adapter_names=names,
                                          cache_implementation=cache, return_dict_in_generate=True, **gen)
                assert isinstance(result.cache, IAPTCache)
                storage = (StaticCache if cache == "static" else DynamicCache)
                assert type(result.cache.storage) is storage
                assert all(type(layer).__module__.startswith("transformers.") for layer in result.cache.layers)
    _checkpointed_step(wrapped, input_ids=ids, attention_mask=mask, instruction_mask=inst, labels=labels)
    after = _attributes(model)
    changed = {key: _difference(before.get(key), after.get(key)) for key in set(before) | set(after)
               if before.get(key) != after.get(key)}
    assert not changed, f"IAPT wrote onto transformers' objects: {changed}"
    wrapped.remove_hooks()
    assert _iapt_hooks(model) == 0 and not hooks_installed_on(model)


def _iapt_hooks(model: torch.nn.Module) -> int:
    """How many forward hooks of iapt_fast's code are installed on ``model``'s modules."""
    hooks = [hook for module in model.modules()
             for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())]
    owners = [getattr(getattr(hook, "__self__", hook), "__module__", "") or "" for hook in hooks]
    return sum(owner.startswith("iapt_fast") for owner in owners)


def _difference(before, after):
    if isinstance(before, tuple) and isinstance(after, tuple) and before[0] is after[0]:
        return {"added": sorted(after[1] - before[1]), "removed": sorted(before[1] - after[1])}
    if isinstance(before, frozenset) and isinstance(after, frozenset):
        return {"added": sorted(after - before), "removed": sorted(before - after)}
    return before, after


def _checkpointed_step(model: torch.nn.Module, **batch) -> None:
    """One training step under activation checkpointing, which is switched on and off again."""
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).loss.backward()
    model.activation_checkpointing_disable()
    model.eval()


# What a prefill crosses in the library up to the first attention: the call and the compile gate
# (iapt_model.py); its validation, plan and carrier (call_state.py); the hooks (prefix_hooks.py);
# the family (architectures.py); the adapters' weights and serving packs (generator/bank.py); the
# generator op's entry (generator/functional.py). Six files.
PREFILL_FILES = {
    "iapt_fast/model/iapt_model.py", "iapt_fast/model/call_state.py", "iapt_fast/model/prefix_hooks.py",
    "iapt_fast/model/architectures.py", "iapt_fast/generator/bank.py", "iapt_fast/generator/functional.py",
}
# The generator op's implementation on the CPU (its host functions and the rational activation):
# entered only from inside the op's entry, ``functional.prompt_generator``, tensors in and soft
# tokens out, as a kernel is (on CUDA: the Triton kernels instead).
OP_FILES = {"iapt_fast/generator/cpu_fast.py", "iapt_fast/generator/rational.py"}


# The files whose functions are handed the call's state (the Request, the PrefillState, the
# IAPTCache): everything else on the path above takes tensors and weights only.
STATE_FILES = {"iapt_fast/model/iapt_model.py", "iapt_fast/model/call_state.py", "iapt_fast/model/prefix_hooks.py"}


def _trace_prefill(until_first_attention: bool) -> tuple[set[str], set[str], set[str]]:
    """Runs one prefill under a profiler: (library files entered outside the generator op,
    library files entered inside it, library files whose functions were handed a state object)."""
    model = tiny_model("llama", "sdpa")
    wrapped = wrap(model)
    ids, mask, inst = padded_batch(2, 7, "left", seed=1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(iapt_fast.__file__)))
    attention = type(model.model.layers[0].self_attn).forward.__code__
    op_entry = functional.prompt_generator.__code__
    state_types = (IAPTCache, Request, PrefillState)
    seen: set[str] = set()
    inside_op: set[str] = set()
    handed_state: set[str] = set()
    reached = []

    def in_op(frame) -> bool:
        caller = frame.f_back
        while caller is not None:
            if caller.f_code is op_entry:
                return True
            caller = caller.f_back
        return False

    def profile(frame, event, arg):
        if (reached and until_first_attention) or event != "call":
            return
        if frame.f_code is attention:
            reached.append(True)
            return
        path = os.path.relpath(frame.f_code.co_filename, root)
        if path.startswith("iapt_fast/") or path.startswith("kernels/"):
            (inside_op if in_op(frame) else seen).add(path)
            if any(isinstance(value, state_types) for value in frame.f_locals.values()):
                handed_state.add(path)

    with torch.no_grad():
        sys.setprofile(profile)
        try:
            wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst)
        finally:
            sys.setprofile(None)
    assert reached, "the prefill never reached an attention"
    return seen, inside_op, handed_state


def test_the_files_a_prefill_crosses_before_the_first_attention():
    seen, inside_op, _ = _trace_prefill(until_first_attention=True)
    assert len(PREFILL_FILES) <= 6
    assert seen == PREFILL_FILES, (f"new files on the prefill path: {sorted(seen - PREFILL_FILES)}; "
                                   f"files no longer on it: {sorted(PREFILL_FILES - seen)}")
    beneath = inside_op - {"iapt_fast/generator/functional.py"}  # the entry's own helpers
    assert beneath <= OP_FILES, f"the generator op reaches into {sorted(beneath - OP_FILES)}"
    assert "iapt_fast/generator/cpu_fast.py" in inside_op  # the op ran (on the CPU path)


def test_the_call_state_is_handed_to_three_files_only():
    """Over the whole prefill (every layer, not only up to the first attention), no function
    outside the three files of the state path receives the call's state: the family, the
    generator op and the bank are given tensors and weights."""
    _, _, handed_state = _trace_prefill(until_first_attention=False)
    assert handed_state <= STATE_FILES, f"the call's state leaks into {sorted(handed_state - STATE_FILES)}"
    assert {"iapt_fast/model/call_state.py", "iapt_fast/model/prefix_hooks.py"} <= handed_state
