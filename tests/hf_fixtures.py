"""A tiny transformers model, tokenizer and data set made in code: nothing is downloaded.

``make_model_dir(path)`` saves a word-level tokenizer (with a chat template) and a 2-layer
Llama to ``path`` with ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load them like any local model directory.
``write_jsonl`` writes a data set file; ``arithmetic_rows`` gives chat or plain prompts with
``####``-style answers, for a verifiable reward.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = [str(d) for d in range(10)] + ["+", "=", "####", "what", "is", "answer", "the", "user", "assistant",
                                        ":", "\n"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS`, whitespace-split, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def make_model(tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama sized for ``tokenizer``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def make_model_dir(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer to ``path`` (created); returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    make_model(tok, hidden=hidden, layers=layers, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def arithmetic_rows(n: int, *, chat: bool = True, seed: int = 0) -> list[dict]:
    """``n`` rows ``{prompt, answer, label}``: "what is a + b" with a, b digits; ``answer`` is the
    sum's last digit. Chat rows hold a one-message list, plain rows a string."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        text = f"what is {a} + {b}"
        rows.append({"prompt": [{"role": "user", "content": text}] if chat else text,
                     "answer": str((a + b) % 10), "label": a % 2})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
