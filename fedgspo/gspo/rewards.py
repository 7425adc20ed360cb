"""Reward functions with TRL's signature ``fn(prompts, completions, **kwargs) -> list[float | None]``.

The task's other columns (``answer`` and whatever else a data set holds) arrive as keyword
lists, as TRL passes dataset columns. Completions are strings, or ``[{"role": "assistant",
"content": ...}]`` message lists for chat prompts. A ``None`` score means "not applicable to this
sample": it is left out of the weighted sum and of the function's logged mean. A coroutine
function is awaited.

Functions are found by name in this module's registry (:func:`register_reward`,
:func:`reward_names`) or by import path (``package.module:function``, see
:func:`resolve_reward`). :class:`WeightedReward` combines several into the training reward.

Failure behaviour: :class:`RewardError` (a ``ValueError``), one line naming the function, for a
name that does not resolve, a function that raises, or one that returns the wrong number of
scores; an unknown registered name is an :class:`UnknownRewardError`, also a ``KeyError``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

RewardFunc = Callable[..., Any]
"""``fn(prompts, completions, **kwargs) -> list[float | None]``, or a coroutine function thereof."""


class RewardError(ValueError):
    """A reward function cannot be resolved or misbehaved; one line naming it."""


class UnknownRewardError(RewardError, KeyError):
    """No reward function is registered under the name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, RewardFunc] = {}
_LOCK = threading.Lock()


def register_reward(name: str, fn: RewardFunc, *, replace: bool = False) -> RewardFunc:
    """Make ``fn`` selectable as ``task.reward_funcs[].name``; returns ``fn``. A taken name is a
    ``ValueError`` unless ``replace``."""
    with _LOCK:
        if name in _REGISTRY and not replace:
            raise ValueError(f"reward function {name!r} is already registered (pass replace=True)")
        _REGISTRY[name] = fn
    return fn


def reward_names() -> list[str]:
    """Registered reward names, sorted."""
    with _LOCK:
        return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFunc:
    """The function registered as ``name``; :class:`UnknownRewardError` listing the names otherwise."""
    with _LOCK:
        fn = _REGISTRY.get(name)
    if fn is None:
        raise UnknownRewardError(f"unknown reward function {name!r}; registered: {', '.join(reward_names())}")
    return fn


