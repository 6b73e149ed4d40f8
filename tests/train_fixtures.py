"""Offline building blocks for the training tests: a tiny BPE tokenizer and a tiny Llama.

Nothing comes from a hub: the tokenizer is trained on the fly on a few sentences, the model
is random. Both are small enough that a training step takes milliseconds on one core.
"""
from __future__ import annotations

import json
import os
import random
import types

import torch
from torch import nn

from iapt_fast import IAPTConfig, prompt_generator
from iapt_fast.generator.bank import AdapterGenerators

WORDS = ("good bad great awful fine movie film plot actor scene story review loved hated boring "
         "fun dull bright dark long short the a and but was is it this that very not").split()
LABELS = ("positive", "negative")


def make_tokenizer(add_bos: bool = True):
    """A byte-level BPE tokenizer (vocab ~420) with <s>, </s>, <pad>; BOS added when asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    corpus += [f"Review: {c}\nSentiment: {l}" for c, l in zip(corpus[:50], LABELS * 25)]
    tok.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    """A random Llama with d=32, 2 layers: milliseconds per step.

    initializer_range 0.2, not 0.02: with 0.02 every projection shrinks the prefix's effect and
    a short training test could not move the loss (as in tests/slow_reference.py).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Toy classification rows: the label is decided by the first word, so it is learnable."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        first = "good" if label == "positive" else "bad"
        rows.append({"text": first + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))),
                     "label": label})
    return rows


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return os.fspath(path)


def save_tiny_model(directory: str | os.PathLike, seed: int = 0) -> str:
    """Tiny Llama + tokenizer saved as a local checkpoint folder (what the CLI loads)."""
    tok = make_tokenizer()
    model = make_llama(len(tok), seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return os.fspath(directory)


# A toy model for trainer mechanics: a frozen embedding, one real IAPT generator (the library's
# parameter names and math) whose soft tokens shift every position's state, a frozen tied read-out.
class ToyIAPT(nn.Module):
    def __init__(self, vocab: int, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d).requires_grad_(False)
        start = {0: torch.randn(2, d)}  # the anchored form: a trainable anchor next to the weights
        self.gens = AdapterGenerators(IAPTConfig(num_soft_tokens=2, bottleneck_dim=8, init_std_up=0.5), d, 1, seed=seed,
                                      anchors=start)

    def forward(self, input_ids, attention_mask, instruction_mask):
        h = self.embed(input_ids)
        p = prompt_generator(h, instruction_mask, **self.gens[0].weights())
        return types.SimpleNamespace(logits=(h + p.mean(1, keepdim=True)) @ self.embed.weight.T)


def initial_lrs_by_kind(optimizer, model) -> dict[str, set[float]]:
    """{"w_pool": the starting LRs of the groups holding pooling weights, "other": of the rest}."""
    kind = {id(p): ("w_pool" if name.endswith(".w_pool") else "other") for name, p in model.named_parameters()}
    out: dict[str, set[float]] = {"w_pool": set(), "other": set()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[kind[id(p)]].add(group.get("initial_lr", group["lr"]))
    return out
