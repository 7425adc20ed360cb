"""Prompts from a local data set, split across ranks the way federated clients hold data.

:class:`DatasetTask` reads a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a
``datasets.save_to_disk`` directory through the ``datasets`` library (local files only,
nothing is downloaded) and keeps only this rank's shard:

* ``iid``: a seeded permutation of all rows cut into ``world_size`` near-equal parts;
* ``dirichlet``: per label, the label's rows go to ranks in proportions drawn from
  ``Dirichlet(alpha)`` (seeded), the usual non-IID split of federated-learning benchmarks;
* ``by_file``: ``dataset`` is a template (``data/site_{rank}.jsonl``) and rank ``r`` opens only
  its own file.

``sample(rank, step)`` is a pure function of ``(seed, rank, step)``: row ``step * P + i`` of the
shard's stream, where epoch ``e`` of the stream is the shard in a seeded shuffle of ``(seed,
rank, e)``. A resumed run therefore continues the data stream exactly where it stopped, with no
saved state. Text prompts are tokenized as they are; ``{role, content}`` message lists go
through the tokenizer's chat template with the generation prompt. Every other column reaches
the reward functions as a keyword list (TRL's convention).

Failure behaviour: :func:`validate_task` and :class:`DatasetTask` raise :class:`DataError`, one
line naming the config key, file, line, row or column at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedgspo.gspo.task import DigitTask, Prompt, PromptBatch, TaskConfig, left_pad

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> ``datasets`` builder; any directory is read with ``load_from_disk``."""

# Stream tags that keep the partition and epoch-shuffle generators apart.
_IID, _DIRICHLET, _EPOCH = 0x11D, 0xD1C, 0xE90C


class DataError(ValueError):
    """The configured data cannot be used; the message is one line naming the key, file, line,
    row or column at fault."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _entropy(seed: int) -> int:
    return seed % 2**64  # numpy seed sequences take non-negative integers


def rank_path(template: Path, rank: int) -> Path:
    """The file of ``rank`` under a ``by_file`` template (a path without ``{rank}`` is itself)."""
    return Path(str(template).format(rank=rank))


# -- partitions -------------------------------------------------------------------------------


def iid_partition(num_rows: int, world_size: int, seed: int) -> list[np.ndarray]:
    """Row indices of each rank: a seeded permutation of ``range(num_rows)`` cut into
    ``world_size`` parts whose sizes differ by at most one; each part sorted."""
    perm = np.random.default_rng([_entropy(seed), _IID]).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(perm, world_size)]


def dirichlet_partition(labels: Sequence[Any], world_size: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Row indices of each rank under label skew: the rows of each label (in order of first
    appearance) are shuffled and cut in proportions drawn from ``Dirichlet(alpha)`` over the
    ranks. Disjoint and covering every row; a rank may get none at small ``alpha``."""
    groups: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label if isinstance(label, Hashable) else repr(label), []).append(i)
    rng = np.random.default_rng([_entropy(seed), _DIRICHLET])
    parts: list[list[np.ndarray]] = [[] for _ in range(world_size)]
    for rows in groups.values():
        idx = np.asarray(rows)
        rng.shuffle(idx)
        cuts = np.round(np.cumsum(rng.dirichlet(np.full(world_size, alpha)))[:-1] * len(idx)).astype(int)
        for rank, piece in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
            parts[rank].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


# -- loading and checks -----------------------------------------------------------------------


def _check_file(path: Path, key: str) -> None:
    if not path.exists():
        raise DataError(f"task.{key}: no such file or directory: {path}")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise DataError(f"task.{key}: cannot read directory {path}")
        return
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"task.{key}: unsupported file type {path.suffix or '(none)'!r} of {path}; use "
                        f"{', '.join(FORMATS)} or a datasets.save_to_disk directory")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise DataError(f"task.{key}: cannot read {path}: {err.strerror or _first_line(err)}") from err


