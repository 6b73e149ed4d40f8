"""The response loss of IAPT's start (no training) against the frozen model, for anchors from T × BOS,
T × <|endoftext|>, the task's init text, T × "." and T × EOS: 48 training examples per task.

Run from the checkout's root: PYTHONPATH=benchmarks python benchmarks/results/quality-2026-12-07/start_loss.py caps,spell,region_record
"""
import os, sys, torch

from transformers import AutoTokenizer, AutoModelForCausalLM
from quality_tasks import find_task
from quality_tasks_generative import load_generative
from iapt_fast import IAPTConfig, get_iapt_model
from iapt_fast.training.data import IAPTCollator, tokenize_records
torch.set_num_threads(1)
P = os.path.expanduser("~/.cache/iapt_fast/SmolLM2-135M-Instruct")
tok = AutoTokenizer.from_pretrained(P)
def base():
    m = AutoModelForCausalLM.from_pretrained(P, dtype=torch.float32); m.eval(); return m
for tname in sys.argv[1].split(","):
    task = find_task(tname)
    sp = load_generative(task, 200, 50, 0)
    pairs = [(task.prompt.format(text=t), lab) for t, lab in sp["train"][:48]]
    ex = tokenize_records(tok, pairs, 128, add_eos=True)
    col = IAPTCollator.from_tokenizer(tok)
    batches = [col(ex[i:i+16]) for i in range(0, 48, 16)]
    def loss(m, iapt):
        tot = 0
        with torch.no_grad():
            for b in batches:
                kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                if iapt: kw["instruction_mask"] = b["instruction_mask"]
                tot += m(**kw).loss.item()
        return tot / len(batches)
    print(tname, "frozen", round(loss(base(), False), 3), flush=True)
    for label, cfg in [("bos", IAPTConfig()),
                       ("endoftext", None),
                       ("text_init", IAPTConfig(anchor_init="text", prompt_init_text=task.init_text)),
                       ("dot", IAPTConfig(anchor_init="text", prompt_init_text=".")),
                       ("eos", None),
                       ]:
        if cfg is None:
            tokid = 0 if label == "endoftext" else 2
            cfg = IAPTConfig(anchor_init="text", prompt_init_text=tok.convert_ids_to_tokens(tokid))
        m = get_iapt_model(base(), cfg, seed=0, tokenizer=tok); m.eval()
        print(tname, label, round(loss(m, True), 3), flush=True)
