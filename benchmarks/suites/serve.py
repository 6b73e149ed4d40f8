"""Serving in vLLM: the same engine serving the bare backbone, IAPT adapters and vLLM multi-LoRA.

vLLM pins its own transformers, so it lives in a separate environment (README "Serving":
``bash tests/serve/run.sh`` creates ``.venv-serve``). This suite runs in the main environment
and starts ``python -m suites.serve_worker`` (from benchmarks/) with the serve environment's python (``.venv-serve/bin/python``
or ``$IAPT_SERVE_PYTHON``); the worker prints its rows as JSON. Without a serve environment
every row is skipped with the reason, and ``run.py``'s default run leaves the suite out.

Methods (K distinct adapters, row i of the batch on tenant i mod K):
    base            the stock engine, no adapters
    iapt_k{K}       the IAPT engine (``IAPTLLM``), K of the loaded adapters in the batch
    vllm_lora_k{K}  the stock engine with ``enable_lora``: PEFT LoRA adapters on the LoRA
                    targets at IAPT's trainable-parameter count, one ``LoRARequest`` per row
Cases:
    offline   the whole batch through ``LLM.generate``, greedy, fixed length; interleaved
              rounds in rotating order, output tokens/s of the median round
    online    the same prompts arriving as a Poisson process at a fraction of the base
              engine's offline request rate; time to first token, output tokens/s
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Any

from suites import SuiteOptions
from suites.ratios import cases, index, ratio, value
from suites.common import STATUSES, Recorder
from suites.models import LLAMA2_7B, BackboneSpec, budget
from suites.serve_worker import RESULT_MARKER, SCHEMA, engine_of, k_of, offline_methods

SUITE = "serve"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Started as a module from benchmarks/ (never as a script: suites/ would then be sys.path[0], and
# suites/kernels.py would shadow the `kernels` package transformers imports).
WORKER_MODULE = "suites.serve_worker"
CREATE_HINT = ("create it with `bash tests/serve/run.sh` (it makes .venv-serve), or set IAPT_SERVE_PYTHON to a "
               "python that has vLLM and iapt_fast")
# Time the worker needs beyond its measuring budget before it is declared hung: imports and
# writing its output.
GRACE_S = 120.0


def serve_python(environ: dict[str, str] | None = None, root: str = REPO_ROOT) -> tuple[str | None, str]:
    """(python of the serve environment, "") or (None, why there is none and how to create it).

    ``$IAPT_SERVE_PYTHON`` wins when set; otherwise ``<root>/.venv-serve/bin/python``.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("IAPT_SERVE_PYTHON")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit, ""
        return None, f"IAPT_SERVE_PYTHON={explicit!r} is not an executable file; {CREATE_HINT}"
    default = os.path.join(root, ".venv-serve", "bin", "python")
    if os.path.isfile(default) and os.access(default, os.X_OK):
        return default, ""
    return None, f"no serve environment ({os.path.relpath(default, root)} not found; vLLM lives in its own " \
                 f"environment): {CREATE_HINT}"


def settings(device: str, quick: bool) -> dict[str, Any]:
    """Backbone, batch, K values and repetitions for ``device``."""
    if device == "cuda":
        layers = 4 if quick else 8
        spec = BackboneSpec(f"Llama-2-7B-shaped, {layers} of its 32 layers", num_hidden_layers=layers,
                            max_position_embeddings=1024, **LLAMA2_7B)
        return {"spec": spec, "dtype": "bfloat16", "num_prompts": 32, "prompt_min": 64, "prompt_max": 192,
                "new_tokens": 32 if quick else 64, "ks": [1, 4, 16], "online_ks": [4] if quick else [1, 4, 16],
                "reps": 2 if quick else 5, "lora_reps": 2 if quick else 5, "max_model_len": 512, "online_load": 0.7, "kv_cache_gb": 4}
    if quick:
        spec = BackboneSpec("tiny Llama-shaped", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=1024,
                            max_position_embeddings=512)
        return {"spec": spec, "dtype": "float32", "num_prompts": 16, "prompt_min": 8, "prompt_max": 16,
                "new_tokens": 8, "ks": [1, 4, 16], "online_ks": [4], "reps": 1, "lora_reps": 1, "max_model_len": 128,
                "online_load": 0.7, "kv_cache_gb": 1}
    spec = BackboneSpec("small Llama-shaped", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=8192, max_position_embeddings=1024)
    return {"spec": spec, "dtype": "float32", "num_prompts": 32, "prompt_min": 16, "prompt_max": 48,
            "new_tokens": 32, "ks": [1, 4, 16], "online_ks": [4], "reps": 7, "lora_reps": 2, "max_model_len": 256,
            "online_load": 0.7, "kv_cache_gb": 1}


def case_names(cfg: dict[str, Any]) -> tuple[str, str]:
    """(offline case, online case) names of the rows."""
    shape = f"b{cfg['num_prompts']} p{cfg['prompt_min']}-{cfg['prompt_max']} n{cfg['new_tokens']}"
    return f"offline {shape}", f"online poisson {cfg['online_load']:g}x base, {shape}"


