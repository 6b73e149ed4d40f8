"""Worker processes of tests/test_distributed.py, started by ``torchrun`` (no tests in here).

    torchrun --nproc_per_node 2 tests/test_distributed_worker.py MODE OUT_DIR

MODE: train (under DDP, then FSDP in the same job: train, evaluate, checkpoint, resume, save
the adapter; rank 0 writes the results to OUT_DIR/ddp and OUT_DIR/fsdp), crash (rank 1 raises mid-job), hang (rank 1 stops answering; the
others must fail after the configured timeout). The builders below are shared with the
test, which trains the same model on the same data in one process as the reference.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

TIMEOUT_S = 60.0  # generous for a loaded CI machine; the hang mode overrides it


def build_data(tok):
    """Train/eval/dev examples whose responses differ in length, so ranks hold unequal label
    counts and a per-rank loss normalisation would show."""
    from iapt_fast.training.data import tokenize_records
    from train_fixtures import sentiment_rows  # tests/ is on the path: pytest's, or the script's own folder

    rng = random.Random(0)
    pairs = [(f"Review: {r['text']}\nSentiment:", " " + " ".join([r["label"]] * rng.randint(1, 4)))
             for r in sentiment_rows(33, seed=3)]
    # 17 train examples: with a global batch of 4 the epoch ends on a 1-row batch, so one
    # rank's share is empty and takes the padding path.
    toks = tokenize_records(tok, pairs, max_length=48)
    return toks[:17], toks[17:24], toks[24:33]


def build_tokenizer():
    from train_fixtures import make_tokenizer
    return make_tokenizer()


def make_llama_for(tok):
    """The frozen backbone every run shares (seeded: identical on every rank)."""
    from train_fixtures import make_llama
    return make_llama(len(tok), seed=0)


def build_model(tok):
    from iapt_fast import IAPTConfig, get_iapt_model
    return get_iapt_model(make_llama_for(tok), IAPTConfig(bottleneck_dim=8), seed=1)


def train_config(out: str, bilevel: bool = False, **kw):
    from iapt_fast.training.trainer import TrainConfig

    base = dict(output_dir=out, max_steps=4, batch_size=4, grad_accum=2, eval_batch_size=4, lr=1e-2,
                rational_lr=1e-3 if bilevel else None, warmup_steps=0, max_grad_norm=1.0, bilevel=bilevel,
                save_every=2, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def trainable(model) -> dict:
    from iapt_fast.training.parallel import full_tensor
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_modes(root: str) -> None:
    import dataclasses

    from iapt_fast.training.distributed import init_distributed, shutdown

    ctx = init_distributed("ddp", timeout_s=TIMEOUT_S)
    try:
        # One process group serves both strategies: one launch instead of two.
        _train_one("ddp", os.path.join(root, "ddp"), ctx)
        _train_one("fsdp", os.path.join(root, "fsdp"), dataclasses.replace(ctx, strategy="fsdp"))
        _train_hf(os.path.join(root, "hf"), ctx)
        # Both ranks done with every collective before the group is destroyed: a rank that tears
        # down while gloo still serves the other one can abort at exit (seen once in CI).
        import torch.distributed as dist
        dist.barrier()
    finally:
        shutdown(ctx)


def _train_one(mode: str, out: str, ctx) -> None:
    import torch
    from iapt_fast.training.data import IAPTCollator
    from iapt_fast.training.distributed import prepare_model
    from iapt_fast.training.trainer import Trainer

    tok = build_tokenizer()
    train, evals, dev = build_data(tok)
    collator = IAPTCollator.from_tokenizer(tok)
    results: dict = {"world_size": ctx.world_size, "strategy": ctx.strategy}
    saved: dict = {}
    gc = mode == "fsdp"  # activation checkpointing composed with FSDP

    def run(name: str, bilevel: bool = False, resume: str | None = None, out_name: str | None = None):
        model = prepare_model(build_model(tok), ctx)
        cfg = train_config(os.path.join(out, out_name or name), bilevel=bilevel, gradient_checkpointing=gc)
        tr = Trainer(model, cfg, train, collator, eval_examples=evals, dev_examples=dev if bilevel else None, ctx=ctx)
        tr.train(resume_from=resume)
        return model, tr

    model, tr = run("joint")
    results["joint_eval"] = tr.evaluate()
    results["joint_losses"] = [h["loss"] for h in tr.history if "loss" in h]
    results["joint_grad_norms"] = [h["grad_norm"] for h in tr.history if "grad_norm" in h]
    tr.save_adapter(os.path.join(out, "adapter"))
    tr.save_history()
    saved["joint"] = trainable(model)

    model, tr = run("resumed", resume=os.path.join(out, "joint", "checkpoint-2"))
    saved["resumed"] = trainable(model)

    model, tr = run("bilevel", bilevel=True)
    saved["bilevel"] = trainable(model)
    if ctx.is_main:
        torch.save(saved, os.path.join(out, "params.pt"))
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh)


def _train_hf(out: str, ctx) -> None:
    """transformers.Trainer (IAPTHFTrainer) in the same job: accelerate wraps IAPTModel in DDP."""
    import torch
    import torch.distributed as dist
    from transformers import TrainingArguments

    from iapt_fast.training.data import IAPTCollator
    from iapt_fast.training.hf_trainer import IAPTHFTrainer

    tok = build_tokenizer()
    train, _, _ = build_data(tok)
    model = build_model(tok)
    args = TrainingArguments(output_dir=out, use_cpu=True, per_device_train_batch_size=2, max_steps=3,
                             save_strategy="steps", save_steps=2, report_to=[], remove_unused_columns=False,
                             ddp_backend="gloo", learning_rate=1e-2, logging_steps=1, disable_tqdm=True, seed=0)
    hf = IAPTHFTrainer(model=model, args=args, train_dataset=train, data_collator=IAPTCollator.from_tokenizer(tok))
    result = hf.train()
    flat = torch.cat([v.flatten() for v in trainable(model).values()])
    gathered = [torch.zeros_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, flat)
    if ctx.is_main:
        torch.save(trainable(model), os.path.join(out, "params.pt"))
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump({"wrapper": type(hf.model_wrapped).__name__, "loss": result.training_loss,
                       "rank_spread": max((g - gathered[0]).abs().max().item() for g in gathered)}, fh)


def _failure_modes(mode: str) -> None:
    import torch
    import torch.distributed as dist
    from iapt_fast.training.distributed import init_distributed, shutdown

    timeout = float(os.environ.get("IAPT_TEST_TIMEOUT", TIMEOUT_S))
    ctx = init_distributed("ddp", timeout_s=timeout)
    try:
        dist.barrier()
        if ctx.rank == 1:
            if mode == "crash":
                raise RuntimeError("rank 1 crashed on purpose")
            time.sleep(3 * timeout + 30)  # hang: never reach the collective below
        t0 = time.perf_counter()
        try:
            dist.all_reduce(torch.ones(1))
        except Exception as err:
            print(f"rank {ctx.rank}: collective failed after {time.perf_counter() - t0:.1f} s: "
                  f"{type(err).__name__}: {err}", flush=True)
            raise
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        _train_modes(out)
    else:
        _failure_modes(mode)
