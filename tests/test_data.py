"""Data pipeline: instruction mask and labels (padding, truncation), file loading, validation."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from iapt_fast.training.data import (IGNORE_INDEX, IAPTCollator, PromptFormat, detect_choices, format_records,
                            load_records, split_records, tokenize_pair, tokenize_records)
from train_fixtures import make_tokenizer, sentiment_rows, write_jsonl




def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_pair_marks_prompt_and_labels_response(tok):
    prompt, response = "Review: good movie\nSentiment:", " positive"
    ex = tokenize_pair(tok, prompt, response)
    p, r = [tok.bos_token_id] + _ids(tok, prompt), _ids(tok, response) + [tok.eos_token_id]
    assert ex["input_ids"] == p + r
    assert ex["instruction_mask"] == [1] * len(p) + [0] * len(r)
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + r


def test_tokenize_pair_without_bos_or_eos():
    tok = make_tokenizer(add_bos=False)
    ex = tokenize_pair(tok, "good film", " negative", add_eos=False)
    p, r = _ids(tok, "good film"), _ids(tok, " negative")
    assert ex["input_ids"] == p + r and ex["instruction_mask"] == [1] * len(p) + [0] * len(r)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_response_and_cuts_prompt(tok, side):
    rng = random.Random(1)
    words = "good bad movie plot actor scene the a very not".split()
    for _ in range(40):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        response = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        max_length = rng.randint(3, 40)
        ex = tokenize_pair(tok, prompt, response, max_length=max_length, prompt_truncation=side)
        full = tokenize_pair(tok, prompt, response)
        n_prompt_full = sum(full["instruction_mask"])
        n = len(ex["input_ids"])
        assert n == min(max_length, len(full["input_ids"]))
        n_prompt = sum(ex["instruction_mask"])
        # Mask is a prefix of ones, BOS first, at least one real instruction token.
        assert ex["instruction_mask"] == [1] * n_prompt + [0] * (n - n_prompt) and n_prompt >= 2
        assert ex["input_ids"][0] == tok.bos_token_id
        body, body_full = ex["input_ids"][1:n_prompt], full["input_ids"][1:n_prompt_full]
        assert body == (body_full[len(body_full) - len(body):] if side == "left" else body_full[:len(body)])
        resp, resp_full = ex["input_ids"][n_prompt:], full["input_ids"][n_prompt_full:]
        assert resp == resp_full[:len(resp)]
        # The response is only cut when it could not fit next to one instruction token.
        if len(resp_full) + 2 <= max_length:
            assert resp == resp_full
        assert ex["labels"] == [IGNORE_INDEX] * n_prompt + resp


def test_truncation_rejects_impossible_lengths(tok):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pair(tok, "good", " positive", max_length=2)
    with pytest.raises(ValueError, match="prompt_truncation"):
        tokenize_pair(tok, "good", " positive", prompt_truncation="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_padding(tok, side):
    rows = sentiment_rows(7, seed=3)
    pairs = [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows]
    exs = tokenize_records(tok, pairs, max_length=24)
    batch = IAPTCollator.from_tokenizer(tok, padding_side=side, pad_to_multiple_of=8)(exs)
    n = batch["input_ids"].shape[1]
    assert n % 8 == 0 and n >= max(len(e["input_ids"]) for e in exs)
    for row, ex in enumerate(exs):
        k = len(ex["input_ids"])
        real = slice(0, k) if side == "right" else slice(n - k, n)
        pad = slice(k, n) if side == "right" else slice(0, n - k)
        assert batch["input_ids"][row, real].tolist() == ex["input_ids"]
        assert batch["instruction_mask"][row, real].tolist() == ex["instruction_mask"]
        assert batch["labels"][row, real].tolist() == ex["labels"]
        assert batch["attention_mask"][row, real].eq(1).all() and batch["attention_mask"][row, pad].eq(0).all()
        assert batch["instruction_mask"][row, pad].eq(0).all() and batch["labels"][row, pad].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, pad].eq(tok.pad_token_id).all()
    # Invariants the model relies on: instruction ⊆ attended, no loss on the instruction.
    assert (batch["instruction_mask"] <= batch["attention_mask"]).all()
    assert (batch["instruction_mask"].bool() & batch["labels"].ne(IGNORE_INDEX)).sum() == 0
    assert all(v.dtype == torch.long for v in batch.values())


def test_collator_without_labels_and_errors(tok):
    batch = IAPTCollator(0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert "labels" not in batch and batch["instruction_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="padding_side"):
        IAPTCollator(0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id"):
        IAPTCollator(-1)
    with pytest.raises(ValueError, match="empty"):
        IAPTCollator(0)([])


def test_load_formats(tmp_path):
    rows = sentiment_rows(5)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import pandas as pd
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "a.tsv", index=False, sep="\t")
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    cache = str(tmp_path / "cache")
    for name in ("a.jsonl", "a.json", "a.csv", "a.tsv", "a.parquet"):
        assert load_records(tmp_path / name, cache_dir=cache) == rows, name
    assert load_records([jsonl, jsonl], cache_dir=cache) == rows + rows


def test_load_errors(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="a.txt"):
        load_records(tmp_path / "a.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "good", "label": "positive"}\n{"text": broken\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        load_records(tmp_path / "bad.jsonl", cache_dir=cache)
    (tmp_path / "b.csv").write_text("text,label\ngood,positive\n")
    with pytest.raises(ValueError, match="mix formats"):
        load_records([write_jsonl(tmp_path / "c.jsonl", sentiment_rows(2)), tmp_path / "b.csv"])


def test_format_validation():
    fmt = PromptFormat(prompt_template="Review: {text}\nSentiment:", response_template=" {label}")
    assert fmt.apply({"text": "good", "label": "positive"}) == ("Review: good\nSentiment:", " positive")
    assert PromptFormat(instruction_field="q", response_field="a").apply({"q": "x", "a": 1}) == ("x", "1")
    rows = [{"text": "good", "label": "positive"}, {"text": "  ", "label": "negative"}]
    with pytest.raises(ValueError, match="row 1.*'text' is empty"):
        format_records(rows, fmt, "train.jsonl")
    with pytest.raises(ValueError, match="row 0.*'label' is empty"):
        format_records([{"text": "good", "label": None}], fmt)
    with pytest.raises(ValueError, match=r"no field\(s\) \['instruction', 'response'\].*available fields: \['text', 'label'\]"):
        format_records(rows, PromptFormat())
    with pytest.raises(ValueError, match="positional"):
        PromptFormat(prompt_template="Review: {}")
    with pytest.raises(ValueError, match="names no field"):
        PromptFormat(prompt_template="constant prompt")
    with pytest.raises(ValueError, match="not a valid format string"):
        PromptFormat(prompt_template="Review: {text")


def test_detect_choices_and_split():
    assert detect_choices(["a", "b", "a", "b"]) == ["a", "b"]
    assert detect_choices(["a", "b", "c"]) is None
    assert detect_choices(["a"] * 9) is None
    kept, held = split_records(list(range(100)), 0.1, seed=3)
    assert len(held) == 10 and sorted(kept + held) == list(range(100))
    assert split_records(list(range(100)), 0.1, seed=3) == (kept, held)
    assert split_records(list(range(100)), 0.1, seed=4) != (kept, held)
    with pytest.raises(ValueError, match="fraction"):
        split_records([1, 2], 1.5, seed=0)


@pytest.mark.parametrize("name,content,words", [
    ("empty.jsonl", "", "is empty \\(0 bytes\\)"),
    ("empty.csv", "", "is empty \\(0 bytes\\)"),
    ("blank.jsonl", "\n\n", "contain no rows"),
    ("header.csv", "instruction,response\n", "contain no rows"),
    ("header.tsv.gz", "instruction\tresponse\n\n", "contain no rows"),
    ("blank.jsonl.bz2", "\n \n", "contain no rows"),
])
def test_empty_data_files_say_so(tmp_path, name, content, words):
    import bz2
    import gzip

    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(content.encode()))
    elif name.endswith(".bz2"):
        path.write_bytes(bz2.compress(content.encode()))
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=words) as err:
        load_records([str(path)])
    assert "StopIteration" not in str(err.value)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv", "bad.tsv", "bad.jsonl.gz", "bad.csv.bz2"])
def test_a_byte_that_is_not_utf8_is_named_with_its_file_and_line(tmp_path, name):
    import bz2
    import gzip

    if ".jsonl" in name:
        lines = [json.dumps({"text": t, "label": "positive"}).encode() for t in ("good", "fine", "caf\xe9")]
        lines[2] = lines[2].replace("\\u00e9".encode(), b"\xe9")  # Latin-1 é, as a cp1252 export writes it
    else:
        sep = b"\t" if ".tsv" in name else b","
        lines = [b"text" + sep + b"label", b"good" + sep + b"positive", b"caf\xe9" + sep + b"positive"]
    data = b"\n".join(lines) + b"\n"
    opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
    with opener(tmp_path / name, "wb") as fh:
        fh.write(data)
    with pytest.raises(ValueError, match=rf"data file '.*{name}', line 3: byte b'\\xe9' at column \d+ is not UTF-8"):
        load_records(tmp_path / name, cache_dir=str(tmp_path / "cache"))
