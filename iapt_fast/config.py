"""IAPTConfig: the validated, JSON-serialisable description of one IAPT adapter."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from iapt_fast.atomic import atomic_write_text


RATIONAL_INITS = ("gelu", "relu", "silu", "tanh", "identity")
RATIONAL_VERSIONS = ("A", "B")
POOL_INPUTS = ("hidden", "normed")
GENERATOR_FORMS = ("anchored", "paper")
ANCHOR_INITS = ("bos", "text")
CONFIG_NAME = "adapter_config.json"
DEFAULT_BOTTLENECK_RULE = "max(8, 5·d/64)"  # what bottleneck_dim=None resolves to (resolved_bottleneck)
# A callable initialiser cannot be written to JSON; its fitted coefficients live in the weights
# file, so a saved adapter records "custom" and the loader takes the coefficients from there.
CUSTOM_INIT = "custom"


@dataclass
class IAPTConfig:
    """Hyper-parameters of one IAPT adapter (design.md §1).

    Each field's ``metadata`` holds its command-line help (and ``choices`` where it has them):
    ``transformers.HfArgumentParser`` turns the fields into ``iapt-train`` options.

    Args:
        num_soft_tokens: T, soft tokens generated per layer (paper: 4).
        bottleneck_dim: m, the generator's bottleneck. ``None`` picks ``max(8, 5·d // 64)``
            when the model is wrapped (320 for d = 4096, as in the paper).
        rational_degrees: (p, q), numerator and denominator degrees of the rational activation.
        rational_version: "B" (safe PAU, the paper's) or "A".
        rational_init: function the rational is least-squares fitted to at construction:
            "gelu", "relu", "silu", "tanh", "identity" or a callable on float64 tensors.
        rational_fit_interval: interval of that fit.
        target_layers: decoder layers that get a generator; ``None`` means all. Negative
            indices count from the end.
        pool_input: "normed" (default) pools the layer's own input norm of its input (bounded
            scale at every depth); "hidden" pools the raw residual stream (the paper's choice,
            which saturates on the massive activations of deep layers).
        init_std_up: standard deviation of W_up at initialisation (never exactly zero).
        generator_form: "anchored" (default): P_l = B_l + s_l · R(p)·W_up, with a trainable
            per-layer anchor B_l [T, d] taken from the backbone's own hidden states of an init
            sequence and a fixed scale s_l = RMS(B_l); with the generator term at zero the
            adapter is exactly the frozen model with that sequence prepended. "paper":
            P_l = R(p)·W_up, the form of Zhu et al. (no anchor, s = 1).
        anchor_init: what the anchor's init sequence is: "bos" (T copies of the model's BOS
            token, EOS if it has none; needs no tokenizer) or "text" (the first T tokens of
            ``prompt_init_text``, cycled if shorter; needs a tokenizer when wrapping).
        prompt_init_text: the text of ``anchor_init="text"`` (e.g. a task description).
        anchor_scaled: s_l = RMS(B_l) at initialisation (default), so the generator term's
            share of P_l is the same at every depth; False fixes s_l = 1.
        anchors_only: the anchored form with the generator term switched off: P_l = B_l, a
            static deep prompt of T tokens per layer that reads nothing of the instruction
            (s_l = 0; only the anchors train, T·d per layer). The baseline that shows what the
            instruction-aware generator adds.
        base_model_name_or_path: informational, written to adapter_config.json.
    """

    # The command line's group of these options (HfArgumentParser reads this class attribute).
    _argument_group_name = "adapter (IAPTConfig)"

    num_soft_tokens: int = field(default=4, metadata={"help": "T, soft tokens per layer"})
    bottleneck_dim: int | None = field(default=None, metadata={"help": f"m (default: {DEFAULT_BOTTLENECK_RULE})"})
    rational_degrees: tuple[int, int] = field(default=(6, 5), metadata={
        "help": "p,q: numerator and denominator degrees of the rational activation"})
    rational_version: str = field(default="B", metadata={
        "help": "rational form: B (safe PAU: 1 + |b1·x + ... + bq·x^q|) or A (1 + |b1·x| + ... + |bq·x^q|)",
        "choices": RATIONAL_VERSIONS})
    rational_init: str | Callable[..., Any] = field(default="gelu", metadata={
        "help": "function the rational is fitted to at creation", "choices": RATIONAL_INITS})
    rational_fit_interval: tuple[float, float] = field(default=(-3.0, 3.0), metadata={
        "help": "lo,hi: interval of that fit"})
    target_layers: list[int] | None = field(default=None, metadata={
        "help": "comma-separated decoder layers that get a generator (negative counts from the end; default: all)"})
    pool_input: str = field(default="normed", metadata={
        "help": "normed: pool the layer's input norm of its input; hidden: the raw residual stream (the paper's)",
        "choices": POOL_INPUTS})
    init_std_up: float = field(default=0.02, metadata={"help": "std of W_up at initialisation (never zero)"})
    generator_form: str = field(default="anchored", metadata={
        "help": "anchored: P = B + s·R(p)·W_up, starting as the backbone with an init sequence prepended; "
                "paper: P = R(p)·W_up (use with --pool-input hidden for the paper's form)",
        "choices": GENERATOR_FORMS})
    anchor_init: str = field(default="bos", metadata={
        "help": "init sequence of the anchor: T copies of BOS, or --prompt-init-text", "choices": ANCHOR_INITS})
    prompt_init_text: str | None = field(default=None, metadata={
        "help": "text whose first T tokens start the anchor (implies --anchor-init text)"})
    anchor_scaled: bool = field(default=True, metadata={
        "help": "s = RMS(anchor) (--no-anchor-scaled, or --no-anchor-scale: fix s = 1)"})
    anchors_only: bool = field(default=False, metadata={
        "help": "anchored form without the generator term: P = B, a static deep prompt (only the anchors train)"})
    base_model_name_or_path: str | None = field(default=None, metadata={
        "help": "informational, recorded in adapter_config.json (default: the --model folder)"})
    peft_type: str = field(default="IAPT", init=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not _is_int(self.num_soft_tokens) or self.num_soft_tokens < 1:
            raise ValueError(f"num_soft_tokens must be a positive int, got {self.num_soft_tokens!r}")
        if self.bottleneck_dim is not None and (not _is_int(self.bottleneck_dim) or self.bottleneck_dim < 1):
            raise ValueError(f"bottleneck_dim must be a positive int or None, got {self.bottleneck_dim!r}")
        degrees = self.rational_degrees
        if (
            not isinstance(degrees, Sequence)
            or len(degrees) != 2
            or not all(_is_int(v) for v in degrees)
            or degrees[0] < 0
            or degrees[1] < 1
        ):
            raise ValueError(
                f"rational_degrees must be (p, q) with int p >= 0 and int q >= 1, got {degrees!r}"
            )
        self.rational_degrees = (int(degrees[0]), int(degrees[1]))
        if self.rational_version not in RATIONAL_VERSIONS:
            raise ValueError(f"rational_version must be one of {RATIONAL_VERSIONS}, got {self.rational_version!r}")
        init = self.rational_init
        if not callable(init) and init not in RATIONAL_INITS + (CUSTOM_INIT,):
            raise ValueError(
                f"rational_init must be one of {RATIONAL_INITS} or a callable, got {init!r}"
            )
        interval = self.rational_fit_interval
        if (
            not isinstance(interval, Sequence)
            or len(interval) != 2
            or not all(_is_real(v) and math.isfinite(v) for v in interval)
            or not float(interval[0]) < float(interval[1])
        ):
            raise ValueError(f"rational_fit_interval must be (lo, hi) of finite floats with lo < hi, got {interval!r}")
        self.rational_fit_interval = (float(interval[0]), float(interval[1]))
        if self.target_layers is not None:
            layers = self.target_layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(_is_int(v) for v in layers):
                raise ValueError(f"target_layers must be None or a list of ints, got {layers!r}")
            if len(layers) == 0:
                raise ValueError("target_layers must not be empty (use None for all layers)")
            if len(set(layers)) != len(layers):
                raise ValueError(f"target_layers has duplicates: {list(layers)!r}")
            self.target_layers = [int(v) for v in layers]
        if self.pool_input not in POOL_INPUTS:
            raise ValueError(f"pool_input must be one of {POOL_INPUTS}, got {self.pool_input!r}")
        if not _is_real(self.init_std_up) or not math.isfinite(self.init_std_up) or not self.init_std_up > 0:
            raise ValueError(f"init_std_up must be a finite float > 0 (never zero: zero soft tokens give NaN "
                             f"gradients through RMSNorm), got {self.init_std_up!r}")
        if self.generator_form not in GENERATOR_FORMS:
            raise ValueError(f"generator_form must be one of {GENERATOR_FORMS}, got {self.generator_form!r}")
        if self.anchor_init not in ANCHOR_INITS:
            raise ValueError(f"anchor_init must be one of {ANCHOR_INITS}, got {self.anchor_init!r}")
        if self.prompt_init_text is not None and (not isinstance(self.prompt_init_text, str)
                                                  or not self.prompt_init_text.strip()):
            raise ValueError(f"prompt_init_text must be a non-empty string or None, got {self.prompt_init_text!r}")
        if self.generator_form == "anchored" and self.anchor_init == "text" and self.prompt_init_text is None:
            raise ValueError('anchor_init="text" needs prompt_init_text (the text whose hidden states start the anchor)')
        if not isinstance(self.anchor_scaled, bool):
            raise ValueError(f"anchor_scaled must be a bool, got {self.anchor_scaled!r}")
        if not isinstance(self.anchors_only, bool):
            raise ValueError(f"anchors_only must be a bool, got {self.anchors_only!r}")
        if self.anchors_only and not self.anchored:
            raise ValueError('anchors_only=True needs generator_form="anchored" (the paper form has no anchor)')
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string or None, got {self.base_model_name_or_path!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides: Any) -> "IAPTConfig":
        """The exact form of Zhu et al. (2024): P = R(p)·W_up, pooling the raw residual stream."""
        return cls(**{"generator_form": "paper", "pool_input": "hidden", **overrides})

    @property
    def anchored(self) -> bool:
        """Whether the adapter has an anchor B_l and scale s_l per layer."""
        return self.generator_form == "anchored"

    # ------------------------------------------------------------------ derived values
    def resolved_bottleneck(self, hidden_size: int) -> int:
        """m for a model of hidden size ``hidden_size``."""
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        return max(8, 5 * hidden_size // 64)

    def num_parameters(self, hidden_size: int, num_layers: int) -> int:
        """Trainable parameters of one adapter: per target layer 2·d·m + m·T + (p+1) + q, plus
        T·d for the anchor of the anchored form (its scale is a fixed buffer); T·d alone with
        ``anchors_only``."""
        d, m, t = hidden_size, self.resolved_bottleneck(hidden_size), self.num_soft_tokens
        p, q = self.rational_degrees
        per_layer = 2 * d * m + m * t + p + 1 + q + (t * d if self.anchored else 0)
        if self.anchors_only:
            per_layer = t * d
        return per_layer * len(self.resolved_layers(num_layers))

    def resolved_layers(self, num_layers: int) -> list[int]:
        """Sorted, non-negative target layer indices for a model with ``num_layers`` layers."""
        if self.target_layers is None:
            return list(range(num_layers))
        out = []
        for v in self.target_layers:
            idx = v + num_layers if v < 0 else v
            if not 0 <= idx < num_layers:
                raise ValueError(f"target_layers entry {v} is out of range for a model with {num_layers} layers")
            out.append(idx)
        if len(set(out)) != len(out):
            raise ValueError(f"target_layers {self.target_layers} name the same layer twice")
        return sorted(out)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if callable(self.rational_init):
            out["rational_init"] = CUSTOM_INIT
        out["rational_degrees"] = list(self.rational_degrees)
        out["rational_fit_interval"] = list(self.rational_fit_interval)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IAPTConfig":
        data = dict(data)
        peft_type = data.pop("peft_type", "IAPT")
        data.pop("backbone", None)  # the record of the backbone, checked by iapt_fast.model.adapter_io
        if peft_type != "IAPT":
            raise ValueError(f"peft_type must be 'IAPT', got {peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown IAPTConfig fields: {unknown}")
        # Adapters saved before the anchored form existed are the paper's form, as they were.
        data.setdefault("generator_form", "paper")
        data.setdefault("pool_input", "hidden")
        for key in ("rational_degrees", "rational_fit_interval"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        return cls(**data)

    def to_json_string(self, **records: Any) -> str:
        """The config as ``adapter_config.json`` holds it; ``records``: extra top-level entries
        (the adapter's backbone record, iapt_fast/model/adapter_io.py)."""
        return json.dumps({**self.to_dict(), **records}, indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> "IAPTConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"adapter config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError("adapter config JSON must be an object")
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``adapter_config.json`` into ``directory``; a crash leaves the old file or the new one."""
        path = os.path.join(directory, CONFIG_NAME)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "IAPTConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path!r} is not UTF-8 text (an adapter config is a JSON file): {err}") from err
        try:
            return cls.from_json_string(text)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path!r}: {err}") from err


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
