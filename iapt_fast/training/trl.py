"""IAPTModel inside TRL's ``SFTTrainer`` (trl is optional: only this module imports it).

    from iapt_fast.training.trl import IAPTSFTTrainer
    trainer = IAPTSFTTrainer(model=get_iapt_model(base, cfg), args=SFTConfig(...),
                             train_dataset=<prompt/completion rows>, processing_class=tok)
    trainer.train(); trainer.save_model()      # adapter_config.json + adapter_model.safetensors

What the plain ``SFTTrainer`` cannot do with an IAPTModel, and what this module adds:

* **The fused LM head.** TRL replaces the model's ``forward`` by one that runs
  ``model.base_model`` (expected: the transformer body, returning ``last_hidden_state``) and
  projects through ``model.get_output_embeddings()`` itself. ``IAPTModel.base_model`` is the
  wrapped causal LM, so the trainer gets :class:`FusedHeadModel`, a module around the
  IAPTModel whose ``base_model`` is :meth:`IAPTModel.forward_body` (the same IAPT call as
  ``forward``). TRL patches that module's ``forward``; the IAPTModel stays untouched.
* **The instruction mask.** The fused head keeps the labels to itself, so the generators
  could not tell prompt from answer. :class:`InstructionMaskCollator` adds an
  ``instruction_mask`` column to every batch — each row's tokens before its first supervised
  token, read from an ``instruction_mask`` column, else TRL's ``completion_mask`` /
  ``assistant_masks``, else the labels — and TRL passes it on to the body as a keyword.
  The body refuses a batch without it rather than pool over the answer.
* **Saving.** ``save_model`` and checkpoints write the adapter only, in the project's format
  (:class:`~iapt_fast.training.hf_trainer.IAPTAdapterSaving`); ``resume_from_checkpoint``
  reads it back.
* **Activation checkpointing** (TRL turns it on by default) must be non-reentrant, the
  default of transformers 5; ``use_reentrant=True`` is refused when the trainer is built.

Packing and padding-free batches are refused: the generators pool each row's instruction,
and a packed row holds several.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPast
from trl import SFTConfig, SFTTrainer

from iapt_fast.model.iapt_model import IAPTModel
from iapt_fast.training.hf_trainer import IAPTAdapterSaving, IAPTPoolingLR

__all__ = ["FusedHeadModel", "IAPTSFTTrainer", "InstructionMaskCollator", "instruction_mask_from_rows",
           "MASK_COLUMNS"]

# Dataset columns the collator reads the instruction from, in order of precedence; the
# trainer keeps them through ``remove_unused_columns``.
MASK_COLUMNS = ("instruction_mask", "completion_mask", "assistant_masks")


class FusedHeadModel(nn.Module):
    """An IAPTModel under the attribute names TRL's fused LM head looks up.

    ``forward`` is the IAPTModel's; ``base_model`` is the body call (:meth:`body`), which needs
    the batch's ``instruction_mask``; ``get_output_embeddings`` is the backbone's LM head;
    anything else is the IAPTModel's (config, generation_config, activation checkpointing ...).
    """

    def __init__(self, model: IAPTModel) -> None:
        super().__init__()
        if not isinstance(model, IAPTModel):
            raise TypeError(f"model must be an IAPTModel (get_iapt_model(...)), got {type(model).__name__}")
        self.iapt_model = model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "iapt_model" or "iapt_model" not in self._modules:
                raise
            return getattr(self._modules["iapt_model"], name)

    @property
    def base_model(self) -> Callable[..., BaseModelOutputWithPast]:
        """What TRL's fused head calls as the transformer body."""
        return self.body

    def body(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
             instruction_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """:meth:`IAPTModel.forward_body` with the batch's ``instruction_mask`` [B, N] required:
        the fused head passes no labels, so without the mask the generators would pool over
        the answer they are trained to predict."""
        if instruction_mask is None:
            raise ValueError("the batch has no instruction_mask column, so the generators would pool over the "
                             "completion: build the trainer with IAPTSFTTrainer (its collator adds the column), "
                             "or give your data_collator's batches an instruction_mask [B, N]")
        return self.iapt_model.forward_body(input_ids=input_ids, attention_mask=attention_mask,
                                            instruction_mask=instruction_mask, **kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self.iapt_model.base_model.get_output_embeddings()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                instruction_mask: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any):
        """:meth:`IAPTModel.forward` (logits and the wrapped model's loss)."""
        return self.iapt_model(input_ids=input_ids, attention_mask=attention_mask,
                               instruction_mask=instruction_mask, labels=labels, **kwargs)


def _truncated(values: Sequence[int], length: int, truncation_mode: str, column: str) -> list[int]:
    """A row's mask column cut to its ``length`` tokens as TRL cut ``input_ids`` (TRL truncates
    only ``input_ids`` and ``labels``)."""
    values = list(values)
    if len(values) < length:
        raise ValueError(f"column {column!r} has {len(values)} entries but the row has {length} tokens")
    return values[:length] if truncation_mode == "keep_start" else values[len(values) - length:]


def instruction_mask_from_rows(examples: Sequence[dict[str, Any]], batch: dict[str, Tensor],
                               truncation_mode: str = "keep_start") -> Tensor:
    """[B, N] instruction mask of a right-padded batch built from ``examples``.

    Per row, from the first column present: ``instruction_mask`` (as is); ``completion_mask``
    or ``assistant_masks`` (1 = supervised); the example's ``labels`` (−100 = not supervised),
    else the batch's. The instruction is the row's tokens before its first supervised one
    (the whole row when none is). Masks longer than the row are cut as TRL cut the row
    (``truncation_mode``).
    """
    ids, attention = batch.get("input_ids"), batch.get("attention_mask")
    if not isinstance(ids, Tensor) or not isinstance(attention, Tensor):
        raise ValueError("the batch needs input_ids and attention_mask [B, N] (padding-free or packed batches "
                         "cannot carry one instruction per row)")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
    if len(examples) != ids.shape[0]:
        raise ValueError(f"{len(examples)} examples for a batch of {ids.shape[0]} rows")
    length = ids.shape[1]
    explicit = torch.zeros(ids.shape, dtype=torch.bool)
    supervised = torch.zeros(ids.shape, dtype=torch.bool)
    given = torch.zeros(ids.shape[0], dtype=torch.bool)
    for row, example in enumerate(examples):
        if example.get("input_ids") is None:
            raise ValueError(f"example {row} has no input_ids: the instruction is read from tokenized text rows "
                             "(TRL's dataset preparation makes them; vision datasets are not supported)")
        n = len(example["input_ids"])
        if n > length or int(attention[row].sum()) != n or not bool(attention[row, :n].all()):
            raise ValueError(f"row {row}: expected its {n} tokens first, then right padding (IAPT pools each "
                             "row's own instruction; padding-free and packed batches are not supported)")
        column = next((c for c in MASK_COLUMNS if example.get(c) is not None), None)
        if column == "instruction_mask":
            explicit[row, :n] = torch.tensor(_truncated(example[column], n, truncation_mode, column)).bool()
            given[row] = True
        elif column is not None:
            supervised[row, :n] = torch.tensor(_truncated(example[column], n, truncation_mode, column)).bool()
        elif example.get("labels") is not None:
            supervised[row, :n] = torch.tensor(list(example["labels"])[:n]).ne(-100)
        elif "labels" in batch:
            supervised[row] = batch["labels"][row].cpu().ne(-100)
    real = attention.cpu().bool()
    supervised &= real
    before = supervised.long().cumsum(-1).eq(0) & real
    derived = torch.where(supervised.any(-1, keepdim=True), before, real)
    mask = torch.where(given[:, None], explicit & real, derived)
    empty = ~mask.any(-1)
    if empty.any():
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"rows {rows} have no instruction (supervised from their first token, or an all-zero "
                         "instruction_mask): train on prompt/completion rows, on conversations with "
                         "assistant_only_loss=True, or give the dataset an instruction_mask column")
    return mask.long().to(attention.device)


