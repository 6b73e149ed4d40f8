"""``prompt_generator``: THE single entry point to the generator math (design.md §3), and the
operator ``iapt_fast::prompt_generator`` that torch.compile sees.

``prompt_generator`` validates every argument, then dispatches: the Triton kernels, the fast
PyTorch path for CPU tensors (generator/cpu_fast.py), or the literal PyTorch reference (float64,
other devices).

The operator. ``torch.compile`` cannot trace into the Triton autograd.Function or the
reference's Python; as a registered operator the generator is one opaque node with a fake (meta)
implementation for shapes and dtypes, and a registered backward, so a compiled forward +
backward has no graph break inside it. ``prompt_generator`` calls the operator while
torch.compile traces, and the eager paths otherwise (where the Triton backward reuses its
forward's saved statistics).

Implementations: the eager paths' own — :func:`torch_prompt_generator` (generator/cpu_fast.py
on the CPU, the literal reference in float64 and on other devices) and the Triton kernels for
CUDA, which take the serving packs' cached W_down·W_pool (``weight_products``) as the eager call
does, so a compiled inference prefill is one launch as well. The backward recomputes the forward
and differentiates it (off CUDA the reference with autograd — AOT autograd traces the backward,
and the reference has no data-dependent branch; on CUDA the kernels' own backward, through the
host functions the eager autograd.Function runs: ``kernels/autograd.py`` ``recompute_backward``):
one extra forward per training step inside compiled graphs, the price of a stateless operator.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from iapt_fast.config import RATIONAL_VERSIONS
from iapt_fast.generator import cpu_fast, reference
from iapt_fast.generator.limits import MAX_SOFT_TOKENS
from iapt_fast.generator.weights import GeneratorWeights

__all__ = ["prompt_generator", "triton_available", "resolve_backend", "check_backend_limits", "MAX_SOFT_TOKENS",
           "prompt_generator_op", "torch_prompt_generator"]

BACKENDS = ("auto", "torch", "triton")
HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the reference only: it is how tests build their oracle.
REFERENCE_ONLY_DTYPES = (torch.float64,)


def triton_available() -> bool:
    """True when the Triton kernels can run: triton imports and CUDA or the interpreter is on."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_backend_limits(num_soft_tokens: int, backend: str, device: torch.device,
                         what: str = "num_soft_tokens") -> None:
    """Raise ValueError when ``backend`` (resolved for ``device``) cannot run T soft tokens.

    IAPTModel calls this when an adapter is added, so that a configuration the kernels cannot
    run is refused before any work, not at the first forward.
    """
    if resolve_backend(backend, device) == "triton" and num_soft_tokens > MAX_SOFT_TOKENS:
        raise ValueError(f"{what}: T={num_soft_tokens} soft tokens exceed the Triton backend's limit of "
                         f"T <= {MAX_SOFT_TOKENS} (the kernels hold the soft tokens in one register tile); "
                         "use fewer soft tokens or backend='torch'")


