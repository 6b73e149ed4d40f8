"""IAPTModel trained by TRL's SFTTrainer (iapt_fast/training/trl.py).

Tiny random Llama and the offline BPE tokenizer of tests/train_fixtures.py; prompt/completion
rows as TRL takes them. TRL's fused LM head runs the body and projects the hidden states
itself, so these tests hold it to IAPTModel's own loss, with the prompt (and only the prompt)
as the instruction.
"""
from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.training.trl import FusedHeadModel, IAPTSFTTrainer, instruction_mask_from_rows
from train_fixtures import initial_lrs_by_kind, make_llama, make_tokenizer, sentiment_rows
from slow_reference import padded_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# A large W_up makes the soft tokens depend strongly on what is pooled, so pooling over the
# completion would change the loss far beyond float error.
CONFIG = dict(num_soft_tokens=2, bottleneck_dim=8, init_std_up=0.5)


def _rows(n: int, seed: int) -> list[dict[str, str]]:
    return [{"prompt": f"Review: {r['text']}\nSentiment:", "completion": " " + r["label"]}
            for r in sentiment_rows(n, seed=seed)]


def _iapt(tok, dtype=torch.float32) -> IAPTModel:
    model = get_iapt_model(make_llama(len(tok), seed=0), IAPTConfig(**CONFIG), seed=0)
    return model.to(dtype)


def _args(out, **kw) -> SFTConfig:
    kw = {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": [],
          "use_cpu": True, "logging_steps": 1, "disable_tqdm": True, "save_strategy": "no", "seed": 0, **kw}
    return SFTConfig(output_dir=str(out), **kw)


def _trainer(model, tok, rows, out, eval_rows=None, **kw) -> IAPTSFTTrainer:
    return IAPTSFTTrainer(model=model, args=_args(out, **kw), train_dataset=Dataset.from_list(rows),
                          eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
                          processing_class=tok)


def _prompt_masks(prepared, tok, rows) -> dict[tuple, int]:
    """Each prepared row's token ids → how many of them the prompt is, from the tokenizer alone."""
    return {tuple(ex["input_ids"]): len(tok(row["prompt"]).input_ids) for ex, row in zip(prepared, rows, strict=True)}


def _expected_instruction(batch, prompt_lengths) -> torch.Tensor:
    mask = torch.zeros_like(batch["input_ids"])
    for row, (ids, real) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        mask[row, :prompt_lengths[tuple(ids[real.bool()].tolist())]] = 1
    return mask


def _batch(trainer: IAPTSFTTrainer) -> dict[str, torch.Tensor]:
    """A batch as training gets it: TRL's dataset preparation, unused-column removal, collator."""
    return dict(next(iter(trainer.get_train_dataloader())))


