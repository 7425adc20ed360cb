"""Data-set tasks: formats, chat prompts, deterministic sharded streams, partitions, checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from fedgspo.gspo.data import (DataError, DatasetTask, build_task, dirichlet_partition, iid_partition,
                               validate_task)
from fedgspo.gspo.rewards import WeightedReward
from fedgspo.gspo.task import DigitTask, TaskConfig
from hf_fixtures import arithmetic_rows, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def numbered(n: int, *, chat: bool = False, seed: int = 0) -> list[dict]:
    """Arithmetic rows with an ``id`` column, to follow rows through shards and streams."""
    return [dict(row, id=i) for i, row in enumerate(arithmetic_rows(n, chat=chat, seed=seed))]


def task(tok, path: Path, *, rank: int = 0, world_size: int = 1, seed: int = 0, **kw) -> DatasetTask:
    cfg = TaskConfig(dataset=path, **{"prompts_per_rank": 4, **kw})
    return DatasetTask(cfg, tok, seed=seed, rank=rank, world_size=world_size)


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- formats and prompts ------------------------------------------------------------------------


def _write(fmt: str, tmp_path: Path, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
        return tmp_path / "d.json"
    ds = datasets.Dataset.from_list(rows)
    if fmt == "csv":
        ds.to_csv(tmp_path / "d.csv", index=False)
        return tmp_path / "d.csv"
    if fmt == "parquet":
        ds.to_parquet(tmp_path / "d.parquet")
        return tmp_path / "d.parquet"
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_loads_each_format(tok, tmp_path, fmt):
    rows = numbered(6)
    t = task(tok, _write(fmt, tmp_path, rows), shuffle=False)
    batch = t.sample(0, 0)
    assert batch.prompts == [r["prompt"] for r in rows[:4]]
    assert [str(a) for a in batch.columns["answer"]] == [r["answer"] for r in rows[:4]]
    assert set(batch.columns) == {"answer", "label", "id"}
    first = tok(rows[0]["prompt"])["input_ids"]
    assert batch.input_ids[0, -len(first):].tolist() == first
    assert (t.pad_id, t.eos_id, t.vocab_size) == (tok.pad_token_id, tok.eos_token_id, len(tok))


def test_save_to_disk_dict_takes_the_splits(tok, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(numbered(5)),
                          "test": datasets.Dataset.from_list(numbered(3, seed=9))}).save_to_disk(str(tmp_path / "dd"))
    t = task(tok, tmp_path / "dd", eval_dataset=tmp_path / "dd", prompts_per_rank=2)
    assert len(t.rows) == 5
    evals = t.eval_batches(10)
    assert [len(b.prompts) for b in evals] == [2, 1]
    assert [p for b in evals for p in b.prompts] == [r["prompt"] for r in numbered(3, seed=9)]
    one_line_error("task.split: no split 'dev' in .*; splits: train, test", task, tok, tmp_path / "dd", split="dev")


def test_chat_prompts_go_through_the_chat_template(tok, tmp_path):
    rows = numbered(4, chat=True)
    t = task(tok, write_jsonl(tmp_path / "c.jsonl", rows), shuffle=False)
    batch = t.sample(0, 0)
    assert t.chat and batch.prompts[0] == rows[0]["prompt"]
    text = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert text.endswith("assistant : ")
    expected = tok(text, add_special_tokens=False)["input_ids"]
    real = [i for i, m in zip(batch.input_ids[0].tolist(), batch.attention_mask[0].tolist()) if m]
    assert real == expected
    # Completions decode to assistant messages, cut at EOS with special tokens skipped.
    ids = tok("4 + 3", add_special_tokens=False)["input_ids"]
    assert t.decode([ids + [t.eos_id, 5], [t.pad_id] + ids]) == [
        [{"role": "assistant", "content": "4 + 3"}], [{"role": "assistant", "content": "4 + 3"}]]


def test_left_padding_and_text_decode(tok, tmp_path):
    rows = [{"prompt": "1 + 2", "answer": "3"}, {"prompt": "what is 1 + 2", "answer": "3"}]
    t = task(tok, write_jsonl(tmp_path / "p.jsonl", rows), prompts_per_rank=2, shuffle=False)
    batch = t.sample(0, 0)
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.input_ids[0, :2].tolist() == [tok.pad_token_id] * 2
    assert t.decode([tok("1 + 2")["input_ids"] + [t.eos_id]]) == ["1 + 2"]


def test_columns_arrive_as_reward_kwargs(tok, tmp_path):
    t = task(tok, write_jsonl(tmp_path / "c.jsonl", numbered(8, chat=True)))
    batch = t.sample(0, 3)
    seen: dict = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    completions = [[{"role": "assistant", "content": f"so #### {a}"}] for a in batch.columns["answer"]]
    total, parts = WeightedReward([(spy, 1.0)])(batch.prompts, completions, **batch.columns)
    assert seen == batch.columns and set(seen) == {"answer", "label", "id"}
    total, parts = WeightedReward.from_names([("math_answer", 1.0)])(batch.prompts, completions, **batch.columns)
    assert total == [1.0] * 4


# -- the stream -------------------------------------------------------------------------------


def test_sample_is_a_pure_function_of_seed_rank_step(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered(30))
    a = task(tok, path, rank=1, world_size=3, seed=5)
    first = [a.sample(1, s).columns["id"] for s in range(6)]
    b = task(tok, path, rank=1, world_size=3, seed=5)  # a resumed run: a fresh task, no state
    assert [b.sample(1, s).columns["id"] for s in (5, 2, 0)] == [first[5], first[2], first[0]]
    assert b.sample(1, 2).input_ids.equal(a.sample(1, 2).input_ids)
    assert task(tok, path, rank=1, world_size=3, seed=6).sample(1, 0).columns["id"] != first[0]
    with pytest.raises(ValueError, match="holds rank 1's shard only"):
        a.sample(0, 0)


def test_stream_wraps_epochs_with_a_fresh_shuffle(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered(6))
    t = task(tok, path, prompts_per_rank=4, seed=1)
    stream = [i for s in range(6) for i in t.sample(0, s).columns["id"]]  # 24 rows = 4 epochs
    epochs = [stream[k:k + 6] for k in range(0, 24, 6)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    plain = task(tok, path, prompts_per_rank=4, shuffle=False)
    assert [i for s in range(3) for i in plain.sample(0, s).columns["id"]] == list(range(6)) * 2


def test_prompts_per_rank_above_the_shard_size(tok, tmp_path):
    t = task(tok, write_jsonl(tmp_path / "d.jsonl", numbered(3)), prompts_per_rank=7, shuffle=False)
    assert t.sample(0, 1).columns["id"] == [1, 2, 0, 1, 2, 0, 1]


# -- partitions -------------------------------------------------------------------------------


def _disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts) if parts else np.zeros(0)
    assert len(joined) == n and set(joined.tolist()) == set(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_iid_partition_is_disjoint_balanced_and_covers(n, world, seed):
    parts = iid_partition(n, world, seed)
    _disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(p, q) for p, q in zip(parts, iid_partition(n, world, seed)))


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.sampled_from(["a", "b", "c", 3, None]), max_size=200), world=st.integers(1, 9),
       alpha=st.floats(0.01, 100.0), seed=st.integers(0, 2**32))
def test_dirichlet_partition_is_disjoint_and_covers(labels, world, alpha, seed):
    parts = dirichlet_partition(labels, world, alpha, seed)
    assert len(parts) == world
    _disjoint_cover(parts, len(labels))


def _label_skew(alpha: float) -> float:
    """Mean over ranks of the share of a rank's rows carrying its most common label."""
    labels = [k for k in range(4) for _ in range(200)]
    shares = []
    for part in dirichlet_partition(labels, 4, alpha, seed=0):
        if len(part):
            shares.append(np.bincount(np.asarray(labels)[part]).max() / len(part))
    return float(np.mean(shares))


