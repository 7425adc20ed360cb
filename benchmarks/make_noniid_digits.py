"""A local model directory and a labelled data set for the robustness matrix on non-IID data.

Writes, under ``--out`` (default ``benchmarks/results/noniid``):

* ``model/``: a randomly initialised 2-layer Llama (hidden 64, as ``configs/default.yaml``) with
  a character-level tokenizer over the digit task's alphabet, saved with ``save_pretrained``
  (nothing is downloaded);
* ``data.jsonl``: ``--rows`` prompts of the three digit tasks mixed (``C3141=`` copy, ``R..``
  reverse, ``S..`` sort), each row ``{prompt, answer, task}``, so that
  ``task.partition=dirichlet task.label_column=task`` gives each rank its own mix of tasks.

Then (the rewards of the digit task read the ``answer`` column)::

    python benchmarks/make_noniid_digits.py
    python benchmarks/robustness.py --nproc 4 --rules default --attacks sign_flip gaussian alie stealth collusion \\
        --set model.path=benchmarks/results/noniid/model task.dataset=benchmarks/results/noniid/data.jsonl \\
              task.partition=dirichlet task.label_column=task --out n4_noniid_s0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from fedgspo.runfiles import write_text_atomic

ALPHABET = list("0123456789CRS=")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :data:`ALPHABET`; decoding joins characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def make_model(tokenizer, seed: int):
    """The default config's policy shape (hidden 64, 2 layers, 4 heads) as a transformers Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def digit_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows of copy / reverse / sort on 2-4 digits, the task letter as the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        task = rng.choice("CRS")
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 4)))
        answer = {"C": digits, "R": digits[::-1], "S": "".join(sorted(digits))}[task]
        rows.append({"prompt": f"{task}{digits}=", "answer": answer, "task": task})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "noniid")
    parser.add_argument("--rows", type=int, default=6000, help="rows of the data set (default 6000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the rows")
    args = parser.parse_args(argv)
    (args.out / "model").mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    make_model(tok, args.seed).save_pretrained(args.out / "model")
    tok.save_pretrained(args.out / "model")
    write_text_atomic(args.out / "data.jsonl", "".join(json.dumps(r) + "\n" for r in digit_rows(args.rows, args.seed)))
    print(f"wrote {args.out / 'model'} and {args.out / 'data.jsonl'} ({args.rows} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
