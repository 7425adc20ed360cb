"""The embedded synthetic task: transform a digit string, verifiable with partial credit.

``copy``, ``reverse`` or ``sort`` a string of ``min_digits..max_digits`` digits. A prompt reads
``"R3141="`` (task letter, digits, ``=``), the answer ``"1413"``. Prompts are a pure function of
``(seed, rank, step)``, so every rank gets its own prompts and a resumed run sees the same ones.
The tokenizer is character level and needs nothing from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pydantic import BaseModel, ConfigDict, Field, model_validator

class RewardFuncConfig(BaseModel):
    """One reward function by registry name with its weight in the weighted sum."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str
    weight: float = 1.0


class TaskConfig(BaseModel):
    """The embedded synthetic task with verifiable rewards."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["copy", "reverse", "sort"] = "copy"
    min_digits: int = Field(2, gt=0)
    max_digits: int = Field(4, gt=0)
    prompts_per_rank: int = Field(8, gt=0, description="Distinct prompts per rank and rollout.")
    reward_funcs: list[RewardFuncConfig] = Field(
        default_factory=lambda: [
            RewardFuncConfig(name="digit_accuracy", weight=1.0),
            RewardFuncConfig(name="length_match", weight=0.5),
            RewardFuncConfig(name="exact_match", weight=0.5),
        ],
        min_length=1,
    )

    @model_validator(mode="after")
    def _digit_range(self) -> "TaskConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) > max_digits ({self.max_digits})")
        return self


_SPECIALS = ("<pad>", "<bos>", "<eos>")
_CHARS = "0123456789=CRS"
_TASK_LETTER = {"copy": "C", "reverse": "R", "sort": "S"}


class CharTokenizer:
    """Character tokenizer over digits, ``=`` and the task letters, plus pad/bos/eos."""

    def __init__(self) -> None:
        self.vocab: tuple[str, ...] = _SPECIALS + tuple(_CHARS)
        self._index = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added). Raises ``ValueError`` on an unknown char."""
        try:
            return [self._index[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the task vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` up to the first EOS; a pad or bos token reads as ``_`` (it is a
        wrong character, not a free way to end a completion)."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            out.append(self.vocab[i] if i > self.eos_id else "_")
        return "".join(out)


def solve(task: str, digits: str) -> str:
    """The verifiable answer of ``task`` on ``digits``."""
    if task == "copy":
        return digits
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return "".join(sorted(digits))
    raise ValueError(f"unknown task {task!r}; known: {', '.join(_TASK_LETTER)}")


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of one rank and step: texts, answers, and left-padded token ids."""

    prompts: list[str]
    answers: list[str]
    input_ids: torch.Tensor  # (P, Lp) left-padded with pad_id
    attention_mask: torch.Tensor  # (P, Lp) 1 on real tokens


class DigitTask:
    """Deterministic prompt source: ``sample(rank, step)`` depends only on (seed, rank, step)."""

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.tokenizer = CharTokenizer()

    @property
    def max_prompt_length(self) -> int:
        return self.cfg.max_digits + 3  # bos, letter, digits, '='

    def _generator(self, rank: int, step: int) -> torch.Generator:
        # Large odd multipliers keep (seed, rank, step) streams apart.
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63)
        )

    def sample(self, rank: int, step: int) -> PromptBatch:
        """``prompts_per_rank`` prompts for ``rank`` at ``step``, left-padded for generation."""
        gen = self._generator(rank, step)
        lengths = torch.randint(
            self.cfg.min_digits, self.cfg.max_digits + 1, (self.cfg.prompts_per_rank,), generator=gen
        )
        letter = _TASK_LETTER[self.cfg.name]
        prompts, answers, rows = [], [], []
        for n in lengths.tolist():
            digits = "".join(str(d) for d in torch.randint(0, 10, (n,), generator=gen).tolist())
            prompts.append(f"{letter}{digits}=")
            answers.append(solve(self.cfg.name, digits))
            rows.append([self.tokenizer.bos_id] + self.tokenizer.encode(prompts[-1]))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return PromptBatch(prompts, answers, ids, mask)