def test_dirichlet_is_skewed_at_small_alpha():
    assert _label_skew(0.05) > 0.8
    assert _label_skew(1000.0) < 0.35


def test_task_shards_are_disjoint_and_cover(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered(40))
    for kw in ({"partition": "iid"}, {"partition": "dirichlet", "label_column": "label", "dirichlet_alpha": 5.0}):
        shards = [task(tok, path, rank=r, world_size=3, seed=2, **kw) for r in range(3)]
        _disjoint_cover([s.row_ids for s in shards], 40)
        for s in shards:
            assert sorted(s.rows["id"]) == sorted(s.row_ids.tolist())


def test_by_file_opens_only_the_ranks_file(tok, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "site_1.jsonl", numbered(5))
    opened: list[str] = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **kw: opened.append(kw["data_files"]) or real(*a, **kw))
    template = tmp_path / "site_{rank}.jsonl"
    t = task(tok, template, rank=1, world_size=3, partition="by_file", shuffle=False)  # site_0, site_2 absent
    assert t.sample(1, 0).columns["id"] == [0, 1, 2, 3] and t.path == tmp_path / "site_1.jsonl"
    assert opened == [str(tmp_path / "site_1.jsonl")]
    message = one_line_error("no file for rank 0", task, tok, template, rank=0, world_size=3, partition="by_file")
    assert "site_0.jsonl" in message
    if os.geteuid() != 0:  # root reads unreadable files
        write_jsonl(tmp_path / "site_0.jsonl", numbered(2)).chmod(0)
        assert task(tok, template, rank=1, world_size=3, partition="by_file").row_ids.tolist() == list(range(5))


