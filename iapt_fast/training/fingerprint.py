"""What decides a run's batches, as a fingerprint a resume must match.

A checkpoint records a fingerprint: digests of the tokenized train / dev examples and of the
collator (the Trainer's own), plus whatever its caller says produced those examples (the CLI:
the data files' content, templates, field names, max length, truncation side, EOS, tokenizer).
A resume whose fingerprint differs is refused, naming each differing entry, so that a run
never mixes two data set-ups. Checkpoints without a fingerprint (older files) are not checked.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from typing import Any, Iterable, Mapping

import torch

__all__ = ["examples_digest", "records_digest", "tokenizer_digest", "fingerprint_diffs"]


def _update(h: "hashlib._Hash", value: Any) -> None:
    """Feed ``value`` into ``h`` unambiguously (type tag + length before every payload)."""
    if isinstance(value, Mapping):
        h.update(b"M%d:" % len(value))
        for key in sorted(value, key=str):
            _update(h, str(key))
            _update(h, value[key])
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value) \
            and -2**63 <= min(value) and max(value) < 2**63:  # token ids: one buffer, not a loop
        h.update(b"I%d:" % len(value))
        h.update(array("q", value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d:" % len(value))
        for v in value:
            _update(h, v)
    else:
        data = (value if isinstance(value, str) else repr(value)).encode("utf-8", "surrogatepass")
        h.update(b"%s%d:" % (b"S" if isinstance(value, str) else b"R", len(data)))
        h.update(data)


def _digest(items: Iterable[Any]) -> str:
    h = hashlib.sha256()
    n = 0
    for item in items:
        _update(h, item)
        n += 1
    return f"sha256:{h.hexdigest()[:16]} ({n} rows)"


def examples_digest(examples: Iterable[Any]) -> str:
    """Digest of tokenized examples in order: ``"sha256:<16 hex> (<n> rows)"``."""
    return _digest(examples)


def records_digest(records: Iterable[Mapping[str, Any]]) -> str:
    """Digest of raw data records (every field, in row order), as read from the data files."""
    return _digest(records)


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of what a tokenizer maps text to: its class, vocabulary and special tokens
    (not its path: the same tokenizer copied elsewhere is the same tokenizer)."""
    vocab = tokenizer.get_vocab()
    special = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    h = hashlib.sha256()
    _update(h, [type(tokenizer).__name__, sorted(vocab.items()), special,
                [getattr(tokenizer, f"{s}_token_id", None) for s in ("bos", "eos", "pad", "unk")]])
    return f"sha256:{h.hexdigest()[:16]} ({type(tokenizer).__name__}, {len(vocab)} tokens)"


def fingerprint_diffs(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """``"<entry>: checkpoint <old>, this run <new>"`` for every entry both record and that differs."""
    if not isinstance(saved, Mapping):
        return []
    return [f"{key}: checkpoint {_show(saved[key])}, this run {_show(current[key])}"
            for key in current if key in saved and _plain(saved[key]) != _plain(current[key])]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value.startswith("sha256:") else repr(value)
