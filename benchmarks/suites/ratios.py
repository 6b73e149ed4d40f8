"""The headline ratios a suite declares (``ratios(rows, device)`` of each suite module), and
their targets (design.md §5): one row per ratio, None where an input is missing or failed.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Target", "index", "cases", "ratio", "value", "meets", "target_text"]

# ("ge" | "le" | "gt", reference value)
Target = tuple[str, float]


def index(rows: list[dict[str, Any]], suite: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["case"], r["method"]): r for r in rows if r["suite"] == suite}


def cases(rows: list[dict[str, Any]], suite: str) -> list[str]:
    """The cases of ``suite``'s rows, in the order they were measured."""
    return list(dict.fromkeys(r["case"] for r in rows if r["suite"] == suite))


def ratio(name: str, suite: str, case: str, num: dict | None, den: dict | None, key: str,
           target: Target | None = None, invert: bool = False, minus_one: bool = False,
           num_key: str | None = None) -> dict[str, Any]:
    """num[key] / den[key] (den/num when ``invert``), minus one when ``minus_one``."""
    out: dict[str, Any] = {"suite": suite, "case": case, "name": name, "value": None,
                           "target": target_text(target), "met": None, "note": None}
    missing = [f"{r['method']} {r['status']}" + (f": {r['error']}" if r.get("error") else "")
               for r in (num, den) if r is not None and r["status"] != "ok"]
    if num is None or den is None:
        out["note"] = "not measured in this run"
        return out
    if missing:
        out["note"] = "; ".join(missing)[:300]
        return out
    a, b = num["metrics"].get(num_key or key), den["metrics"].get(key)
    if a is None or b is None or (b == 0 if not invert else a == 0):
        out["note"] = f"{key} missing"
        return out
    value = b / a if invert else a / b
    if minus_one:
        value -= 1.0
    out["value"] = value
    out["met"] = meets(value, target)
    return out


def value(name: str, suite: str, case: str, row: dict | None, key: str,
           target: Target | None = None) -> dict[str, Any]:
    """A metric of one row reported as a ratio (e.g. the fraction of copy bandwidth)."""
    out: dict[str, Any] = {"suite": suite, "case": case, "name": name, "value": None,
                           "target": target_text(target), "met": None, "note": None}
    if row is None:
        out["note"] = "not measured in this run"
    elif row["status"] != "ok":
        out["note"] = (f"{row['method']} {row['status']}" + (f": {row['error']}" if row.get("error") else ""))[:300]
    elif row["metrics"].get(key) is None:
        out["note"] = f"{key} missing"
    else:
        out["value"] = row["metrics"][key]
        out["met"] = meets(out["value"], target)
    return out


def meets(value: float, target: Target | None) -> bool | None:
    if target is None:
        return None
    op, ref = target
    return {"ge": value >= ref, "le": value <= ref, "gt": value > ref}[op]


def target_text(target: Target | None) -> str | None:
    if target is None:
        return None
    op, ref = target
    return {"ge": "≥ ", "le": "≤ ", "gt": "> "}[op] + f"{ref:g}"