def prompt_generator(
    hidden: Tensor,
    mask: Tensor,
    w_down: Tensor,
    w_pool: Tensor,
    rat_num: Tensor,
    rat_den: Tensor,
    w_up: Tensor,
    adapter_ids: Tensor | None = None,
    backend: str = "auto",
    rational_version: str = "B",
    check_ids: bool = True,
    anchor: Tensor | None = None,
    anchor_scale: Tensor | None = None,
    weight_products: Tensor | None = None,
) -> Tensor:
    """Generate the soft tokens of every row of a (mixed-adapter) batch.

    Args:
        hidden: [B, N, d] float32 / float16 / bfloat16 layer inputs.
        mask: [B, N] bool or integer; nonzero = instruction token to pool over.
        w_down: [A, d, m]. w_pool: [A, m, T]. rat_num: [A, p+1] (a_0..a_p).
        rat_den: [A, q] (b_1..b_q). w_up: [A, m, d]. The five weights share one float dtype,
            which may differ from ``hidden.dtype`` (e.g. float32 master weights).
        adapter_ids: [B] integer ids in [0, A): row b uses adapter adapter_ids[b].
            None means A == 1.
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "torch" or "triton". PyTorch on
            CPU tensors runs generator/cpu_fast.py (float64: the literal reference).
        rational_version: "B" (safe PAU, default) or "A".
        check_ids: verify that every adapter id lies in [0, A). On CUDA that reads the ids
            back to the host (a device sync per call); callers that built the ids on the host
            from validated adapter names (IAPTModel does) pass False to keep the launch queue
            full. An out-of-range id with check_ids=False is undefined behaviour.
        anchor: [A, T, d] or None: the static part B of the anchored form, added to the
            output (None: zero, the paper's form). Same dtype and device as the weights.
        anchor_scale: [A] or None: the fixed scale s of the generator term (None: one).
            Treated as a constant by the Triton backend (it must not require grad there).
        weight_products: [A, d, 16] float32 W_down·W_pool of these weights, or None: a cached
            product (AdapterPack.weight_products) that lets the Triton backend's inference
            forward run in one launch (design.md §4); the reference backend ignores it.
    Returns:
        [B, T, d] = anchor[a] + anchor_scale[a] · R(p)·W_up[a] in ``hidden.dtype``; float32
        accumulation. Tokens whose mask is zero have no influence at all, whatever they hold
        (NaN or inf included). A row with no instruction token (all-masked, or N = 0) pools to
        p = 0 and gets anchor[a] + anchor_scale[a] · R(0)·W_up[a]. Differentiable w.r.t. ``hidden``, every weight and the anchor on both backends.
    Raises:
        TypeError / ValueError naming the offending argument.
    """
    chosen = resolve_backend(backend, hidden.device if isinstance(hidden, Tensor) else torch.device("cpu"))
    mask, adapter_ids = _validate(
        hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, chosen, rational_version, check_ids
    )
    _validate_anchor(anchor, anchor_scale, w_down, w_pool, chosen)
    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    if _compiling():
        # One opaque node for torch.compile: no graph break inside the generator.
        return prompt_generator_op(hidden, mask, *weights[:5], adapter_ids, anchor, anchor_scale, rational_version,
                                   weight_products)
    if chosen == "torch":
        return torch_prompt_generator(hidden, mask, weights, adapter_ids, rational_version)
    if hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run the kernels in the interpreter; got hidden on {hidden.device}"
        )
    triton_prompt_generator = _load_kernels()
    return triton_prompt_generator(hidden, mask, weights, adapter_ids, rational_version,
                                   weight_products=weight_products)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _load_kernels():
    """The Triton entry point, or a ValueError that says how to get it."""
    try:
        from iapt_fast.kernels import triton_prompt_generator
    except ImportError as err:
        raise ValueError(f"backend='triton' is unavailable: {err}") from err  # e.g. triton missing here
    return triton_prompt_generator


def _validate_anchor(anchor, anchor_scale, w_down, w_pool, backend) -> None:
    num_adapters, dim = w_down.shape[0], w_down.shape[1]
    num_tokens = w_pool.shape[2]
    for name, value, shape in (("anchor", anchor, (num_adapters, num_tokens, dim)),
                               ("anchor_scale", anchor_scale, (num_adapters,))):
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        if value.dtype != w_down.dtype:
            raise TypeError(f"{name} must have the weights' dtype {w_down.dtype}, got {value.dtype}")
        if value.device != w_down.device:
            raise ValueError(f"{name} is on {value.device} but the weights are on {w_down.device}")
        if tuple(value.shape) != shape:
            dims = "[A, T, d]" if name == "anchor" else "[A]"
            raise ValueError(f"{name} must be {dims} = {shape}, got shape {tuple(value.shape)}")
    if (backend == "triton" and anchor_scale is not None and anchor_scale.requires_grad
            and torch.is_grad_enabled()):
        raise ValueError("anchor_scale must not require grad on the Triton backend (it is a fixed scale; "
                         "detach it, or use backend='torch')")