def _check_json(path: Path) -> None:
    """Line-precise JSON checks: a JSON array of objects, or one object per non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"{path} row {bad}: expected a JSON object, got {type(rows[bad]).__name__}")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")


def load_rows(path: Path, *, split: str, key: str = "dataset", split_key: str = "split") -> Any:
    """The ``datasets.Dataset`` at ``path`` (a file, or a ``save_to_disk`` directory whose
    ``split`` is taken when it holds a ``DatasetDict``). ``key``/``split_key`` name the config
    keys in errors. Raises :class:`DataError`."""
    import datasets

    datasets.disable_progress_bars()  # one bar per rank and file otherwise, in every log
    _check_file(path, key)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DataError(f"task.{key}: {path} is not a datasets.save_to_disk directory "
                            f"({_first_line(err)})") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"task.{split_key}: no split {split!r} in {path}; splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    builder = FORMATS[path.suffix.lower()]
    if builder == "json":
        _check_json(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in its own types
        raise DataError(f"task.{key}: cannot load {path}: {_first_line(err)}") from err


def _require_column(rows: Any, column: str, key: str, path: Path) -> None:
    if column not in rows.column_names:
        raise DataError(f"task.{key} {column!r} is not a column of {path}; columns: {', '.join(rows.column_names)}")


def _prompt_kind(prompt: Any) -> str | None:
    """``"text"``, ``"chat"`` or ``None`` when ``prompt`` is neither a non-empty string nor a
    non-empty list of ``{role, content}`` string messages."""
    if isinstance(prompt, str):
        return "text" if prompt else None
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return "chat"
    return None


def _check_prompts(prompts: Iterable[Any], rows: Iterable[int], path: Path) -> bool:
    """Whether the prompts are chat messages; all must be of one kind. ``rows`` are their
    row numbers in ``path`` (for errors)."""
    first: str | None = None
    for row, prompt in zip(rows, prompts, strict=True):
        kind = _prompt_kind(prompt)
        if kind is None:
            shown = repr(prompt)
            raise DataError(f"{path} row {row}: the prompt must be a non-empty string or a list of "
                            f"{{role, content}} messages, got {shown[:80]}{'...' if len(shown) > 80 else ''}")
        if first is None:
            first = kind
        elif kind != first:
            raise DataError(f"{path} row {row}: {kind} prompt among {first} prompts; use one kind per data set")
    return first == "chat"


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """``(pad_id, eos_id)``: the pad token falls back to EOS; a tokenizer without EOS is refused."""
    if tokenizer is None:
        raise DataError("task.dataset needs the model's tokenizer: set model.path to a local model directory")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("task.dataset: the tokenizer has no EOS token, so completions cannot end")
    pad = tokenizer.pad_token_id
    return (eos if pad is None else pad), eos


class _Source:
    """This rank's rows of the configured data, checked: shard, source row ids, prompt kind."""

    def __init__(self, cfg: TaskConfig, tokenizer: Any, *, seed: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        assert cfg.dataset is not None
        self.pad_id, self.eos_id = _special_ids(tokenizer)
        self.path = rank_path(cfg.dataset, rank) if cfg.partition == "by_file" else cfg.dataset
        if cfg.partition == "by_file" and not self.path.exists():
            raise DataError(f"task.dataset: no file for rank {rank}: {self.path} (template {cfg.dataset})")
        rows = load_rows(self.path, split=cfg.split)
        _require_column(rows, cfg.prompt_column, "prompt_column", self.path)
        if cfg.partition == "by_file":
            ids = np.arange(len(rows))
        elif cfg.partition == "iid":
            ids = iid_partition(len(rows), world_size, seed)[rank]
        else:
            assert cfg.label_column is not None
            _require_column(rows, cfg.label_column, "label_column", self.path)
            ids = dirichlet_partition(rows[cfg.label_column], world_size, cfg.dirichlet_alpha, seed)[rank]
        if len(ids) == 0:
            how = f"dirichlet, alpha {cfg.dirichlet_alpha}" if cfg.partition == "dirichlet" else cfg.partition
            raise DataError(f"task.dataset: rank {rank} of {world_size} gets no rows of {self.path} "
                            f"({len(rows)} rows, partition {how})")
        self.shard = rows if cfg.partition == "by_file" else rows.select(ids)
        self.row_ids = ids
        self.chat = _check_prompts(self.shard[cfg.prompt_column], ids.tolist(), self.path)
        self.eval_rows: Any | None = None
        if cfg.eval_dataset is not None:
            eval_path = rank_path(cfg.eval_dataset, rank)
            self.eval_rows = load_rows(eval_path, split=cfg.eval_split, key="eval_dataset", split_key="eval_split")
            _require_column(self.eval_rows, cfg.prompt_column, "prompt_column", eval_path)
            eval_prompts = self.eval_rows[cfg.prompt_column]
            if len(eval_prompts) and _check_prompts(eval_prompts, range(len(eval_prompts)), eval_path) != self.chat:
                raise DataError(f"task.eval_dataset {eval_path}: its prompts are "
                                f"{'chat' if not self.chat else 'text'}, the training prompts are not")
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"task.dataset {self.path} holds chat prompts but the tokenizer has no chat template")


def validate_task(cfg: TaskConfig, tokenizer: Any, *, rank: int, world_size: int, seed: int = 0) -> None:
    """Check that ``rank`` can build its task from ``cfg`` (nothing is tokenized or written).

    A no-op for the digit task (``dataset`` unset). Otherwise raises :class:`DataError` for a
    missing, unreadable or unsupported file, a malformed JSON line, a missing prompt or label
    column, a prompt that is neither text nor messages, chat prompts without a chat template,
    a missing ``by_file`` file of this rank, or an empty shard for this rank. ``seed`` must be
    the run's seed for the empty-shard check of ``dirichlet`` to be exact.
    """
    if cfg.dataset is not None:
        _Source(cfg, tokenizer, seed=seed, rank=rank, world_size=world_size)


# -- the task ---------------------------------------------------------------------------------


