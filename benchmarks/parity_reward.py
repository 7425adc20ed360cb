"""The reward of ``vs_trl.py --parity``, imported by path by both sides.

fedgspo gets it as ``task.reward_funcs=[{name: parity_reward:answer_words}]`` (this folder on
``PYTHONPATH``); TRL gets the function object. TRL's signature: completions are strings for
text prompts and ``[{"role": "assistant", "content": text}]`` for chat prompts; the data set's
``answer`` column comes as a keyword argument.
"""

from __future__ import annotations

from typing import Any


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def answer_words(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """Fraction of the completion's words equal to the row's answer (0 for an empty one):
    a graded target a tiny model learns in a few hundred steps, first by saying digits that
    are often right, then by reading the prompt."""
    scores = []
    for completion, target in zip(completions, answer):
        words = _text(completion).split()
        scores.append(sum(w == target for w in words) / len(words) if words else 0.0)
    return scores
