"""Instruction → response data for IAPT training: loading, validation, tokenization, batching.

One example is a prompt (the *instruction*, the tokens the generators pool over) followed by
a response (the only tokens the loss is computed on):

    input_ids        [BOS] prompt tokens ........ response tokens [EOS]
    instruction_mask   1     1 1 1 1 1 1 1 1 1 1    0 0 0 0 0 0 0    0
    labels           -100  -100 ............ -100   response ids    EOS

The prompt and the response are tokenized separately and concatenated, so the boundary is
exact whatever the tokenizer merges across it (templates should therefore put the space
that separates them at the start of the response, e.g. ``" {label}"``).

``datasets`` is imported lazily (only to read files): it is absent on the GPU machine and
``import iapt_fast`` must not need it.
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "PromptFormat",
    "load_records",
    "format_records",
    "tokenize_pair",
    "tokenize_records",
    "detect_choices",
    "IAPTCollator",
    "split_records",
]

IGNORE_INDEX = -100

# File suffix → `datasets` builder. Compressed CSV/JSON are read transparently by the builders.
_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


# ---------------------------------------------------------------------------------------------
# Formatting records into (prompt, response) text
# ---------------------------------------------------------------------------------------------
@dataclass
class PromptFormat:
    """How a record becomes a prompt (the instruction) and a response.

    Either name the fields (``instruction_field`` / ``response_field``) or give templates in
    ``str.format`` syntax over the record's fields (``prompt_template="Review: {text}\\nSentiment:"``,
    ``response_template=" {label}"``). A template wins over the field of the same side.
    """

    instruction_field: str = "instruction"
    response_field: str = "response"
    prompt_template: str | None = None
    response_template: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_template", "response_template"):
            template = getattr(self, name)
            if template is None:
                continue
            if not isinstance(template, str):
                raise TypeError(f"{name} must be a string, got {type(template).__name__}")
            try:
                fields = _template_fields(template)
            except ValueError as err:
                raise ValueError(f"{name} {template!r} is not a valid format string: {err}") from err
            if name == "prompt_template" and not fields:
                raise ValueError(f"prompt_template {template!r} names no field: every prompt would be identical")
        for name in ("instruction_field", "response_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")

    @property
    def prompt_fields(self) -> list[str]:
        return _template_fields(self.prompt_template) if self.prompt_template else [self.instruction_field]

    @property
    def response_fields(self) -> list[str]:
        return _template_fields(self.response_template) if self.response_template else [self.response_field]

    def check_columns(self, columns: Iterable[str], source: str = "the data") -> None:
        """Raise ValueError if a field the format needs is not among ``columns``."""
        columns = list(columns)
        missing = [f for f in dict.fromkeys(self.prompt_fields + self.response_fields) if f not in columns]
        if missing:
            raise ValueError(
                f"{source} has no field(s) {missing}; available fields: {columns}. "
                "Set --instruction-field/--response-field or --prompt-template/--response-template."
            )

    def apply(self, record: Mapping[str, Any], where: str = "record") -> tuple[str, str]:
        """(prompt, response) text of one record; ValueError naming ``where`` on bad data."""
        prompt = self._render(record, self.prompt_template, self.instruction_field, "instruction", where)
        response = self._render(record, self.response_template, self.response_field, "response", where)
        return prompt, response

    @staticmethod
    def _render(record: Mapping[str, Any], template: str | None, field: str, side: str, where: str) -> str:
        fields = _template_fields(template) if template else [field]
        values = {}
        for name in fields:
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r} (fields: {list(record)})")
            value = record[name]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"{where}: field {name!r} is empty (the {side} would be incomplete)")
            value = str(value)
            if not value.strip():
                raise ValueError(f"{where}: field {name!r} is empty (the {side} would be incomplete)")
            values[name] = value
        return template.format_map(values) if template else values[field]


def _template_fields(template: str) -> list[str]:
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("use named fields like {text}, not positional {} or {0}")
        # "{a.b}" / "{a[0]}" would index into the value; only plain names are record fields.
        names.append(name.split(".")[0].split("[")[0])
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Loading files
# ---------------------------------------------------------------------------------------------
def _suffix(path: str) -> str:
    """Format suffix of ``path``, ignoring a compression suffix: "x.csv.bz2" → ".csv"."""
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.splitext(name)[1]


def _builder_for(path: str) -> str:
    ext = _suffix(path)
    if ext not in _BUILDERS:
        raise ValueError(
            f"cannot tell the format of data file {path!r} from its suffix; "
            f"supported: {sorted(_BUILDERS)} (optionally compressed with {list(_COMPRESSION)})"
        )
    return _BUILDERS[ext]


def _no_rows(paths: list[str], builder: str) -> bool:
    """Whether every text file of ``paths`` holds no data row: only blank lines, and for CSV/TSV at
    most a header line. (Parquet files are binary: their emptiness shows after loading.)"""
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    if builder not in ("json", "csv"):
        return False
    for path in paths:
        suffix = next((c for c in _COMPRESSION if path.endswith(c)), None)
        if suffix is not None and suffix not in openers:  # zstd needs a package of its own: not decided here
            return False
        opener = openers.get(suffix, open)
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
                lines = [line for line in fh if line.strip()]
        except (OSError, EOFError, lzma.LZMAError):  # not what its suffix says: the reader's error stands
            return False
        if len(lines) > (1 if builder == "csv" else 0):
            return False
    return True


def load_records(paths: str | os.PathLike | Sequence[str | os.PathLike],
                 cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Read JSON, JSONL, CSV/TSV or Parquet files (all of one format) into a list of dicts.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for an
    unknown suffix, mixed formats or a file ``datasets`` cannot parse.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no data files given")
    builders = set()
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} is not a regular file")
        if not os.access(path, os.R_OK):
            raise ValueError(f"data file {path!r} is not readable (permissions)")
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty (0 bytes)")
        builders.add((_builder_for(path), _suffix(path) == ".tsv"))
    if len(builders) != 1:
        raise ValueError(f"data files mix formats {sorted({_suffix(p) for p in paths})}: {paths}")
    builder, is_tsv = builders.pop()
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - the GPU image lacks it
        raise ImportError("reading data files needs the `datasets` package: pip install datasets") from err
    kwargs: dict[str, Any] = {}
    if is_tsv:
        kwargs["sep"] = "\t"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as err:  # datasets wraps parser errors in many types; name the file instead
        if _no_rows(paths, builder):  # a header or blank lines only: what the reader failed on
            raise ValueError(f"data files {paths} contain no rows") from err
        _check_utf8(paths, builder)
        raise ValueError(f"could not read {builder.upper()} data from {paths}: {type(err).__name__}: {err}") from err
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    if len(ds) == 0:
        raise ValueError(f"data files {paths} contain no rows")
    try:
        return ds.to_list()
    except UnicodeDecodeError as err:  # the JSON and Parquet readers keep invalid text until it is read
        _check_utf8(paths, builder)
        row = next((i for i in range(len(ds)) if not _row_decodes(ds, i)), None)
        where = f"row {row}" if row is not None else "a row"
        raise ValueError(f"data files {paths}: {where} holds text that is not valid UTF-8 ({err})") from err


def _check_utf8(paths: Sequence[str], builder: str) -> None:
    """Raise ValueError naming the file and line of the first byte that is not UTF-8 text."""
    if builder == "parquet":
        return
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    for path in paths:
        opener = openers.get(os.path.splitext(path.lower())[1], open)
        try:
            with opener(path, "rb") as fh:
                for line_no, line in enumerate(fh, start=1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise ValueError(
                            f"data file {path!r}, line {line_no}: byte {line[err.start:err.start + 1]!r} at column "
                            f"{err.start + 1} is not UTF-8 text (data files must be UTF-8; re-encode the file, "
                            "e.g. with iconv)") from None
        except (OSError, EOFError, lzma.LZMAError):
            return  # unreadable for other reasons: the reader's own error says why


def _row_decodes(ds: Any, index: int) -> bool:
    try:
        ds[index]
    except UnicodeDecodeError:
        return False
    return True


def format_records(records: Sequence[Mapping[str, Any]], fmt: PromptFormat,
                   source: str = "data") -> list[tuple[str, str]]:
    """(prompt, response) for every record; every bad row is caught here, before training."""
    if len(records) == 0:
        raise ValueError(f"{source} contains no rows")
    fmt.check_columns(records[0].keys(), source)
    return [fmt.apply(r, where=f"{source}, row {i}") for i, r in enumerate(records)]


def split_records(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle deterministically and hold out ``fraction`` of ``items``: (kept, held_out)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    n_out = max(1, round(len(items) * fraction))
    if n_out >= len(items):
        raise ValueError(f"holding out {fraction:.0%} of {len(items)} rows leaves nothing to train on")
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in perm[n_out:]], [items[i] for i in perm[:n_out]]


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------
def _special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (BOS on Llama; nothing on GPT-2)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def tokenize_pair(tokenizer, prompt: str, response: str | None, max_length: int | None = None,
                  add_eos: bool = True, prompt_truncation: str = "left",
                  special_prefix: list[int] | None = None) -> dict[str, list[int]]:
    """Token ids, instruction mask and labels of one example.

    Args:
        prompt: the instruction text (pooled by the generators, no loss).
        response: the target text (loss only here); ``None`` for a prompt-only example
            (inference), which gets no EOS and no labels to learn.
        max_length: at most this many tokens in all. The response is kept whole when it fits
            next to one prompt token; the prompt is cut instead (``prompt_truncation`` "left"
            drops its start and keeps the text nearest the response, "right" its end). A
            response that alone is too long is cut at its end (losing its EOS).
        add_eos: end the response with the tokenizer's EOS so the model learns to stop.
        special_prefix: ids to put first (BOS); computed from the tokenizer when None.

    Returns:
        dict of equal-length lists ``input_ids``, ``instruction_mask`` (1 on the prompt
        including BOS, the tokens the model's default instruction mask would also cover),
        ``labels`` (IGNORE_INDEX on the prompt).
    """
    if prompt_truncation not in ("left", "right"):
        raise ValueError(f"prompt_truncation must be 'left' or 'right', got {prompt_truncation!r}")
    prefix = _special_prefix(tokenizer) if special_prefix is None else list(special_prefix)
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not body:
        raise ValueError(f"the instruction {prompt!r} tokenizes to nothing")
    resp: list[int] = []
    if response is not None:
        resp = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if add_eos:
            if tokenizer.eos_token_id is None:
                raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
            resp.append(tokenizer.eos_token_id)
        if not resp:
            raise ValueError(f"the response {response!r} tokenizes to nothing")
    if max_length is not None:
        if max_length < len(prefix) + 2 and response is not None:
            raise ValueError(f"max_length={max_length} leaves no room for one instruction and one response token")
        if max_length < len(prefix) + 1:
            raise ValueError(f"max_length={max_length} leaves no room for one instruction token")
        room = max_length - len(prefix)
        # The loss lives on the response: keep it whole if one prompt token still fits.
        resp = resp[: max(room - 1, 0)] if response is not None else resp
        keep = room - len(resp)
        if len(body) > keep:
            body = body[len(body) - keep:] if prompt_truncation == "left" else body[:keep]
    prompt_ids = prefix + list(body)
    return {
        "input_ids": prompt_ids + resp,
        "instruction_mask": [1] * len(prompt_ids) + [0] * len(resp),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + resp,
    }


def tokenize_records(tokenizer, pairs: Sequence[tuple[str, str | None]], max_length: int | None = None,
                     add_eos: bool = True, prompt_truncation: str = "left") -> list[dict[str, list[int]]]:
    """``tokenize_pair`` over a list of (prompt, response) pairs."""
    prefix = _special_prefix(tokenizer)
    return [tokenize_pair(tokenizer, p, r, max_length, add_eos, prompt_truncation, prefix) for p, r in pairs]


def detect_choices(responses: Sequence[str], max_choices: int = 16) -> list[str] | None:
    """The label set if the responses look like classification (few distinct, repeated values).

    Returns the distinct responses (in first-seen order) when there are 2..max_choices of them
    and each appears on average at least twice; otherwise None (free-form generation).
    """
    distinct = list(dict.fromkeys(responses))
    if 2 <= len(distinct) <= max_choices and len(responses) >= 2 * len(distinct):
        return distinct
    return None


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
class IAPTCollator:
    """Pads tokenized examples into a batch.

    Args:
        pad_token_id: id written into padding (its value is never attended or learned).
        padding_side: "right" (training default) or "left" (generation). Both are supported by
            IAPTModel; position ids follow the attention mask.
        pad_to_multiple_of: round the padded length up (tensor-core friendly shapes).

    Returns (from ``__call__``) a dict of [B, N] tensors: ``input_ids`` (long),
    ``attention_mask`` (long), ``instruction_mask`` (long 0/1) and, when every example has
    them, ``labels`` (long, IGNORE_INDEX on prompt and padding).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_tokenizer(cls, tokenizer, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> "IAPTCollator":
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(int(pad), padding_side, pad_to_multiple_of)

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        with_labels = all("labels" in e for e in examples)
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "instruction_mask": 0, "labels": IGNORE_INDEX}
        keys = ["input_ids", "attention_mask", "instruction_mask"] + (["labels"] if with_labels else [])
        out = {k: torch.full((len(examples), length), fills[k], dtype=torch.long) for k in keys}
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            if n == 0:
                raise ValueError(f"example {row} has no tokens")
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            out["input_ids"][row, cols] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            out["attention_mask"][row, cols] = 1
            inst = ex.get("instruction_mask")
            out["instruction_mask"][row, cols] = 1 if inst is None else torch.as_tensor(inst, dtype=torch.long)
            if with_labels:
                out["labels"][row, cols] = torch.as_tensor(ex["labels"], dtype=torch.long)
        return out
