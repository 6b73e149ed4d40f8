"""The T placeholder token ids that precede an IAPT request's prompt inside the engine.

The engine's model sees nothing of a request but its token ids and positions. An IAPT request
therefore carries its adapter in its own placeholder ids: the T rows at positions 0..T−1, whose
hidden states the decoder loop replaces by P_l before every layer (their embeddings are never
used). The first id is ``marker`` (the model's last vocabulary id), the next ``digits`` ids are
slot · L + prompt_length written in base V − 1 (least significant first; no digit can equal the
marker), the rest are zeros. The prompt length is carried because a request that the engine
preempts and recomputes arrives with its generated tokens appended to the prompt, and the
generators must pool the original prompt only.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PlaceholderCodec"]


@dataclass(frozen=True)
class PlaceholderCodec:
    """Encodes (adapter slot, prompt length) into placeholder ids and back.

    Args:
        vocab_size: V, the model's vocabulary (ids 0..V−1 pass the engine's checks).
        num_adapters: K, adapter slots 0..K−1.
        max_model_len: L − 1, the longest sequence the engine accepts.
    """

    vocab_size: int
    num_adapters: int
    max_model_len: int

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_adapters", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be at least 3 to carry placeholder ids, got {self.vocab_size}")

    @property
    def marker(self) -> int:
        return self.vocab_size - 1

    @property
    def digits(self) -> int:
        """Ids after the marker that one (slot, length) needs."""
        base, span, count = self.vocab_size - 1, self.num_adapters * (self.max_model_len + 1), 1
        room = base
        while room < span:
            room *= base
            count += 1
        return count

    @property
    def min_soft_tokens(self) -> int:
        """Adapters with fewer soft tokens cannot carry their header (1 + ``digits`` ids)."""
        return 1 + self.digits

    def encode(self, slot: int, num_tokens: int, prompt_length: int) -> list[int]:
        """The T = ``num_tokens`` placeholder ids of a request on adapter ``slot``."""
        if not 0 <= slot < self.num_adapters:
            raise ValueError(f"slot must be in [0, {self.num_adapters}), got {slot}")
        if num_tokens < self.min_soft_tokens:
            raise ValueError(f"an adapter needs num_soft_tokens >= {self.min_soft_tokens} to be served "
                             f"(its placeholders carry the adapter to the engine), got {num_tokens}")
        if not 1 <= prompt_length <= self.max_model_len:
            raise ValueError(f"prompt_length must be in [1, {self.max_model_len}], got {prompt_length}")
        value, base, ids = slot * (self.max_model_len + 1) + prompt_length, self.vocab_size - 1, [self.marker]
        for _ in range(self.digits):
            value, digit = divmod(value, base)
            ids.append(digit)
        return ids + [0] * (num_tokens - len(ids))

    def decode(self, ids: list[int]) -> tuple[int, int] | None:
        """(slot, prompt length) from the first 1 + ``digits`` ids of a prompt, or None when
        they are not a header (a request without an adapter)."""
        if len(ids) < self.min_soft_tokens or ids[0] != self.marker:
            return None
        value, scale, base = 0, 1, self.vocab_size - 1
        for digit in ids[1:1 + self.digits]:
            if digit >= base:
                return None
            value += digit * scale
            scale *= base
        slot, length = divmod(value, self.max_model_len + 1)
        if slot >= self.num_adapters or length < 1:
            return None
        return slot, length