@dataclass
class InstructionMaskCollator:
    """Wraps a collator (TRL's by default) and adds ``instruction_mask`` [B, N] to each batch
    (:func:`instruction_mask_from_rows`); a batch that already has one is left as is."""

    inner: Callable[[list[dict[str, Any]]], dict[str, Any]]
    truncation_mode: str = "keep_start"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # TRL's collator reads only the columns it knows; the mask columns pass by it.
        batch = self.inner(examples)
        if batch.get("instruction_mask") is None:
            batch["instruction_mask"] = instruction_mask_from_rows(examples, batch, self.truncation_mode)
        return batch


class IAPTSFTTrainer(IAPTPoolingLR, IAPTAdapterSaving, SFTTrainer):
    """TRL's ``SFTTrainer`` training an IAPT adapter (see the module's docstring).

    Args:
        model: the IAPTModel to train (its active adapter trains, the backbone stays frozen).
        args: an ``SFTConfig`` (default: ``SFTConfig()``); ``packing`` / ``padding_free`` are
            refused, activation checkpointing must be non-reentrant.
        data_collator: default TRL's; either way wrapped in :class:`InstructionMaskCollator`.
        **kwargs: as ``SFTTrainer`` takes them (``train_dataset``, ``processing_class`` ...),
            except ``peft_config``.

    ``trainer.model`` is the :class:`FusedHeadModel` TRL trains; ``trainer.iapt_model`` is the
    IAPTModel.
    """

    def __init__(self, model: IAPTModel, args: SFTConfig | None = None, data_collator: Callable | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(model, IAPTModel):
            raise TypeError(f"model must be an IAPTModel (get_iapt_model(...)), got {type(model).__name__}")
        if kwargs.get("peft_config") is not None:
            raise ValueError("peft_config: the IAPT adapter is what trains; pass the IAPTModel without a PEFT config")
        args = SFTConfig() if args is None else args
        if not isinstance(args, SFTConfig):
            raise TypeError(f"args must be an SFTConfig, got {type(args).__name__}")
        for name in ("packing", "padding_free"):
            if getattr(args, name):
                raise ValueError(f"args.{name}=True is not supported: the generators pool each row's instruction, "
                                 "and a packed row holds several; leave it False")
        checkpointing = args.activation_checkpointing or args.gradient_checkpointing
        ckpt_kwargs = args.activation_checkpointing_kwargs or args.gradient_checkpointing_kwargs or {}
        if checkpointing and ckpt_kwargs.get("use_reentrant"):
            raise ValueError("args.gradient_checkpointing_kwargs: IAPT needs non-reentrant activation checkpointing "
                             "(the prefix reaches each layer as a keyword argument); drop use_reentrant=True "
                             "(transformers 5 defaults to False) or set gradient_checkpointing=False")
        super().__init__(model=FusedHeadModel(model), args=args, data_collator=data_collator, **kwargs)
        self.data_collator = InstructionMaskCollator(self.data_collator, args.truncation_mode)

    @property
    def iapt_model(self) -> IAPTModel:
        """The IAPTModel being trained."""
        return self._iapt_model()

    def _iapt_model(self) -> IAPTModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, FusedHeadModel):
            raise TypeError(f"IAPTSFTTrainer trains a FusedHeadModel, got {type(model).__name__}")
        return model.iapt_model

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns would drop the columns the instruction mask is read from.
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns,
                                   *(c for c in MASK_COLUMNS if c not in self._signature_columns)]
