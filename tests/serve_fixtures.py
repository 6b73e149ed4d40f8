"""A tiny served backbone and its adapters on disk, for the vLLM serving tests (no hub)."""
from __future__ import annotations

import os

import torch

VOCAB = 448  # the test tokenizer's ~420 ids, rounded up as real vocabularies are
# (hidden size, attention heads): vLLM's CPU attention takes head sizes 32, 64, 80, ...
HIDDEN, HEADS = 128, 4


def make_backbone(directory: str, seed: int = 0, family: str = "llama"):
    """A random 2-layer causal LM of ``family`` (float32) and the test tokenizer (with a chat
    template) saved in ``directory``; returns the model."""
    import transformers as tf

    from train_fixtures import make_tokenizer

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                  initializer_range=0.2, torch_dtype="float32")
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[family]
    if family == "qwen3":
        common["head_dim"] = HIDDEN // HEADS
    model = model_cls(config_cls(**common)).eval()
    model.save_pretrained(directory)
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(directory)
    return model


def make_adapters(model, directory: str) -> dict[str, str]:
    """Four adapters in three shape groups saved under ``directory``: a, b (anchored, normed
    pooling), c (the paper's form, raw pooling), wide (bottleneck 12, T = 6). Weights are scaled up
    from their initialisation so that each adapter changes the greedy tokens. Returns name → folder."""
    from iapt_fast import IAPTConfig

    configs = {
        "a": IAPTConfig(bottleneck_dim=8, init_std_up=0.5),
        "b": IAPTConfig(bottleneck_dim=8, init_std_up=0.5),
        "c": IAPTConfig.paper(bottleneck_dim=8, init_std_up=0.5, rational_init="tanh"),
        "wide": IAPTConfig(bottleneck_dim=12, num_soft_tokens=6, init_std_up=0.5),
    }
    return save_adapters(model, directory, configs, perturb_seed=7)


def save_adapters(model, directory: str, configs: dict, perturb_seed: int | None = None) -> dict[str, str]:
    """Adapters of ``configs`` (name → IAPTConfig, seeded by their order) on ``model``, saved under
    ``directory``; with ``perturb_seed`` every weight first moves by noise of its own mean size.
    The model is left unwrapped. Returns name → folder."""
    from iapt_fast import get_iapt_model

    wrapped = None
    for seed, (name, config) in enumerate(configs.items()):
        if wrapped is None:
            wrapped = get_iapt_model(model, config, adapter_name=name, seed=seed, backend="torch")
        else:
            wrapped.add_adapter(name, config, seed=seed)
    if perturb_seed is not None:
        gen = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for name in configs:
                for param in wrapped.generators[name].parameters():
                    param.add_(torch.randn(param.shape, generator=gen) * param.detach().abs().mean())
    paths = {}
    for name in configs:
        paths[name] = os.path.join(directory, name)
        wrapped.save_pretrained(paths[name], adapter_name=name)
    wrapped.remove_hooks()
    return paths


def reference_tokens(model, paths: dict[str, str], prompts: list[list[int]], names: list[str | None],
                     max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of ``IAPTModel.generate`` on the saved adapters, one prompt at a time."""
    from iapt_fast import IAPTModel

    wrapped = IAPTModel(model, None, backend="torch")
    for name, path in paths.items():
        wrapped.load_adapter(path, name)
    out = []
    try:
        for ids, name in zip(prompts, names):
            x = torch.tensor([ids])
            kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=0)
            if name is None:
                tokens = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
            else:
                tokens = wrapped.generate(x, attention_mask=torch.ones_like(x), adapter_names=[name], **kwargs)
            out.append(tokens[0, len(ids):].tolist())
    finally:
        wrapped.remove_hooks()
    return out


def reference_prompt_logprobs(model, paths: dict[str, str], prompt: list[int], name: str | None) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i = 1.. under ``IAPTModel`` with adapter ``name`` (the
    whole prompt is the instruction), or the bare backbone for None."""
    from iapt_fast import IAPTModel

    wrapped = IAPTModel(model, None, backend="torch")
    for adapter, path in paths.items():
        wrapped.load_adapter(path, adapter)
    try:
        x = torch.tensor([prompt])
        with torch.no_grad():
            logits = (model(x) if name is None else wrapped(x, attention_mask=torch.ones_like(x),
                                                            adapter_names=[name])).logits[0].double()
    finally:
        wrapped.remove_hooks()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, x[0, 1:, None]).flatten().tolist()