def _validate(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, backend, version, check_ids):
    if version not in RATIONAL_VERSIONS:
        raise ValueError(f"rational_version must be one of {RATIONAL_VERSIONS}, got {version!r}")
    tensors = {"hidden": hidden, "mask": mask, "w_down": w_down, "w_pool": w_pool,
               "rat_num": rat_num, "rat_den": rat_den, "w_up": w_up}
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    allowed = HIDDEN_DTYPES + (REFERENCE_ONLY_DTYPES if backend == "torch" else ())
    if hidden.dtype not in allowed:
        raise TypeError(f"hidden must have dtype in {_names(allowed)} for backend={backend!r}, got {hidden.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, N, d], got shape {tuple(hidden.shape)}")
    batch, seq, dim = hidden.shape
    if dim == 0:
        raise ValueError("hidden must have d >= 1")

    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or an integer dtype (1 = instruction token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask must be [B, N] = {(batch, seq)} to match hidden, got {tuple(mask.shape)}")

    weights = {"w_down": w_down, "w_pool": w_pool, "rat_num": rat_num, "rat_den": rat_den, "w_up": w_up}
    wdtype = w_down.dtype
    for name, value in weights.items():
        if value.dtype not in allowed:
            raise TypeError(f"{name} must have dtype in {_names(allowed)}, got {value.dtype}")
        if value.dtype != wdtype:
            raise TypeError(f"all generator weights must share one dtype; w_down is {wdtype}, {name} is {value.dtype}")
    for name, value in {**weights, "mask": mask}.items():
        if value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")

    if w_down.dim() != 3 or w_down.shape[1] != dim:
        raise ValueError(f"w_down must be [A, d={dim}, m], got shape {tuple(w_down.shape)}")
    num_adapters, _, bottleneck = w_down.shape
    if num_adapters < 1 or bottleneck < 1:
        raise ValueError(f"w_down must have A >= 1 and m >= 1, got shape {tuple(w_down.shape)}")
    if w_pool.dim() != 3 or tuple(w_pool.shape[:2]) != (num_adapters, bottleneck) or w_pool.shape[2] < 1:
        raise ValueError(f"w_pool must be [A={num_adapters}, m={bottleneck}, T>=1], got shape {tuple(w_pool.shape)}")
    num_tokens = w_pool.shape[2]
    check_backend_limits(num_tokens, backend, hidden.device, what=f"w_pool [A, m, T={num_tokens}]")
    if rat_num.dim() != 2 or rat_num.shape[0] != num_adapters or rat_num.shape[1] < 1:
        raise ValueError(f"rat_num must be [A={num_adapters}, p+1>=1], got shape {tuple(rat_num.shape)}")
    if rat_den.dim() != 2 or rat_den.shape[0] != num_adapters or rat_den.shape[1] < 1:
        raise ValueError(f"rat_den must be [A={num_adapters}, q>=1], got shape {tuple(rat_den.shape)}")
    if w_up.dim() != 3 or tuple(w_up.shape) != (num_adapters, bottleneck, dim):
        raise ValueError(f"w_up must be [A={num_adapters}, m={bottleneck}, d={dim}], got shape {tuple(w_up.shape)}")

    if adapter_ids is None:
        if num_adapters != 1:
            raise ValueError(f"adapter_ids is required when the weights hold A={num_adapters} > 1 adapters")
    else:
        if not isinstance(adapter_ids, Tensor):
            raise TypeError(f"adapter_ids must be a torch.Tensor or None, got {type(adapter_ids).__name__}")
        if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
            raise TypeError(f"adapter_ids must be an integer tensor (int64), got {adapter_ids.dtype}")
        if adapter_ids.dim() != 1 or adapter_ids.shape[0] != batch:
            raise ValueError(f"adapter_ids must be [B={batch}], got shape {tuple(adapter_ids.shape)}")
        if adapter_ids.device != hidden.device:
            raise ValueError(f"adapter_ids is on {adapter_ids.device} but hidden is on {hidden.device}")
        if check_ids and batch > 0:
            lo, hi = (int(v) for v in torch.aminmax(adapter_ids))
            if lo < 0 or hi >= num_adapters:
                raise ValueError(f"adapter_ids must lie in [0, {num_adapters}), got values in [{lo}, {hi}]")
        adapter_ids = adapter_ids.to(torch.long)
    return mask.to(torch.bool), adapter_ids


def _names(dtypes) -> str:
    return "(" + ", ".join(str(d).replace("torch.", "") for d in dtypes) + ")"


# ------------------------------------------------------ the PyTorch path and the registered operator
# Inputs of the operator that can have a gradient (hidden, the five weights, the anchor).
_DIFFERENTIABLE = (0, 2, 3, 4, 5, 6, 8)


def torch_prompt_generator(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, adapter_ids: Tensor | None,
                           version: str) -> Tensor:
    """The PyTorch path, eager or inside the operator: generator/cpu_fast.py for CPU tensors
    below float64; the literal reference for float64 (the tests' oracle) and other devices."""
    if hidden.device.type == "cpu" and hidden.dtype != torch.float64:
        return cpu_fast.prompt_generator(hidden, mask, weights, adapter_ids, version)
    return reference.prompt_generator(hidden, mask, weights, adapter_ids, version)


@torch.library.custom_op("iapt_fast::prompt_generator", mutates_args=())
def prompt_generator_op(hidden: Tensor, mask: Tensor, w_down: Tensor, w_pool: Tensor, rat_num: Tensor, rat_den: Tensor,
                        w_up: Tensor, adapter_ids: Tensor | None, anchor: Tensor | None, anchor_scale: Tensor | None,
                        version: str, weight_products: Tensor | None = None) -> Tensor:
    """[B, T, d] soft tokens; inputs validated by :func:`prompt_generator`.
    ``weight_products``: see :func:`prompt_generator` (only the kernels read it)."""
    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    return torch_prompt_generator(hidden, mask, weights, adapter_ids, version)


@prompt_generator_op.register_kernel("cuda")
def _cuda(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, anchor, anchor_scale, version,
          weight_products=None):
    from iapt_fast.kernels import triton_prompt_generator

    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    return triton_prompt_generator(hidden, mask, weights, adapter_ids, version, weight_products=weight_products)


@prompt_generator_op.register_fake
def _fake(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, anchor, anchor_scale, version,
          weight_products=None):
    return hidden.new_empty(hidden.shape[0], w_pool.shape[2], hidden.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:10])
    ctx.version = inputs[10]


