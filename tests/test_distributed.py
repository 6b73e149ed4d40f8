"""Distributed training: real multi-process runs on CPU (gloo, 2 ranks, tiny Llama).

The multi-process jobs run under ``torchrun --standalone`` exactly as a user would start
them; each is launched once per module (tests/test_distributed_worker.py) and checked
against the same training done here in one process. Every launch has a timeout, so a hang
fails the test instead of blocking CI. Budget: ~2.5 min on a loaded 2-core machine.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "test_distributed_worker.py")

import test_distributed_worker as W  # noqa: E402  (tests/ is on the path under pytest)

from iapt_fast.training.data import IAPTCollator  # noqa: E402
from iapt_fast.training.distributed import (  # noqa: E402
    DistContext,
    ShardedBatchStream,
    init_distributed,
    resolve_strategy,
    shard_rows,
)
from iapt_fast.training.trainer import BatchStream, Trainer  # noqa: E402

# Single-process vs 2 ranks differ only in float summation order: ~1e-6 after 4 AdamW steps
# (measured 7e-7), while one step moves weights by up to lr = 1e-2.
ATOL = 2e-5


def _torchrun(args: list[str], timeout: float, extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc, time.perf_counter() - t0


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= ATOL, f"{what}: max |diff| {worst:.2e} > {ATOL:.0e}"


# ------------------------------------------------------------------ shared runs
@pytest.fixture(scope="module")
def data():
    tok = W.build_tokenizer()
    train, evals, dev = W.build_data(tok)
    return tok, train, evals, dev, IAPTCollator.from_tokenizer(tok)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Single-process training: the trajectory the ranks must follow."""
    tok, train, evals, dev, collator = data
    out = {}
    for name, bilevel in (("joint", False), ("bilevel", True)):
        model = W.build_model(tok)
        start = W.trainable(model)
        tr = Trainer(model, W.train_config(str(tmp_path_factory.mktemp(name)), bilevel=bilevel), train, collator,
                     eval_examples=evals, dev_examples=dev if bilevel else None)
        tr.train()
        out[name] = W.trainable(model)
        out[name + "_moved"] = max((out[name][k] - start[k]).abs().max().item() for k in start)
        if name == "joint":
            out["eval"] = tr.evaluate()
            out["losses"] = [h["loss"] for h in tr.history if "loss" in h]
            out["grad_norms"] = [h["grad_norm"] for h in tr.history if "grad_norm" in h]
            out["model"] = model
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    """One 2-rank job: DDP, then FSDP, each training joint (+ checkpoint, resume) and bi-level."""
    out = str(tmp_path_factory.mktemp("runs"))
    proc, _ = _torchrun([WORKER, "train", out], timeout=300)
    _check(proc)
    return out


@pytest.fixture(scope="module")
def ddp_run(runs):
    return os.path.join(runs, "ddp")


@pytest.fixture(scope="module")
def fsdp_run(runs):
    return os.path.join(runs, "fsdp")


def _check_run(out: str, reference: dict, strategy: str) -> dict:
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["world_size"] == 2 and results["strategy"] == strategy
    params = torch.load(os.path.join(out, "params.pt"))
    assert reference["joint_moved"] > 100 * ATOL  # the tolerance is far below one step's change
    _close(params["joint"], reference["joint"], f"{strategy} joint vs single process")
    _close(params["resumed"], reference["joint"], f"{strategy} resumed from checkpoint-2 vs uninterrupted")
    _close(params["bilevel"], reference["bilevel"], f"{strategy} bi-level vs single process")
    assert results["joint_losses"] == pytest.approx(reference["losses"], rel=1e-5)
    # AdamW forgives a gradient off by a constant factor (e.g. the ranks' average taken for a
    # sum); the pre-clipping norm does not.
    assert len(reference["grad_norms"]) == 4
    assert results["joint_grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    assert results["joint_eval"]["eval_loss"] == pytest.approx(reference["eval"]["eval_loss"], rel=1e-5)
    # Rank 0 alone wrote, atomically: no temporary folders left behind.
    leftovers = [n for _, dirs, files in os.walk(out) for n in dirs + files if ".tmp-" in n or ".old-" in n]
    assert not leftovers
    history = [json.loads(line) for line in open(os.path.join(out, "joint", "history.jsonl"))]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx(reference["losses"], rel=1e-5)
    return params


def test_ddp_matches_single_process(ddp_run, reference):
    _check_run(ddp_run, reference, "ddp")


def test_fsdp_matches_single_process_and_adapter_loads(fsdp_run, reference, data):
    """FSDP2 (with activation checkpointing): same trajectory; the gathered adapter is a
    plain one that loads on one process and computes what the single-process model does."""
    from iapt_fast import IAPTModel
    from test_distributed_worker import make_llama_for

    params = _check_run(fsdp_run, reference, "fsdp")
    tok, train, evals, _, collator = data
    loaded = IAPTModel.from_pretrained(make_llama_for(tok), os.path.join(fsdp_run, "adapter"))
    # Bit for bit what the ranks held, gathered.
    assert all(torch.equal(a, params["joint"][k]) for k, a in W.trainable(loaded).items())
    batch = collator(evals)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "instruction_mask")}
    with torch.no_grad():
        got = loaded(**inputs).logits
        want = reference["model"](**inputs).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_run, reference, data):
    """A checkpoint written by FSDP ranks is the single-process format: plain Trainer resumes it."""
    tok, train, evals, _, collator = data
    model = W.build_model(tok)
    tr = Trainer(model, W.train_config(os.path.join(fsdp_run, "single-resume")), train, collator)
    tr.train(resume_from=os.path.join(fsdp_run, "joint", "checkpoint-2"))
    assert tr.step == 4
    _close(W.trainable(model), reference["joint"], "FSDP checkpoint resumed by the single-process Trainer")


