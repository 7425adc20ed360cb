"""Everything about a run that can be checked before its run directory exists.

:func:`prepare` runs on every rank right after the config validated: it checks ``model.path``
(config and tokenizer files, no weights read), loads the tokenizer, builds this rank's task
(reading only this rank's data), resolves the reward functions (registered names or import
paths) and calls them once on this rank's first prompts, so a function that raises or returns
the wrong number of scores is found now, not at step 0 of a half-written run.

Failure behaviour: every rank reports its first problem as one line; the ranks agree on the
lines (bytes all-gathered, never pickled) and all raise the same :class:`ConfigError`, naming
the rank when only some ranks failed (``by_file`` data differs per rank). Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedgspo.config import Config, ConfigError
from fedgspo.distributed import DistContext, all_gather_bytes
from fedgspo.gspo.data import DataError, Task, build_task
from fedgspo.gspo.model import ModelError, check_model_dir, load_tokenizer
from fedgspo.gspo.rewards import RewardError, WeightedReward

#: Problems that :func:`prepare` turns into a one-line :class:`ConfigError`.
_INPUT_ERRORS = (DataError, ModelError, RewardError)


@dataclass
class Prepared:
    """What :func:`prepare` checked and built: the tokenizer (``None`` for the digit task,
    which brings its own), this rank's task and the weighted reward."""

    tokenizer: Any
    task: Task
    reward: WeightedReward


def _build(cfg: Config, ctx: DistContext) -> Prepared:
    tokenizer = None
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path, lora=cfg.model.lora is not None, tokenizer=cfg.task.dataset is not None)
    if cfg.task.dataset is not None:
        tokenizer = load_tokenizer(cfg.model.path)
    task = build_task(cfg.task, tokenizer, seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size)
    reward = WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs])
    dry_run_reward(reward, task, ctx.rank)
    return Prepared(tokenizer, task, reward)


def dry_run_reward(reward: WeightedReward, task: Task, rank: int) -> None:
    """Call ``reward`` once on ``rank``'s first prompts with empty completions (of the kind
    the task produces); raises :class:`RewardError` as training would."""
    batch = task.sample(rank, 0)
    reward(batch.prompts, task.decode([[] for _ in batch.prompts]), **batch.columns)


def prepare(cfg: Config, ctx: DistContext) -> Prepared:
    """Check and build the run's inputs on every rank (collective); raises the same
    :class:`ConfigError` on every rank when any rank found a problem."""
    prepared, error = None, ""
    try:
        prepared = _build(cfg, ctx)
    except _INPUT_ERRORS as err:
        error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    errors = [blob.decode("utf-8", errors="replace") for blob in all_gather_bytes(error.encode())]
    failed = [(rank, text) for rank, text in enumerate(errors) if text]
    if failed:
        rank, text = failed[0]
        raise ConfigError(text if len(failed) == len(errors) else f"rank {rank}: {text}")
    assert prepared is not None
    return prepared