# -- max_prompt_length ------------------------------------------------------------------------


def _lengths_file(tmp_path: Path) -> Path:
    prompts = ["1 + 2", "what is 1 + 2 + 3", "1", "what is 1 + 2 + 3 + 4"]  # 3, 7, 1, 9 tokens
    return write_jsonl(tmp_path / "l.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(prompts)])


def test_left_truncation_is_counted(tok, tmp_path):
    t = task(tok, _lengths_file(tmp_path), max_prompt_length=5, shuffle=False)
    assert (t.truncated, t.skipped) == (2, 0)
    batch = t.sample(0, 0)
    assert batch.input_ids.shape[1] == 5
    full = tok("what is 1 + 2 + 3 + 4")["input_ids"]
    assert batch.input_ids[3].tolist() == full[-5:]


def test_skip_drops_long_rows_and_counts_them(tok, tmp_path):
    t = task(tok, _lengths_file(tmp_path), max_prompt_length=5, truncation="skip", shuffle=False)
    assert (t.truncated, t.skipped) == (0, 2)
    assert t.row_ids.tolist() == [0, 2] and t.sample(0, 0).columns["id"] == [0, 2, 0, 2]
    assert [b.columns["id"] for b in t.eval_batches(3)] == [[0, 2]]
    one_line_error("every prompt .* is longer", task, tok, _lengths_file(tmp_path), max_prompt_length=1,
                   truncation="skip", rank=0, world_size=4)


# -- eval, factory, digit task ----------------------------------------------------------------


def test_eval_batches_fall_back_to_the_shard(tok, tmp_path):
    t = task(tok, write_jsonl(tmp_path / "d.jsonl", numbered(10)), prompts_per_rank=3, rank=1, world_size=2)
    batches = t.eval_batches(4)
    assert [b.columns["id"] for b in batches] == [t.row_ids[:3].tolist(), t.row_ids[3:4].tolist()]
    assert t.eval_batches(4)[0].input_ids.equal(batches[0].input_ids)


def test_build_task_and_digit_task_interface(tok, tmp_path):
    digit = build_task(TaskConfig(prompts_per_rank=3), None, seed=0, rank=0, world_size=2)
    assert isinstance(digit, DigitTask)
    batch = digit.sample(0, 0)
    assert batch.answers == batch.columns["answer"] and len(batch.prompts) == 3
    assert (digit.pad_id, digit.eos_id, digit.vocab_size) == (0, 2, digit.tokenizer.vocab_size)
    assert digit.decode([digit.tokenizer.encode("12") + [digit.eos_id, 5]]) == ["12"]
    evals = digit.eval_batches(7)
    assert [len(b.prompts) for b in evals] == [3, 3, 1]
    assert [b.prompts for b in evals] == [b.prompts for b in digit.eval_batches(7)]
    path = write_jsonl(tmp_path / "d.jsonl", numbered(4))
    assert isinstance(build_task(TaskConfig(dataset=path), tok, seed=0, rank=0, world_size=1), DatasetTask)
    one_line_error("needs the model's tokenizer", build_task, TaskConfig(dataset=path), None, seed=0, rank=0,
                   world_size=1)
    validate_task(TaskConfig(), None, rank=0, world_size=1)
    validate_task(TaskConfig(dataset=path), tok, rank=0, world_size=1)


# -- config and pre-flight errors -------------------------------------------------------------


@pytest.mark.parametrize(("kw", "match"), [
    ({"dataset": "d.jsonl", "partition": "by_file"}, "needs dataset to be a path template holding '{rank}'"),
    ({"dataset": "d_{rank}.jsonl"}, "per-rank template but partition is 'iid'"),
    ({"dataset": "d_{site}.jsonl", "partition": "by_file"}, r"only the field \{rank\}"),
    ({"dataset": "d.jsonl", "partition": "dirichlet"}, "needs label_column"),
    ({"dataset": "d.jsonl", "truncation": "right"}, "truncation"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValidationError, match=match):
        TaskConfig(**kw)


def _check(tok, cfg: TaskConfig, match: str, *, rank: int = 0, world_size: int = 1) -> str:
    return one_line_error(match, validate_task, cfg, tok, rank=rank, world_size=world_size)


def test_errors_name_the_file(tok, tmp_path):
    message = _check(tok, TaskConfig(dataset=tmp_path / "nope.jsonl"), "task.dataset: no such file")
    assert "nope.jsonl" in message
    (tmp_path / "d.txt").write_text("hi")
    _check(tok, TaskConfig(dataset=tmp_path / "d.txt"), r"unsupported file type '.txt' of .*d.txt; use .jsonl")
    (tmp_path / "empty_dir").mkdir()
    _check(tok, TaskConfig(dataset=tmp_path / "empty_dir"), "empty_dir is not a datasets.save_to_disk directory")


def test_malformed_json_names_the_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1"}\n\n{"prompt": "2",}\n')
    _check(tok, TaskConfig(dataset=bad), r"bad.jsonl line 3: invalid JSON \(")
    bad.write_text('{"prompt": "1"}\n[1, 2]\n')
    _check(tok, TaskConfig(dataset=bad), "bad.jsonl line 2: expected a JSON object, got list")
    arr = tmp_path / "arr.json"
    arr.write_text('[\n {"prompt": "1"},\n {"prompt": }\n]')
    _check(tok, TaskConfig(dataset=arr), "arr.json line 3: invalid JSON")


def test_missing_columns_name_the_present_ones(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered(4))
    _check(tok, TaskConfig(dataset=path, prompt_column="question"),
           "task.prompt_column 'question' is not a column of .*d.jsonl; columns: prompt, answer, label, id")
    _check(tok, TaskConfig(dataset=path, partition="dirichlet", label_column="topic"),
           "task.label_column 'topic' is not a column of .*; columns: prompt")


def test_empty_shard_and_missing_rank_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered(2))
    _check(tok, TaskConfig(dataset=path), r"rank 2 of 3 gets no rows of .*d.jsonl \(2 rows, partition iid\)",
           rank=2, world_size=3)
    _check(tok, TaskConfig(dataset=tmp_path / "s_{rank}.jsonl", partition="by_file"),
           "no file for rank 1: .*s_1.jsonl", rank=1, world_size=2)


def test_bad_prompts_name_the_row(tok, tmp_path):
    rows = numbered(4)
    rows[2]["prompt"] = {"text": "1 + 1"}
    _check(tok, TaskConfig(dataset=write_jsonl(tmp_path / "a.jsonl", rows)), r"a.jsonl row 2: the prompt must be")
    rows = numbered(3)
    rows[1]["prompt"] = [{"role": "user", "content": "1"}]
    _check(tok, TaskConfig(dataset=write_jsonl(tmp_path / "m.jsonl", rows)),
           "m.jsonl row 1: chat prompt among text prompts")
    chat = write_jsonl(tmp_path / "c.jsonl", numbered(2, chat=True))
    plain = make_tokenizer()
    plain.chat_template = None
    _check(plain, TaskConfig(dataset=chat), "holds chat prompts but the tokenizer has no chat template")
    _check(tok, TaskConfig(dataset=chat, eval_dataset=write_jsonl(tmp_path / "e.jsonl", numbered(2))),
           "task.eval_dataset .*e.jsonl: its prompts are text")