def test_transformers_trainer_under_ddp(runs, data):
    """The engine users already have: transformers.Trainer (IAPTHFTrainer) wraps IAPTModel in
    DDP by itself under torchrun; the ranks stay identical and the adapter-only checkpoint loads."""
    from iapt_fast import IAPTModel
    from test_distributed_worker import make_llama_for

    out = os.path.join(runs, "hf")
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["wrapper"] == "DistributedDataParallel"
    assert results["rank_spread"] == 0.0 and math.isfinite(results["loss"])
    params = torch.load(os.path.join(out, "params.pt"))
    start = W.trainable(W.build_model(data[0]))
    assert all(not torch.equal(params[k], start[k]) for k in start)  # every generator tensor trained
    loaded = IAPTModel.from_pretrained(make_llama_for(data[0]), os.path.join(out, "checkpoint-3"))
    assert all(torch.equal(a, params[k]) for k, a in W.trainable(loaded).items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_under_torchrun_and_accelerate_matches_one_process(tmp_path):
    """The CLI, unchanged: `torchrun --nproc_per_node 2 -m iapt_fast.train` (DDP) completes and
    its adapter and gathered evaluation equal the single-process CLI's; `accelerate launch
    --use_fsdp` (FSDP picked from accelerate's environment, activation checkpointing on)
    resumes the DDP run's checkpoint and ends where the single process does."""
    from train_fixtures import save_tiny_model, sentiment_rows, write_jsonl

    from iapt_fast.model.adapter_io import read_adapter
    from iapt_fast.train import main

    model_dir = save_tiny_model(tmp_path / "model")
    data_file = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(30, seed=5))
    common = ["--model", model_dir, "--train-file", data_file, "--prompt-template", "Review: {text}\\nSentiment:",
              "--response-template", " {label}", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "2",
              "--lr", "1e-2", "--warmup-steps", "0", "--eval-fraction", "0.3", "--eval-batch-size", "4",
              "--save-every", "2", "--bottleneck-dim", "8", "--no-progress", "--seed", "3"]
    proc, _ = _torchrun(["-m", "iapt_fast.train", *common, "--output-dir", str(tmp_path / "dist")], timeout=240)
    _check(proc)
    assert main([*common, "--output-dir", str(tmp_path / "single"), "--distributed", "none"]) == 0

    dist_metrics = json.load(open(tmp_path / "dist" / "metrics.json"))
    single_metrics = json.load(open(tmp_path / "single" / "metrics.json"))
    assert dist_metrics["world_size"] == 2 and dist_metrics["distributed"] == "ddp"
    assert dist_metrics["steps"] == 3
    for key in ("eval_loss", "eval_accuracy", "final_train_loss"):
        assert dist_metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key
    _, got = read_adapter(tmp_path / "dist", 32, 2)
    _, want = read_adapter(tmp_path / "single", 32, 2)
    _close(got, want, "CLI adapter, 2 ranks vs 1")
    assert (tmp_path / "dist" / "checkpoint-2" / "trainer_state.pt").is_file()
    assert proc.stdout.count('"steps": 3') == 1  # metrics printed by rank 0 only

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "iapt_fast.train", *common,
           "--output-dir", str(tmp_path / "fsdp"), "--gradient-checkpointing",
           "--resume", str(tmp_path / "dist" / "checkpoint-2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    _check(proc)
    fsdp_metrics = json.load(open(tmp_path / "fsdp" / "metrics.json"))
    assert fsdp_metrics["distributed"] == "fsdp" and fsdp_metrics["steps"] == 3
    assert fsdp_metrics["eval_loss"] == pytest.approx(single_metrics["eval_loss"], rel=1e-5)
    _, got = read_adapter(tmp_path / "fsdp", 32, 2)
    _close(got, want, "CLI adapter, FSDP resumed from a DDP checkpoint vs 1 process")


# ------------------------------------------------------------------ failures: fast, clear, no hang
def test_rank_crash_ends_the_job(tmp_path):
    proc, elapsed = _torchrun([WORKER, "crash", str(tmp_path)], timeout=120)
    assert proc.returncode != 0
    assert "rank 1 crashed on purpose" in proc.stdout + proc.stderr
    assert elapsed < 90


def test_hung_rank_fails_after_the_timeout(tmp_path):
    """Rank 1 stops answering: rank 0's collective fails after the configured 3 s, not never."""
    proc, elapsed = _torchrun([WORKER, "hang", str(tmp_path)], timeout=120, extra_env={"IAPT_TEST_TIMEOUT": "3"})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 0: collective failed after" in out, out[-3000:]
    waited = float(out.split("rank 0: collective failed after ")[1].split(" s")[0])
    assert 2.5 <= waited < 30
    assert elapsed < 90


def test_missing_rendezvous_is_a_clear_error(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 could not complete the rendezvous .* within 2 s"):
        init_distributed("ddp", timeout_s=2, device="cpu")
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("env, requested, message", [
    ({}, "ddp", "needs a launcher"),
    ({}, "fsdp", "needs a launcher"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "auto", "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "none",
     "launcher started 2 processes"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "auto",
     "inconsistent"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "auto",
     "not an integer"),
])
def test_bad_launch_is_a_clear_error(env, requested, message):
    with pytest.raises(RuntimeError, match=message):
        resolve_strategy(requested, env)


def test_strategy_resolution():
    launched = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert resolve_strategy("auto", {}) == "none"
    assert resolve_strategy("auto", launched) == "ddp"
    assert resolve_strategy("auto", {**launched, "ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert resolve_strategy("fsdp", launched) == "fsdp"
    with pytest.raises(ValueError, match="distributed strategy"):
        resolve_strategy("zero3", {})
    for bad in (0, -1.0, float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout_s"):
            init_distributed("none", timeout_s=bad, env={})
    with pytest.raises(ValueError, match="device"):
        init_distributed("none", device="tpu", env={})


def test_batch_not_divisible_by_world_size(data, tmp_path):
    tok, train, _, _, collator = data
    ctx = DistContext("ddp", rank=0, world_size=3)
    with pytest.raises(ValueError, match="batch_size 4 .* not divisible by the world size 3"):
        Trainer(W.build_model(tok), W.train_config(str(tmp_path)), train, collator, ctx=ctx)
    with pytest.raises(ValueError, match="call prepare_model"):
        Trainer(W.build_model(tok), W.train_config(str(tmp_path)), train, collator,
                ctx=DistContext("fsdp", rank=0, world_size=2))


@pytest.mark.parametrize("n, world", [(17, 2), (5, 4), (3, 4), (1, 2), (12, 3)])
def test_shards_partition_every_batch(n, world):
    """The ranks' shares of each global batch are disjoint, cover it, and keep its order."""
    examples = [{"input_ids": [i + 3], "labels": [i + 3]} for i in range(n)]

    def collate(rows):
        return {"ids": [r["input_ids"][0] for r in rows], "labels": torch.tensor([r["labels"] for r in rows])}

    single = BatchStream(examples, 4, collate, seed=7)
    ranks = [ShardedBatchStream(examples, 4, collate, seed=7, rank=r, world_size=world) for r in range(world)]
    for _ in range(2 * n):
        want = single.next_batch()["ids"]
        got, padding = [], 0
        for stream in ranks:
            b = stream.next_batch()
            if (b["labels"] == -100).all():
                padding += 1
            else:
                got += b["ids"]
        assert got == want
        assert padding == max(0, world - len(want))
        assert {s.state_dict()["pos"] for s in ranks} == {single.state_dict()["pos"]}
    sizes = [shard_rows(n, r, world).stop - shard_rows(n, r, world).start for r in range(world)]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
