"""IAPTModel inside ``transformers.Trainer``.

IAPTModel trains under a plain ``transformers.Trainer`` as is (its forward takes ``labels``,
``**kwargs`` and returns the wrapped model's output with ``.loss``). What the plain Trainer
gets wrong is saving: for a model that is not a PreTrainedModel it writes the whole state
dict — the frozen backbone included, and it fails on tied embeddings. ``IAPTHFTrainer``
saves and reloads the adapter only (``adapter_config.json`` + ``adapter_model.safetensors``),
so checkpoints are small and ``resume_from_checkpoint`` works.

    from iapt_fast.training.hf_trainer import IAPTHFTrainer
    trainer = IAPTHFTrainer(model=iapt_model, args=TrainingArguments(..., remove_unused_columns=False),
                            train_dataset=tokenized, data_collator=IAPTCollator.from_tokenizer(tok))

``remove_unused_columns=False`` keeps the ``instruction_mask`` column (the Trainer drops
columns it cannot see in the forward signature only when it can inspect them; be explicit).
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer

from iapt_fast.model.adapter_io import WEIGHTS_NAME, read_adapter
from iapt_fast.model.iapt_model import IAPTModel
from iapt_fast.training.bilevel import is_pool_parameter
from iapt_fast.training.train_config import DEFAULT_POOL_LR_SCALE

__all__ = ["IAPTAdapterSaving", "IAPTHFTrainer", "IAPTPoolingLR", "load_adapter_weights_"]


def load_adapter_weights_(model: IAPTModel, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Copy a saved adapter's tensors into ``model``'s adapter in place (same config required)."""
    name = adapter_name or model.active_adapter
    arch_d, arch_l = model.generators.hidden_size, model.generators.num_layers
    config, tensors = read_adapter(path, arch_d, arch_l)
    adapter = model.generators[name]
    # Buffers too: the anchored form's fixed scale is saved next to the trained tensors.
    ours = {f"layers.{n}": p for n, p in (*adapter.layers.named_parameters(), *adapter.layers.named_buffers())}
    if set(ours) != set(tensors):
        raise ValueError(f"adapter in {os.fspath(path)!r} does not match adapter {name!r}: "
                         f"tensors {sorted(set(tensors) ^ set(ours))[:4]} differ")
    with torch.no_grad():
        for key, param in ours.items():
            if param.shape != tensors[key].shape:
                raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} != {tuple(param.shape)}")
            param.copy_(tensors[key])


class IAPTAdapterSaving:
    """Mixin for ``transformers.Trainer`` subclasses (this one, TRL's): checkpoints and
    ``save_model`` write the IAPT adapter in the project's format, and resume reads it back.

    ``_iapt_model()`` finds the IAPTModel; a trainer that hands its Trainer another module
    around it (iapt_fast/training/trl.py) overrides it.
    """

    def _iapt_model(self) -> IAPTModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, IAPTModel):
            raise TypeError(f"{type(self).__name__} trains an IAPTModel, got {type(model).__name__}")
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._iapt_model().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            raise ValueError(f"no IAPT adapter ({WEIGHTS_NAME}) in {resume_from_checkpoint!r}")
        # The Trainer may pass its own (wrapped) model; the adapter lives in the IAPTModel either way.
        load_adapter_weights_(model if isinstance(model, IAPTModel) else self._iapt_model(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, WEIGHTS_NAME)):
            load_adapter_weights_(self._iapt_model(), best)


class IAPTPoolingLR:
    """Mixin for ``transformers.Trainer`` subclasses: the pooling weights W_pool train at the
    Trainer's learning rate × ``pool_lr_scale``, as with ``iapt-train`` (``TrainConfig.pool_lr_scale``;
    the library's default 3; set the attribute to 1 to train them at the LR). An optimizer the caller
    passes in (``optimizers=``) is left as it is.
    """

    pool_lr_scale: float = DEFAULT_POOL_LR_SCALE

    def create_optimizer(self, *args, **kwargs):
        given = self.optimizer is not None
        optimizer = super().create_optimizer(*args, **kwargs)
        if given or self.pool_lr_scale == 1:
            return optimizer
        pools = {id(p) for name, p in self._iapt_model().named_parameters() if is_pool_parameter(name)}
        # Before the first step the optimizer holds no state, so its groups can still be split.
        for group in list(optimizer.param_groups):
            mine = [p for p in group["params"] if id(p) in pools]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in pools]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                                           "lr": group["lr"] * self.pool_lr_scale})
        return optimizer


class IAPTHFTrainer(IAPTPoolingLR, IAPTAdapterSaving, Trainer):
    """``transformers.Trainer`` that saves/loads the IAPT adapter instead of the whole model."""