class DatasetTask:
    """This rank's prompts from a local data set; ``sample(rank, step)`` depends only on
    ``(seed, rank, step)``.

    ``rows`` is this rank's shard (a ``datasets.Dataset``) and ``row_ids`` the row numbers of
    those rows in the source file.

    ``truncated`` / ``skipped`` count the shard rows longer than ``max_prompt_length``: with
    ``truncation="left"`` they are cut to their last tokens whenever sampled, with ``"skip"``
    they are dropped from the shard at construction. Raises :class:`DataError` as
    :func:`validate_task` does, and when ``skip`` leaves the shard empty.
    """

    def __init__(self, cfg: TaskConfig, tokenizer: Any, *, seed: int, rank: int, world_size: int) -> None:
        if cfg.dataset is None:
            raise DataError("task.dataset is not set; the digit task is DigitTask")
        source = _Source(cfg, tokenizer, seed=seed, rank=rank, world_size=world_size)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_id, self.eos_id, self.chat = source.pad_id, source.eos_id, source.chat
        self.path, self._eval_rows = source.path, source.eval_rows
        self.truncated = self.skipped = 0
        shard, row_ids = source.shard, source.row_ids
        limit = cfg.max_prompt_length
        if limit is not None:
            lengths = np.array([len(ids) for ids in self._encode(shard[cfg.prompt_column])])
            too_long = lengths > limit
            if cfg.truncation == "left":
                self.truncated = int(too_long.sum())
            else:
                self.skipped = int(too_long.sum())
                keep = np.flatnonzero(~too_long)
                if len(keep) == 0:
                    raise DataError(f"task.max_prompt_length {limit}: every prompt of rank {rank}'s shard of "
                                    f"{self.path} is longer, so truncation: skip leaves none")
                shard, row_ids = shard.select(keep), row_ids[keep]
        self.rows = shard
        self.row_ids: np.ndarray = row_ids
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def max_prompt_length(self) -> int | None:
        return self.cfg.max_prompt_length

    def sample(self, rank: int, step: int) -> PromptBatch:
        """``prompts_per_rank`` prompts at ``step``: rows ``step * P .. step * P + P - 1`` of this
        rank's epoch-shuffled stream, left-padded. ``ValueError`` for another rank (whose rows
        this task does not hold) or a negative step."""
        if rank != self.rank:
            raise ValueError(f"this task holds rank {self.rank}'s shard only; cannot sample rank {rank}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        size = self.cfg.prompts_per_rank
        return self._batch(self.rows[[self._stream_row(step * size + i) for i in range(size)]])

    def eval_batches(self, num_prompts: int) -> list[PromptBatch]:
        """The first ``num_prompts`` rows (fewer if there are fewer) of the eval data set, or of
        this rank's shard when none is configured, in batches of ``prompts_per_rank``. With
        ``truncation="skip"`` over-long eval prompts are left out (and not counted)."""
        rows = self._eval_rows if self._eval_rows is not None else self.rows
        size, limit = self.cfg.prompts_per_rank, self.cfg.max_prompt_length
        picked: list[int] = []
        for start in range(0, len(rows), size):
            if len(picked) >= num_prompts:
                break
            chunk = list(range(start, min(start + size, len(rows))))
            if limit is not None and self.cfg.truncation == "skip":
                lengths = [len(ids) for ids in self._encode(rows[chunk][self.cfg.prompt_column])]
                chunk = [i for i, n in zip(chunk, lengths) if n <= limit]
            picked.extend(chunk)
        picked = picked[:num_prompts]
        return [self._batch(rows[picked[i:i + size]]) for i in range(0, len(picked), size)]

    def decode(self, completion_ids: list[list[int]]) -> list[Any]:
        """Completion text up to the first EOS, special tokens skipped; for chat prompts each
        completion is ``[{"role": "assistant", "content": text}]`` (TRL's form)."""
        out: list[Any] = []
        for row in completion_ids:
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            out.append([{"role": "assistant", "content": text}] if self.chat else text)
        return out

    def _stream_row(self, index: int) -> int:
        epoch, pos = divmod(index, len(self.rows))
        if not self.cfg.shuffle:
            return pos
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([_entropy(self.seed), self.rank, epoch, _EPOCH])
            self._order_cache = (epoch, rng.permutation(len(self.rows)))
        return int(self._order_cache[1][pos])

    def _encode(self, prompts: Iterable[Prompt]) -> list[list[int]]:
        if self.chat:
            texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                     for p in prompts]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(list(prompts))["input_ids"]

    def _batch(self, rows: dict[str, list[Any]]) -> PromptBatch:
        columns = dict(rows)
        prompts = columns.pop(self.cfg.prompt_column)
        ids = self._encode(prompts)
        if self.cfg.max_prompt_length is not None:
            ids = [row[-self.cfg.max_prompt_length:] for row in ids]
        input_ids, attention_mask = left_pad(ids, self.pad_id)
        return PromptBatch(prompts, input_ids, attention_mask, columns)


Task = DigitTask | DatasetTask


def build_task(cfg: TaskConfig, tokenizer: Any, *, seed: int, rank: int, world_size: int) -> Task:
    """The digit task when ``cfg.dataset`` is unset, else this rank's :class:`DatasetTask`
    (which needs ``tokenizer``; :class:`DataError` otherwise)."""
    if cfg.dataset is None:
        return DigitTask(cfg, seed=seed)
    return DatasetTask(cfg, tokenizer, seed=seed, rank=rank, world_size=world_size)