def _generator_grads(model: IAPTModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ the instruction
@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_instruction_mask_is_the_prompt(tok, tmp_path, completion_only_loss):
    # None: TRL's labels mask the prompt. False: every token is supervised, so the mask must
    # come from TRL's completion_mask column, which the trainer keeps through column removal.
    rows = _rows(12, seed=1)
    trainer = _trainer(_iapt(tok), tok, rows, tmp_path, completion_only_loss=completion_only_loss)
    batch = _batch(trainer)
    expected = _expected_instruction(batch, _prompt_masks(trainer.train_dataset, tok, rows))
    assert torch.equal(batch["instruction_mask"], expected)
    assert ((batch["labels"] != -100) & batch["attention_mask"].bool()).sum() > 0
    if completion_only_loss is False:  # labels say nothing about the prompt here
        assert (batch["labels"][:, 0] != -100).all()


def test_instruction_of_a_conversation_is_before_the_first_assistant_turn(tmp_path):
    tok = make_tokenizer()  # its own: the chat template below must not reach other tests
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                         "{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endif %}{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in _rows(12, seed=6)]
    trainer = IAPTSFTTrainer(model=_iapt(tok), args=_args(tmp_path, assistant_only_loss=True),
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = _batch(trainer)
    # The template renders the user turn as "user: ...\n" (no BOS): that many tokens come first.
    lengths = {tuple(ex["input_ids"]): len(tok(f"user: {row['messages'][0]['content']}\n",
                                               add_special_tokens=False).input_ids)
               for ex, row in zip(trainer.train_dataset, rows, strict=True)}
    assert torch.equal(batch["instruction_mask"], _expected_instruction(batch, lengths))


# ------------------------------------------------------------------------------ the body call
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_forward_body_is_the_hidden_state_forward_projects(family):
    # What TRL's fused head projects must be what the wrapped model's own head projects, in
    # every family (GPT-2's final norm lives elsewhere than Llama's).
    base = tiny_model(family)
    model = get_iapt_model(base, IAPTConfig(**CONFIG), seed=0)
    ids, mask, inst = padded_batch(3, 9, "right", seed=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
        body = model.forward_body(input_ids=ids, attention_mask=mask, instruction_mask=inst)
        projected = base.get_output_embeddings()(body.last_hidden_state)
    assert body.last_hidden_state.shape == (3, 9, base.config.hidden_size) and body.hidden_states is None
    torch.testing.assert_close(projected, logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match="labels"):
        model.forward_body(input_ids=ids, attention_mask=mask, labels=ids)


# ------------------------------------------------------------------------------ fused head = IAPTModel
def test_fused_head_loss_and_grads_equal_iapt_forward(tok, tmp_path):
    rows, eval_rows = _rows(12, seed=2), _rows(4, seed=12)
    model = _iapt(tok)
    # Activation checkpointing on (SFTConfig's default); float32, to compare with the reference.
    trainer = _trainer(model, tok, rows, tmp_path, eval_rows=eval_rows, bf16=False)
    assert trainer.args.gradient_checkpointing
    model.base_model.activation_checkpointing_enable()
    batch = _batch(trainer)
    prompt = _expected_instruction(batch, _prompt_masks(trainer.train_dataset, tok, rows))
    trainer.model.train()

    # The step's loss: TRL's compute_loss through the fused LM head.
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    fused_grads = _generator_grads(model)

    # IAPTModel's own loss with the prompt as the explicit instruction, in float32 and float64
    # (design.md's rule: |fused − ref64| ≤ 2·|ref32 − ref64| + atol, loss and every gradient).
    def reference(m: IAPTModel, instruction: torch.Tensor, rows_batch: dict = batch):
        m.train()
        m.zero_grad()
        out = m(input_ids=rows_batch["input_ids"], attention_mask=rows_batch["attention_mask"],
                instruction_mask=instruction, labels=rows_batch["labels"])
        out.loss.backward()
        return out.loss.detach().double(), _generator_grads(m)

    model.zero_grad()
    ref_pt, grads_pt = reference(model, prompt)
    ref, grads_ref = reference(_iapt(tok, torch.float64), prompt)
    atol = 1e-5
    assert abs(loss.detach().double() - ref) <= 2 * abs(ref_pt - ref) + atol
    for name, grad in fused_grads.items():
        bound = 2 * (grads_pt[name].double() - grads_ref[name]).abs().max() + atol
        assert (grad.double() - grads_ref[name]).abs().max() <= bound, name

    # Had the completion been pooled, the loss would differ by far more than that.
    leaked, _ = reference(model, batch["attention_mask"])
    assert abs(leaked - ref) > 100 * (2 * abs(ref_pt - ref) + atol)

    # Evaluation runs the fused head too, with the same instruction (one batch of the 4 rows).
    evals = dict(next(iter(trainer.get_eval_dataloader())))
    eval_prompt = _expected_instruction(evals, _prompt_masks(trainer.eval_dataset, tok, eval_rows))
    assert torch.equal(evals["instruction_mask"], eval_prompt)
    eval_pt, _ = reference(model, eval_prompt, evals)
    eval_ref, _ = reference(_iapt(tok, torch.float64), eval_prompt, evals)
    eval_loss = trainer.evaluate()["eval_loss"]
    assert abs(eval_loss - eval_ref) <= 2 * abs(eval_pt - eval_ref) + atol


# ------------------------------------------------------------------------------ training and saving
def test_sft_trainer_trains_and_saves_the_adapter(tok, tmp_path):
    rows = _rows(16, seed=3)
    model = _iapt(tok)
    # SFTConfig's defaults otherwise: activation checkpointing, bf16 autocast.
    trainer = _trainer(model, tok, rows, tmp_path / "run", max_steps=8)
    batch = _batch(trainer)
    prompt = _expected_instruction(batch, _prompt_masks(trainer.train_dataset, tok, rows))

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         instruction_mask=prompt, labels=batch["labels"]).loss.item()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = held_loss()
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in model.decoder_layers)  # TRL's default, non-reentrant
    lr = trainer.args.learning_rate  # W_pool at 3× the LR, as iapt-train's default (IAPTPoolingLR)
    lrs = initial_lrs_by_kind(trainer.optimizer, model)
    assert lrs["other"] == {lr} and list(lrs["w_pool"]) == [pytest.approx(3 * lr)]
    assert held_loss() < loss_before
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and all(n.startswith("generators.") for n in changed)  # the backbone stayed frozen

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not any(name.startswith("model") for name in os.listdir(out))  # no backbone weights
    loaded = IAPTModel.from_pretrained(make_llama(len(tok), seed=0), out)
    trained = dict(model.named_parameters())
    loaded_params = dict(loaded.named_parameters())
    assert set(loaded_params) == set(trained)
    for name, param in loaded_params.items():
        assert torch.equal(param, trained[name]), name


def test_resume_from_checkpoint_reads_the_adapter(tok, tmp_path):
    rows = _rows(16, seed=4)
    runs = {}
    for name, resume in (("straight", None), ("resumed", "checkpoint-2")):
        model = _iapt(tok)
        if resume is not None:  # start elsewhere: only the checkpoint can bring it back
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(1.0)
        trainer = _trainer(model, tok, rows, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=None if resume is None else str(tmp_path / "run" / resume))
        runs[name] = model
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    for (n, a), (_, b) in zip(runs["straight"].named_parameters(), runs["resumed"].named_parameters()):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------------------ refusals
def test_refusals_name_the_argument(tok, tmp_path):
    rows = _rows(8, seed=5)
    with pytest.raises(TypeError, match="IAPTModel"):
        IAPTSFTTrainer(model=make_llama(len(tok)), args=_args(tmp_path), train_dataset=Dataset.from_list(rows),
                       processing_class=tok)
    for kw, what in (({"packing": True, "max_length": 32}, "packing"), ({"padding_free": True}, "padding_free"),
                     ({"gradient_checkpointing_kwargs": {"use_reentrant": True}}, "non-reentrant")):
        with pytest.raises(ValueError, match=what):
            _trainer(_iapt(tok), tok, rows, tmp_path, **kw)

    # The body never guesses the instruction: pooling over the whole row would read the answer.
    trainer = _trainer(_iapt(tok), tok, rows, tmp_path)
    assert isinstance(trainer.model, FusedHeadModel)
    batch = _batch(trainer)
    with pytest.raises(ValueError, match="instruction_mask"):
        trainer.model.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    # Plain language-model text is supervised from its first token: no instruction to read.
    text = Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in rows])
    trainer = IAPTSFTTrainer(model=_iapt(tok), args=_args(tmp_path), train_dataset=text, processing_class=tok)
    with pytest.raises(ValueError, match="no instruction"):
        _batch(trainer)


def test_instruction_mask_from_rows_follows_truncation():
    # TRL truncates input_ids and labels only; the mask columns are cut the same way here.
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "labels": torch.tensor([[5, 6, 7, -100], [5, 6, 7, 8]])}
    examples = [{"input_ids": [5, 6, 7], "completion_mask": [0, 0, 1, 1]},
                {"input_ids": [5, 6, 7, 8], "instruction_mask": [0, 1, 1, 0, 0]}]
    start = instruction_mask_from_rows(examples, batch, "keep_start")
    assert start.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    end = instruction_mask_from_rows(examples, batch, "keep_end")
    assert end.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="right padding"):
        left = {**batch, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
        instruction_mask_from_rows(examples, left)
