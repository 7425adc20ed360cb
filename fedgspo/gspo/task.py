"""Prompt sources and their configuration.

:class:`TaskConfig` configures either the embedded synthetic task (the default, ``dataset``
unset) or a local data set (:mod:`fedgspo.gspo.data`). The embedded task: ``copy``, ``reverse``
or ``sort`` a string of ``min_digits..max_digits`` digits. A prompt reads ``"R3141="`` (task
letter, digits, ``=``), the answer ``"1413"``. Prompts are a pure function of
``(seed, rank, step)``, so every rank gets its own prompts and a resumed run sees the same ones.
The tokenizer is character level and needs nothing from disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pydantic import BaseModel, ConfigDict, Field, model_validator

Message = dict[str, str]
Prompt = str | list[Message]
"""A prompt as the data set holds it: plain text, or chat messages ``{role, content}``."""


class RewardFuncConfig(BaseModel):
    """One reward function (registered name or ``package.module:function``) with its weight in
    the weighted sum."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(description="Registered reward name, or an import path package.module:function.")
    weight: float = Field(1.0, description="Weight of this function in the summed reward.")


class TaskConfig(BaseModel):
    """Where prompts come from: the embedded digit task (``dataset`` unset) or a local data set
    split across ranks, and the verifiable rewards that score completions."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["copy", "reverse", "sort"] = Field("copy", description="Digit task: transformation to learn.")
    min_digits: int = Field(2, gt=0, description="Digit task: shortest digit string.")
    max_digits: int = Field(4, gt=0, description="Digit task: longest digit string.")
    prompts_per_rank: int = Field(8, gt=0, description="Distinct prompts per rank and rollout.")
    reward_funcs: list[RewardFuncConfig] = Field(
        default_factory=lambda: [
            RewardFuncConfig(name="digit_accuracy", weight=1.0),
            RewardFuncConfig(name="length_match", weight=0.5),
            RewardFuncConfig(name="exact_match", weight=0.5),
        ],
        min_length=1,
        description="Reward functions and weights; their weighted sum is the training reward.",
    )
    dataset: Path | None = Field(
        None, description="Local prompt data: a .jsonl/.json/.csv/.parquet file or a datasets.save_to_disk "
                          "directory; with partition by_file a path template holding '{rank}'. "
                          "Unset: the embedded digit task.")
    prompt_column: str = Field("prompt", description="Column holding the prompt: text or a list of "
                                                     "{role, content} messages (chat template applied).")
    split: str = Field("train", description="Split to train on when dataset is a saved DatasetDict.")
    eval_dataset: Path | None = Field(
        None, description="Local evaluation prompts, same formats as dataset; unset: the first rows of "
                          "the rank's training shard.")
    eval_split: str = Field("test", description="Split to evaluate on when eval_dataset is a saved DatasetDict.")
    max_prompt_length: int | None = Field(
        None, gt=0, description="Longest prompt in tokens; longer ones are handled per truncation. Unset: no limit.")
    truncation: Literal["left", "skip"] = Field(
        "left", description="Prompts over max_prompt_length: keep their last tokens (left) or drop the rows "
                            "(skip); both are counted.")
    shuffle: bool = Field(True, description="Reshuffle the rank's shard every epoch (seeded).")
    partition: Literal["iid", "dirichlet", "by_file"] = Field(
        "iid", description="How rows are split across ranks: a seeded uniform split (iid), label skew with "
                           "Dirichlet(dirichlet_alpha) proportions (dirichlet), or one file per rank (by_file).")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Concentration of the dirichlet partition; smaller "
                                                           "is more skewed.")
    label_column: str | None = Field(None, description="Column whose values the dirichlet partition skews by.")

    @model_validator(mode="after")
    def _digit_range(self) -> "TaskConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) > max_digits ({self.max_digits})")
        return self

    @model_validator(mode="after")
    def _partition_inputs(self) -> "TaskConfig":
        for key in ("dataset", "eval_dataset"):
            path = getattr(self, key)
            if path is None or "{" not in str(path):
                continue
            if self.partition != "by_file":
                raise ValueError(f"{key} {str(path)!r} is a per-rank template but partition is "
                                 f"{self.partition!r}; set partition: by_file")
            try:
                str(path).format(rank=0)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{key} {str(path)!r}: only the field {{rank}} may appear ({err!r})") from None
        if self.partition == "by_file" and (self.dataset is None or "{rank}" not in str(self.dataset)):
            raise ValueError(f"partition by_file needs dataset to be a path template holding '{{rank}}' "
                             f"(e.g. data/site_{{rank}}.jsonl), got {self.dataset}")
        if self.partition == "dirichlet" and self.label_column is None:
            raise ValueError("partition dirichlet needs label_column (the column to skew by)")
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
    """Prompts of one rank and step, left-padded token ids, and the rows' other columns.

    ``columns`` maps each non-prompt column to its values in prompt order; they are passed to
    reward functions as keyword arguments (TRL's convention).
    """

    prompts: list[Prompt]
    input_ids: torch.Tensor  # (P, Lp) left-padded with pad_id
    attention_mask: torch.Tensor  # (P, Lp) 1 on real tokens
    columns: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def answers(self) -> list[Any]:
        """The ``answer`` column; ``KeyError`` naming the columns when there is none."""
        if "answer" not in self.columns:
            raise KeyError(f"no 'answer' column; columns: {', '.join(self.columns) or '(none)'}")
        return self.columns["answer"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows left-padded to the longest with ``pad_id``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


_EVAL_STREAM = 2**31 - 1  # generator stream of eval prompts, apart from every training rank


class DigitTask:
    """Deterministic prompt source: ``sample(rank, step)`` depends only on (seed, rank, step)."""

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.tokenizer = CharTokenizer()

    @property
    def max_prompt_length(self) -> int:
        return self.cfg.max_digits + 3  # bos, letter, digits, '='

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _generator(self, rank: int, step: int) -> torch.Generator:
        # Large odd multipliers keep (seed, rank, step) streams apart.
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63)
        )

    def sample(self, rank: int, step: int) -> PromptBatch:
        """``prompts_per_rank`` prompts for ``rank`` at ``step``, left-padded for generation."""
        return self._batch(self._generator(rank, step), self.cfg.prompts_per_rank)

    def eval_batches(self, num_prompts: int) -> list[PromptBatch]:
        """``num_prompts`` fixed evaluation prompts (the same on every rank and call), in batches
        of ``prompts_per_rank``, drawn from a stream no training rank samples."""
        gen = self._generator(_EVAL_STREAM, 0)
        size = self.cfg.prompts_per_rank
        return [self._batch(gen, min(size, num_prompts - start)) for start in range(0, num_prompts, size)]

    def decode(self, completion_ids: list[list[int]]) -> list[str]:
        """Completion texts up to the first EOS (pad/bos read as ``_``, see :meth:`CharTokenizer.decode`)."""
        return [self.tokenizer.decode(row) for row in completion_ids]

    def _batch(self, gen: torch.Generator, count: int) -> PromptBatch:
        lengths = torch.randint(self.cfg.min_digits, self.cfg.max_digits + 1, (count,), generator=gen)
        letter = _TASK_LETTER[self.cfg.name]
        prompts, answers, rows = [], [], []
        for n in lengths.tolist():
            digits = "".join(str(d) for d in torch.randint(0, 10, (n,), generator=gen).tolist())
            prompts.append(f"{letter}{digits}=")
            answers.append(solve(self.cfg.name, digits))
            rows.append([self.tokenizer.bos_id] + self.tokenizer.encode(prompts[-1]))
        ids, mask = left_pad(rows, self.tokenizer.pad_id)
        return PromptBatch(prompts, ids, mask, {"answer": answers})
