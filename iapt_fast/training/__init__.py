"""Training IAPT adapters (and any PEFT-style model) on instruction → response data.

    trainer.py       the one Trainer (joint or bi-level; one process or DDP/FSDP2)
    train_config.py  TrainConfig (its fields are the CLI's training options)
    accumulation.py  the micro-batches of one step: forward, loss, backward, gradient sync
    trainer_checkpoints.py  what a checkpoint holds; saving, pruning and exact resume, as
                     functions of the run's explicit state (RunState in, RunState out)
    preemption.py    SIGTERM / SIGINT: finish the step, checkpoint, stop
    batches.py       the resumable batch stream
    checkpoints.py   run ownership of output folders, resumable checkpoints, resume checks
    fingerprint.py   what decides a run's batches, digested: a resume must match it
    data.py          loading, formatting, tokenizing and collating examples
    evaluation.py    response loss and choice accuracy
    bilevel.py       the paper's split of the parameters (rational coefficients vs the rest)
    dist_context.py  the job and its collectives (identities for one process)
    parallel.py      FSDP2 / DDP placement; whole tensors in and out of shards
    sharded.py       each rank's share of the data; sharded evaluation
    distributed.py   the front of the three above
    hf_trainer.py    IAPTModel inside transformers.Trainer
    trl.py           IAPTModel inside TRL's SFTTrainer (imports trl; import it yourself)

The command line is ``iapt-train`` / ``python -m iapt_fast.train``.
"""