def online_methods(online_ks: list[int]) -> list[str]:
    return ["base"] + [f"iapt_k{k}" for k in online_ks] + [f"vllm_lora_k{k}" for k in online_ks]


def planned_rows(cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(case, method, params) of every row the suite reports, in order."""
    offline, online = case_names(cfg)
    out = []
    for case, methods in ((offline, offline_methods(cfg["ks"])), (online, online_methods(cfg["online_ks"]))):
        for method in methods:
            out.append((case, method, {"K": k_of(method), "engine": engine_of(method),
                                       "prompts": cfg["num_prompts"], "new_tokens": cfg["new_tokens"]}))
    return out


def count(opts: SuiteOptions) -> int:
    device, quick = opts.device, opts.quick
    return len(planned_rows(settings(device, quick)))


def parse_worker_output(stdout: str) -> dict[str, Any]:
    """The worker's result: the last stdout line that starts with ``RESULT_MARKER``, checked.

    Raises:
        ValueError naming what is missing or malformed.
    """
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        raise ValueError(f"the worker printed no line starting with {RESULT_MARKER.strip()!r}")
    try:
        result = json.loads(lines[-1][len(RESULT_MARKER):])
    except json.JSONDecodeError as err:
        raise ValueError(f"the worker's result line is not JSON: {err}") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"the worker's result must be an object with schema {SCHEMA}, "
                         f"got schema {result.get('schema') if isinstance(result, dict) else type(result).__name__}")
    rows = result.get("rows")
    if not isinstance(rows, list):
        raise ValueError("the worker's result must hold a list 'rows'")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{i}] must be an object, got {type(row).__name__}")
        for key in ("case", "method"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"rows[{i}].{key} must be a string, got {row.get(key)!r}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"rows[{i}].status must be one of {STATUSES}, got {row.get('status')!r}")
        if row["status"] != "ok" and not isinstance(row.get("error"), str):
            raise ValueError(f"rows[{i}] ({row['status']}) must say why in 'error'")
        metrics = row.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
                isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
                for k, v in metrics.items()):
            raise ValueError(f"rows[{i}].metrics must map names to numbers or null, got {metrics!r}")
        if row["status"] == "ok" and not metrics:
            raise ValueError(f"rows[{i}] is ok but has no metrics")
    return result


def record_rows(rec: Recorder, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """One row per planned (case, method) from the worker's ``result``; a row it did not
    report is failed, saying so."""
    got = {(r["case"], r["method"]): r for r in result["rows"]}
    for case, method, params in planned_rows(cfg):
        row = got.get((case, method))
        if row is None:
            rec.fail(SUITE, case, method, params, "the serve worker did not report this row")
            continue
        params = {**params, **row.get("params", {})}
        if row["status"] == "skipped":
            rec.skip(SUITE, case, method, params, row["error"])
        elif row["status"] == "failed":
            rec.fail(SUITE, case, method, params, row["error"])
        else:
            m = row["metrics"]
            seconds = m.get("span_s") or (m.get("total_ms") or 0.0) * (m.get("reps") or 1.0) / 1e3
            rec.record(SUITE, case, method, params, m, seconds)


def worker_config(cfg: dict[str, Any], plan: dict[str, Any], device: str, budget_s: float) -> dict[str, Any]:
    """The JSON the worker reads."""
    offline, online = case_names(cfg)
    spec: BackboneSpec = cfg["spec"]
    return {**{k: v for k, v in cfg.items() if k != "spec"}, "spec": spec.to_dict(), "device": device, "seed": 0,
            "plan": plan, "engines": ["base", "iapt", "lora"], "budget_s": budget_s,
            # Time kept for the online runs when the offline rounds run long.
            "online_reserve_s": min(90.0, 0.25 * budget_s), "offline_case": offline, "online_case": online}


def _info(cfg: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    spec: BackboneSpec = cfg["spec"]
    return {
        "backbone": spec.to_dict(), "dtype": cfg["dtype"], "budget": plan, "ks": cfg["ks"],
        "online_ks": cfg["online_ks"],
        "timer": (f"{cfg['num_prompts']} prompts of {cfg['prompt_min']}-{cfg['prompt_max']} tokens x "
                  f"{cfg['new_tokens']} greedy tokens; offline: {cfg['reps']} interleaved rounds (vLLM LoRA in "
                  f"{cfg['lora_reps']} of them), median; online: "
                  f"Poisson arrivals at {cfg['online_load']:g}x the base engine's offline request rate"),
        "notes": [
            "one vLLM engine per kind, the same options for all (float32 on CPU, enforce_eager, chunked prefill "
            "off as IAPT needs, prefix caching off so repeated rounds recompute); engine core in the worker's "
            "process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor 'uni') on the CPU",
            "row i of the batch on tenant i mod K; the IAPT and LoRA engines load max(K) adapters",
            f"vLLM multi-LoRA: PEFT LoRA on {', '.join(plan['lora_targets'])}, rank {plan['lora_rank']} "
            f"({plan['lora_params']:,} params per adapter; vLLM pads to its next max_lora_rank) vs IAPT m = "
            f"{plan['iapt_bottleneck']}, T = {plan['iapt_soft_tokens']} ({plan['iapt_params']:,} params per adapter)",
            "online: TTFT = first output token seen by the driver loop minus arrival; output tokens/s = output "
            "tokens / (last finish - first arrival)",
        ],
    }


def run(rec: Recorder, opts: SuiteOptions) -> dict[str, Any]:
    """Run the suite into ``rec`` through the worker; returns its settings for the report."""
    device, quick, lora_targets = opts.device, opts.quick, list(opts.lora_targets)
    cfg = settings(device, quick)
    plan = budget(cfg["spec"], lora_targets, num_tokens=4)
    info = _info(cfg, plan)
    python, why = serve_python()
    reason = why if python is None else rec.budget.skip_reason()
    if reason is not None:
        info["skipped"] = reason
        for case, method, params in planned_rows(cfg):
            rec.skip(SUITE, case, method, params, reason)
        return info
    budget_s = rec.budget.remaining()
    budget_s = 600.0 if budget_s == float("inf") else max(30.0, budget_s - GRACE_S / 4)
    info["python"] = python
    with tempfile.TemporaryDirectory(prefix="iapt_serve_") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(worker_config(cfg, plan, device, budget_s), fh)
        # The serve environment brings its own packages: nothing of the main one may leak in.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        start = time.perf_counter()
        try:
            # From benchmarks/, so that the worker finds its sibling modules; iapt_fast is the serve
            # environment's install of this checkout.
            proc = subprocess.run([python, "-m", WORKER_MODULE, path], cwd=os.path.join(REPO_ROOT, "benchmarks"), env=env, capture_output=True, text=True,
                                  timeout=budget_s + GRACE_S)
            info["worker_s"] = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"the serve worker exited with status {proc.returncode}: "
                                   f"{_tail(proc.stderr)}")
            result = parse_worker_output(proc.stdout)
        except subprocess.TimeoutExpired:
            result = None
            error = f"the serve worker ran past {budget_s + GRACE_S:.0f} s and was stopped"
        except Exception as err:
            result = None
            error = f"{type(err).__name__}: {err}"
    if result is None:
        info["error"] = error
        for case, method, params in planned_rows(cfg):
            rec.fail(SUITE, case, method, params, error)
        return info
    info["versions"] = result.get("versions", {})
    info["engines"] = result.get("engines", {})
    info["artifacts"] = result.get("artifacts", {})
    info["online_rate_rps"] = result.get("online_rate_rps")
    info["round_s"] = result.get("round_s", {})
    v = info["versions"]
    info["notes"].append("serve environment: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]))
    record_rows(rec, cfg, result)
    return info


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])[-2000:]


def adapter_counts(rows: list[dict[str, Any]], case: str) -> list[int]:
    return sorted({int(r["method"].rsplit("_k", 1)[1]) for r in rows
                   if r["suite"] == "serve" and r["case"] == case and r["method"].startswith("iapt_k")})


def ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """IAPT with K adapters against the bare engine and vLLM multi-LoRA at the same K. Targets
    at K = 4 on the CPU, offline: IAPT ≥ 0.95× the bare engine and ≥ 2.5× vLLM multi-LoRA."""
    out: list[dict[str, Any]] = []
    s = index(rows, "serve")
    for case in cases(rows, "serve"):
        online = case.startswith("online")
        key = "output_tokens_per_s" if online else "tokens_per_s"
        prefix = "online: " if online else ""
        base = s.get((case, "base"))
        for k in adapter_counts(rows, case):
            iapt, lora = s.get((case, f"iapt_k{k}")), s.get((case, f"vllm_lora_k{k}"))
            targeted = k == 4 and device == "cpu" and not online
            out.append(ratio(f"{prefix}IAPT K={k} / base tokens/s", "serve", case, iapt, base, key,
                              ("ge", 0.95) if targeted else None))
            out.append(ratio(f"{prefix}IAPT K={k} / vLLM LoRA K={k} tokens/s", "serve", case, iapt, lora, key,
                              ("ge", 2.5) if targeted else None))
            out.append(ratio(f"{prefix}vLLM LoRA K={k} / base tokens/s", "serve", case, lora, base, key))
            if not online:
                out.append(value(f"IAPT K={k} / base tokens/s, per-round pairs (median)", "serve", case, iapt,
                                  "paired_vs_base"))
            if online:
                out.append(ratio(f"online: IAPT K={k} / base time to first token", "serve", case, iapt, base,
                                  "ttft_ms"))
                out.append(ratio(f"online: vLLM LoRA K={k} / base time to first token", "serve", case, lora, base,
                                  "ttft_ms"))
    return out