def kernels_differentiate(device: torch.device) -> bool:
    """Whether the operator's backward runs the Triton kernels' own backward on ``device`` (CUDA);
    elsewhere AOT autograd traces it, so it is the reference's autograd."""
    return device.type == "cuda"


# The operator's inputs, named as the kernels' forward names them (kernels/autograd.py).
_OP_INPUT_NAMES = ("hidden", "mask", "w_down", "w_pool", "rat_num", "rat_den", "w_up", "adapter_ids", "anchor",
                   "anchor_scale", "version", "weight_products")


def _backward(ctx, grad: Tensor):
    saved = list(ctx.saved_tensors)
    hidden, mask, *core = saved[:7]
    result: list[Tensor | None] = [None] * 12
    if kernels_differentiate(hidden.device):
        # The same host functions as the eager autograd.Function: the forward's state, then its backward.
        from iapt_fast.kernels import recompute_backward

        wants = {_OP_INPUT_NAMES[i]: bool(ctx.needs_input_grad[i]) for i in _DIFFERENTIABLE}
        grads = recompute_backward(hidden, mask, GeneratorWeights(*core, saved[8], saved[9]), saved[7], ctx.version,
                                   grad, wants)
        for i in _DIFFERENTIABLE:
            result[i] = grads.get(_OP_INPUT_NAMES[i])
        return tuple(result)
    # Traced by AOT autograd in compiled graphs: the reference, whose code has no data-dependent branch.
    leaves = {}
    with torch.enable_grad():
        for i in _DIFFERENTIABLE:
            if saved[i] is not None and ctx.needs_input_grad[i]:
                saved[i] = leaves[i] = saved[i].detach().requires_grad_(True)
        hidden, mask, *core = saved[:7]
        weights = GeneratorWeights(*core, saved[8], saved[9])
        out = reference.prompt_generator(hidden, mask, weights, saved[7], ctx.version)
        grads = torch.autograd.grad(out, list(leaves.values()), grad, allow_unused=True) if leaves else ()
    for index, g in zip(leaves, grads):
        result[index] = g
    return tuple(result)


prompt_generator_op.register_autograd(_backward, setup_context=_setup_context)