def resolve_reward(name: str) -> RewardFunc:
    """A registered name, else an import path ``package.module:function`` (the part after ``:``
    may be dotted) or ``package.module.function``. Raises :class:`RewardError` saying what did not
    resolve (an unknown plain name lists the registered ones)."""
    with _LOCK:
        fn = _REGISTRY.get(name)
    if fn is not None:
        return fn
    if ":" in name:
        module_name, attr = name.split(":", 1)
    elif "." in name:
        module_name, attr = name.rsplit(".", 1)
    else:
        raise UnknownRewardError(f"unknown reward function {name!r}; registered: {', '.join(reward_names())}; "
                                 f"or give an import path package.module:function")
    if not module_name or not attr:
        raise RewardError(f"reward function {name!r}: expected package.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(f"reward function {name!r}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {_first_line(err)})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward function {name!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward function {name!r}: {type(obj).__name__} object is not callable")
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _builtin(name: str) -> Callable[[RewardFunc], RewardFunc]:
    def deco(fn: RewardFunc) -> RewardFunc:
        return register_reward(name, fn, replace=True)

    return deco


# -- text helpers -----------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: itself when a string, else the content of the last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def normalize(text: str) -> str:
    """Strip, lower-case, collapse whitespace, drop trailing periods."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").rstrip()


_BOXED = "\\boxed{"


def _last_boxed(text: str) -> tuple[int, str] | None:
    """Start and content of the last ``\\boxed{...}`` with balanced braces, if any."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return start, text[start + len(_BOXED):i - 1]
        start = text.rfind(_BOXED, 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: what follows the last ``####`` (to the end of its line)
    or the content of the last ``\\boxed{...}``, whichever comes later; ``None`` without either."""
    marker = text.rfind("####")
    boxed = _last_boxed(text)
    if boxed is not None and boxed[0] > marker:
        return boxed[1].strip()
    if marker == -1:
        return None
    rest = text[marker + 4:].strip()
    return rest.splitlines()[0].strip() if rest else ""


def _number(text: str) -> float | None:
    cleaned = re.sub(r"[,$%\s]", "", text).rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_equal(predicted: str, target: str) -> bool:
    """Numeric equality when both parse as numbers (``3 == 3.0``, ``1,000 == 1000``), else
    equality of the :func:`normalize`-d texts."""
    a, b = _number(predicted), _number(target)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return normalize(predicted) == normalize(target)


# -- general rewards --------------------------------------------------------------------------


@_builtin("answer_match")
def answer_match(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any],
                 **kwargs: Any) -> list[float | None]:
    """1.0 when the completion equals ``answer`` after :func:`normalize`, else 0.0; ``None``
    where the answer is missing."""
    return [None if a is None else float(normalize(completion_text(c)) == normalize(str(a)))
            for c, a in zip(completions, answer, strict=True)]


@_builtin("math_answer")
def math_answer(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any],
                **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's final answer (after the last ``####`` or in the last
    ``\\boxed{}``) equals ``answer``'s (numerically when both are numbers); 0.0 otherwise or
    when the completion states none; ``None`` where the answer is missing. A bare answer
    (no marker) is compared as a whole."""
    scores: list[float | None] = []
    for completion, target in zip(completions, answer, strict=True):
        if target is None:
            scores.append(None)
            continue
        target_text = str(target)
        wanted = extract_answer(target_text)
        got = extract_answer(completion_text(completion))
        scores.append(float(got is not None and answers_equal(got, target_text if wanted is None else wanted)))
    return scores


DEFAULT_FORMAT_PATTERN = r"####[ \t]*[^\s#][^\n]*\s*\Z"
"""A completion that ends with a ``#### <answer>`` line."""


def make_format_reward(pattern: str, *, flags: int = 0, name: str = "format_reward") -> RewardFunc:
    """A reward scoring 1.0 when ``re.search(pattern, completion)`` matches, else 0.0 (anchor the
    pattern to match the whole text); register it with :func:`register_reward`. An invalid
    pattern is a ``re.error`` here, not at scoring time."""
    regex = re.compile(pattern, flags)

    def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [float(regex.search(completion_text(c)) is not None) for c in completions]

    format_reward.__name__ = format_reward.__qualname__ = name
    format_reward.__doc__ = f"1.0 when the completion matches {pattern!r}, else 0.0."
    return format_reward


format_reward = _builtin("format_reward")(make_format_reward(DEFAULT_FORMAT_PATTERN))


# -- rewards of the digit task ----------------------------------------------------------------


@_builtin("digit_accuracy")
def digit_accuracy(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                   **kwargs: object) -> list[float]:
    """Partial credit: characters in the right position / max(len(answer), len(completion))."""
    scores = []
    for completion, target in zip(completions, answer, strict=True):
        hits = sum(a == b for a, b in zip(completion, target))
        scores.append(hits / max(len(target), len(completion), 1))
    return scores


@_builtin("exact_match")
def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                **kwargs: object) -> list[float]:
    """1.0 when the completion equals the answer, else 0.0."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


@_builtin("length_match")
def length_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                 **kwargs: object) -> list[float]:
    """Format credit: ``1 - |len(completion) - len(answer)| / len(answer)``, floored at 0."""
    return [max(0.0, 1.0 - abs(len(c) - len(a)) / max(len(a), 1))
            for c, a in zip(completions, answer, strict=True)]


# -- the weighted sum -------------------------------------------------------------------------


async def _gather(awaitables: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _run_async(awaitables: list[Awaitable[Any]]) -> list[Any]:
    """Results (or raised exceptions) of ``awaitables``, run concurrently on a fresh event loop;
    from inside a running loop, on a helper thread's loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_gather(awaitables))
    box: list[list[Any]] = []
    worker = threading.Thread(target=lambda: box.append(asyncio.run(_gather(awaitables))), daemon=True)
    worker.start()
    worker.join()
    return box[0]


def reward_means(parts: dict[str, list[float | None]]) -> dict[str, float]:
    """Each function's mean score over its applicable (non-``None``) samples; a function with
    none is left out."""
    means = {}
    for name, scores in parts.items():
        applicable = [s for s in scores if s is not None]
        if applicable:
            means[name] = sum(applicable) / len(applicable)
    return means


class WeightedReward:
    """``sum_k w_k * fn_k(prompts, completions, **kwargs)`` over each sample's applicable
    (non-``None``) scores, with each function's raw scores kept for logging.

    ``names`` label the functions in the parts (default: each function's ``__name__``).
    """

    def __init__(self, funcs: Sequence[tuple[RewardFunc, float]], *, names: Sequence[str] | None = None) -> None:
        if not funcs:
            raise ValueError("at least one reward function is needed")
        if names is not None and len(names) != len(funcs):
            raise ValueError(f"{len(names)} names for {len(funcs)} reward functions")
        self.funcs = list(funcs)
        self.names = list(names) if names is not None else [getattr(fn, "__name__", repr(fn)) for fn, _ in funcs]

    @classmethod
    def from_names(cls, items: Sequence[tuple[str, float]]) -> "WeightedReward":
        """Functions by registered name or import path (:func:`resolve_reward`) with weights."""
        return cls([(resolve_reward(name), weight) for name, weight in items], names=[name for name, _ in items])

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 **kwargs: Any) -> tuple[list[float], dict[str, list[float | None]]]:
        """Total rewards (0.0 where every function returned ``None``) and each function's raw
        scores by name. Coroutine functions run concurrently. :class:`RewardError` naming the
        function when one raises or returns anything but one score (or ``None``) per completion."""
        results: list[Any] = []
        pending: dict[int, Awaitable[Any]] = {}
        for k, ((fn, _), name) in enumerate(zip(self.funcs, self.names)):
            try:
                result = fn(prompts, completions, **kwargs)
            except Exception as err:
                for awaitable in pending.values():
                    if inspect.iscoroutine(awaitable):
                        awaitable.close()
                raise self._raised(name, err) from err
            if inspect.isawaitable(result):
                pending[k] = result
            results.append(result)
        if pending:
            for k, result in zip(pending, _run_async(list(pending.values()))):
                if isinstance(result, Exception):
                    raise self._raised(self.names[k], result) from result
                results[k] = result
        total = [0.0] * len(completions)
        parts: dict[str, list[float | None]] = {}
        for (_, weight), name, scores in zip(self.funcs, self.names, results):
            parts[name] = checked = self._checked(name, scores, len(completions))
            total = [t if s is None else t + weight * s for t, s in zip(total, checked)]
        return total, parts

    @staticmethod
    def _raised(name: str, err: BaseException) -> RewardError:
        return RewardError(f"reward function {name} raised {type(err).__name__}: {_first_line(err)}")

    @staticmethod
    def _checked(name: str, scores: Any, count: int) -> list[float | None]:
        if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__len__") or not hasattr(scores, "__iter__"):
            raise RewardError(f"reward function {name} returned {type(scores).__name__}, not a list of scores")
        if len(scores) != count:
            raise RewardError(f"reward function {name} returned {len(scores)} scores for {count} completions")
        try:
            return [None if s is None else float(s) for s in scores]
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {name} returned a non-numeric score ({_first_line(err)})") from err
