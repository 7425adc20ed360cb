"""Checkpoints written atomically with a sha256 manifest, verified on read, resumable.

A checkpoint is a directory ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` holding:

* ``config.json`` + ``model.safetensors``: the model in transformers layout (any other
  ``nn.Module`` gets ``model.safetensors`` alone);
* ``<part>.safetensors`` + ``<part>.json`` for the optimizer, the scheduler, the caller's
  opaque ``extra`` state (reputation, aggregator state) and each rank's RNG state
  (``rng/rank<r>``): tensors go to safetensors, everything else to JSON. Nothing is pickled,
  so loading a checkpoint never executes code;
* ``manifest.json``: the sha256 of every other file, the step, the weights hash and the
  ``parent`` checkpoint (the previous one of this run, or the one this run resumed from).

It is written into a hidden temporary sibling, fsynced and renamed into place, so a crash
mid-write never leaves a visible partial checkpoint. The sha256 of ``manifest.json`` is the
checkpoint's identity (:attr:`CheckpointInfo.sha256`).

Multi-rank protocol (one node, or any shared filesystem with POSIX rename): rank 0 alone
writes and prunes; for resume rank 0 verifies and chooses, broadcasts the choice, and every
rank loads the same files, re-hashing each file it reads against the manifest.
"""

from __future__ import annotations

import copy

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from safetensors.torch import save_file, save_model

from fedgspo.distributed import all_gather_bytes, broadcast_json
from fedgspo.gspo.model import weights_sha256
from fedgspo import runfiles
from fedgspo.runfiles import sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
CHECKPOINTS = runfiles.CHECKPOINTS
SITE_STATES = runfiles.SITE_STATES
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the bad file."""


class CheckpointConfig(BaseModel):
    """When to checkpoint, how many to keep, and where a run starts from."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    every: int = Field(100, ge=0, description="Steps between checkpoints; 0 disables periodic ones.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; the newest verified one is never pruned.")
    resume: Literal["never", "auto"] | Path = Field(
        "never", description="'auto': newest verified checkpoint of the run dir (fresh start if none); "
                             "a path: that checkpoint (possibly of another run), which must verify.")
    final_lora: Literal["adapter", "merged"] = Field(
        "adapter", description="With LoRA, the final checkpoint holds the peft adapter, or the base with the "
                               "adapter merged in (a plain transformers model directory).")


@dataclass(frozen=True)
class CheckpointInfo:
    """What identifies a checkpoint; enough to register a ``ModelCheckpointEntity``."""

    path: Path
    step: int
    sha256: str  # sha256 of manifest.json, which lists the sha256 of every file
    weights_sha256: str
    parent: str | None  # path of the parent checkpoint
    parent_sha256: str | None


@dataclass
class Resumed:
    """The outcome of :meth:`CheckpointManager.load_latest_verified` on every rank."""

    info: CheckpointInfo
    extra_state: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), newest first


# -- files and hashes ----------------------------------------------------------------------------

def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_model_files(model: torch.nn.Module, directory: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, safe_serialization=True)
    else:
        save_model(model, str(directory / "model.safetensors"))


def _commit(tmp: Path, directory: Path, manifest: dict[str, Any]) -> None:
    """Hash every file of ``tmp`` into ``manifest``, fsync, and rename ``tmp`` to ``directory``."""
    manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p)
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync_tree(tmp)
    if directory.exists():
        stale = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, stale)
        os.replace(tmp, directory)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_checkpoint(directory: Path, write: Any, manifest: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        write(tmp)
        _commit(tmp, directory, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_checkpoint(directory: Path, model: torch.nn.Module, *, step: int,
                    metadata: dict[str, Any] | None = None, tokenizer: Any = None, merge_lora: bool = False) -> Path:
    """Write ``model`` (and ``metadata`` into the manifest) as a checkpoint at ``directory``.

    With ``tokenizer`` (a transformers tokenizer) its files and chat template are saved beside
    the weights, so ``AutoModelForCausalLM`` and ``AutoTokenizer.from_pretrained`` both load the
    directory. A LoRA (peft) model is saved as its adapter, or with ``merge_lora`` merged into a
    copy of the base (the training model is unchanged). An existing checkpoint at ``directory``
    is replaced only after the new one is complete.
    Failure: any exception leaves the previous state untouched (the temporary directory is
    removed) and propagates to the caller.
    """
    def write(tmp: Path) -> None:
        weights = copy.deepcopy(model).merge_and_unload() if merge_lora and _is_peft(model) else model
        _save_model_files(weights, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_checkpoint(directory, write, {"step": step, **(metadata or {})})


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _model_file(model: torch.nn.Module) -> str:
    """The weights file a checkpoint of ``model`` holds: a LoRA model's adapter, else the model."""
    return "adapter_model.safetensors" if _is_peft(model) else "model.safetensors"


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of ``directory``; :class:`CheckpointError` if missing or malformed."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: manifest missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest_path}: manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: manifest has no 'files' mapping")
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest.

    Raises :class:`CheckpointError` naming the first missing, unlisted or mismatching file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: sha256 does not match the manifest")
    extra = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    extra -= set(manifest["files"]) | {MANIFEST}
    if extra:
        raise CheckpointError(f"{directory / sorted(extra)[0]}: not listed in the manifest")
    return manifest


def checkpoint_info(directory: Path, manifest: dict[str, Any] | None = None) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a checkpoint directory (manifest read if not given)."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    parent = manifest.get("parent") or {}
    return CheckpointInfo(path=directory, step=int(manifest["step"]),
                          sha256=sha256_file(directory / MANIFEST),
                          weights_sha256=manifest.get("weights_sha256", ""),
                          parent=parent.get("path"), parent_sha256=parent.get("sha256"))


# -- state dicts without pickle ------------------------------------------------------------------

def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON form of ``obj`` with tensors moved into ``tensors`` (placeholders left behind)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return _encode(torch.from_numpy(obj.copy()), tensors, key) | {"__numpy__": True}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}.k{i}"), _encode(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in a checkpoint (tensors, "
                    "numpy arrays, dicts, lists, tuples and JSON scalars only)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        tensor = tensors[obj["__tensor__"]]
        return tensor.numpy() if obj.get("__numpy__") else tensor
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(directory: Path, name: str, state: Any) -> None:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) as ``name.json`` plus
    ``name.safetensors`` (only when it holds tensors). ``TypeError`` on anything else."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "s")
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file(tensors, str(path.with_name(path.name + ".safetensors")))
    path.with_name(path.name + ".json").write_text(json.dumps(encoded, sort_keys=True))


def _read_verified(directory: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of ``directory/name``, hashed as read: the bytes used are the bytes verified."""
    expected = manifest["files"].get(name)
    if expected is None:
        raise CheckpointError(f"{directory / name}: not listed in the manifest")
    try:
        data = (Path(directory) / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{directory / name}: listed in the manifest but missing") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{directory / name}: sha256 does not match the manifest")
    return data


def load_state(directory: Path, name: str, manifest: dict[str, Any]) -> Any:
    """Read back what :func:`save_state` wrote, checking each file against ``manifest``.

    Raises :class:`CheckpointError` naming the file if it is missing or its hash differs.
    """
    tensors_name = f"{name}.safetensors"
    tensors = (load_safetensors_bytes(_read_verified(directory, tensors_name, manifest))
               if tensors_name in manifest["files"] else {})
    return _decode(json.loads(_read_verified(directory, f"{name}.json", manifest)), tensors)


# -- RNG states ----------------------------------------------------------------------------------

def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states: torch CPU (and every CUDA device), Python, NumPy, and the
    named ``generators`` (e.g. the per-rank sampler)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state(),
                             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`. ``KeyError`` names a generator absent from ``state``."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    for name, gen in (generators or {}).items():
        gen.set_state(state["generators"][name])


def _gather_rng_states(local: dict[str, Any]) -> list[bytes] | None:
    """Every rank's RNG state as a safetensors blob (JSON part in its metadata) on rank 0,
    ``None`` elsewhere. Collective: every rank calls."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(local, tensors, "s"))
    blobs = all_gather_bytes(save_safetensors_bytes(tensors, metadata={"state": meta}))
    return blobs if not dist.is_initialized() or dist.get_rank() == 0 else None


def _decode_rng_blob(blob: bytes) -> dict[str, Any]:
    """Inverse of the encoding in :func:`_gather_rng_states` (a safetensors file whose
    metadata holds the JSON part)."""
    tensors = load_safetensors_bytes(blob)
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + header_len])["__metadata__"]["state"]
    return _decode(json.loads(meta), tensors)


# -- the manager ---------------------------------------------------------------------------------

def list_checkpoints(run_dir: Path) -> list[Path]:
    """Visible checkpoint directories of ``run_dir``, oldest first (temporaries excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_verified(run_dir: Path) -> tuple[CheckpointInfo | None, list[tuple[str, str]]]:
    """The newest checkpoint of ``run_dir`` whose hashes verify, and the newer ones skipped
    as ``(path, reason)``. Reads every byte of the checked checkpoints; no side effects."""
    skipped: list[tuple[str, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return checkpoint_info(path, verify_checkpoint(path)), skipped
        except CheckpointError as err:
            skipped.append((str(path), str(err)))
    return None, skipped


def _checked_choice(choice: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """Rank 0's broadcast choice ``[path | None, [[path, reason], ...], error | None]``,
    validated; ``CheckpointError`` when it has another shape."""
    ok = (isinstance(choice, (list, tuple)) and len(choice) == 3 and isinstance(choice[0], (str, type(None)))
          and isinstance(choice[1], list) and isinstance(choice[2], (str, type(None)))
          and all(isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, str) for x in s)
                  for s in choice[1]))
    if not ok:
        raise CheckpointError("checkpoint choice from rank 0 is malformed")
    return choice[0], [(p, r) for p, r in choice[1]], choice[2]


class CheckpointManager:
    """Periodic, pruned, resumable checkpoints of one run directory.

    Call protocol (torchtitan-like): build on every rank; :meth:`load_latest_verified` once
    before training on every rank (collective); :meth:`maybe_save` after every optimizer step
    on every rank (collective when it saves: RNG states are gathered to rank 0). Rank 0
    alone writes and prunes.

    Failure behaviour:

    * a failed save (disk full, crash) leaves no visible partial checkpoint and raises on
      rank 0 (the other ranks have already gone on; the caller should stop the run);
    * a corrupt checkpoint is skipped on resume, reported in :attr:`Resumed.skipped` and
      logged; an explicit ``resume=<path>`` that does not verify raises ``CheckpointError``
      on every rank.
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, *, rank: int = 0) -> None:
        self.run_dir, self.cfg, self.rank = Path(run_dir), cfg, rank
        self.root = self.run_dir / CHECKPOINTS
        self.parent: CheckpointInfo | None = None  # the checkpoint the next save descends from
        self.skipped: list[tuple[str, str]] = []  # corrupt checkpoints the last resume passed over
        self.pruned: list[Path] = []  # checkpoints the last save deleted (rank 0)

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint falls after optimizer step ``step`` (1-based count)."""
        return self.cfg.every > 0 and step > 0 and step % self.cfg.every == 0

    def maybe_save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   scheduler: Any = None, extra_state: Any = None,
                   generators: Mapping[str, torch.Generator] | None = None) -> CheckpointInfo | None:
        """:meth:`save` when :meth:`due`, else ``None``. Collective when due."""
        if not self.due(step):
            return None
        return self.save(step, model, optimizer, scheduler, extra_state, generators)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             scheduler: Any = None, extra_state: Any = None,
             generators: Mapping[str, torch.Generator] | None = None) -> CheckpointInfo | None:
        """Checkpoint after ``step`` optimizer steps; returns its info on rank 0, ``None`` elsewhere.

        Collective: every rank calls (each contributes its RNG state, including the named
        ``generators``); only rank 0's ``model``/``optimizer``/``scheduler``/``extra_state``
        are written (they are equal on all ranks after a robust all-reduce).
        ``extra_state`` is any nesting of dicts/lists/tuples of tensors, arrays and JSON
        scalars (``TypeError`` otherwise, raised before anything is written). After the
        rename, checkpoints beyond ``keep_last`` are pruned, never the newest verified one.
        """
        rng_blobs = _gather_rng_states(capture_rng_state(generators))
        if self.rank != 0:
            return None
        assert rng_blobs is not None
        weights = weights_sha256(model)
        parent = None if self.parent is None else {"path": str(self.parent.path), "sha256": self.parent.sha256,
                                                    "step": self.parent.step}
        manifest = {"format": FORMAT_VERSION, "step": step, "weights_sha256": weights, "parent": parent,
                    "world_size": len(rng_blobs)}

        def write(tmp: Path) -> None:
            _save_model_files(model, tmp)
            if optimizer is not None:
                save_state(tmp, "optimizer", optimizer.state_dict())
            if scheduler is not None:
                save_state(tmp, "scheduler", scheduler.state_dict())
            save_state(tmp, "extra", extra_state)
            (tmp / "rng").mkdir()
            for r, blob in enumerate(rng_blobs):
                (tmp / "rng" / f"rank{r}.safetensors").write_bytes(blob)

        path = _atomic_checkpoint(self.root / self.step_dir_name(step), write, manifest)
        info = checkpoint_info(path)
        self.parent = info
        self.pruned = self.prune()
        return info

    def prune(self) -> list[Path]:
        """Delete checkpoints older than the newest ``keep_last``; the newest one that verifies
        is always kept, even outside that window. Returns the deleted paths. Rank 0 only."""
        existing = list_checkpoints(self.run_dir)
        keep = set(existing[-self.cfg.keep_last:])
        newest, _ = newest_verified(self.run_dir)
        if newest is not None:
            keep.add(newest.path)
        deleted = [p for p in existing if p not in keep]
        for path in deleted:
            shutil.rmtree(path, ignore_errors=True)
        return deleted

    def _choose(self) -> tuple[str | None, list[tuple[str, str]], str | None]:
        """Rank 0's choice: (checkpoint path or None, skipped, error message or None)."""
        if self.cfg.resume == "never":
            return None, [], None
        if self.cfg.resume == "auto":
            info, skipped = newest_verified(self.run_dir)
            return (str(info.path) if info else None), skipped, None
        try:
            verify_checkpoint(Path(self.cfg.resume))
        except CheckpointError as err:
            return None, [], f"checkpoint.resume: {err}"
        return str(self.cfg.resume), [], None

    def load_latest_verified(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                             scheduler: Any = None,
                             generators: Mapping[str, torch.Generator] | None = None) -> Resumed | None:
        """Restore every rank from the checkpoint ``cfg.resume`` selects; ``None`` if none.

        Collective. Rank 0 verifies candidates newest first and broadcasts its choice (and
        the skipped ones, also kept in :attr:`skipped` when nothing verified); every rank then loads model, optimizer, scheduler, its own RNG
        state (``rng/rank<r>``; a rank beyond the saved world size keeps its seeded state,
        with a warning) and the extra state, hashing every file as it reads it. The chosen
        checkpoint becomes the parent of the next save.

        Failure: an explicit path that does not verify, or a file that changes between
        rank 0's check and a rank's read, raises :class:`CheckpointError` (on every rank in
        the first case; the run must stop, no partial state should be trusted).
        """
        path, skipped, error = _checked_choice(broadcast_json(list(self._choose()) if self.rank == 0 else None))
        self.skipped = skipped
        for bad, reason in skipped:
            log.warning("skipping corrupt checkpoint %s: %s", bad, reason)
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        info, extra = load_checkpoint(Path(path), model, optimizer, scheduler, rank=self.rank,
                                      generators=generators)
        self.parent = info
        return Resumed(info=info, extra_state=extra, skipped=skipped)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, *, rank: int = 0,
                    generators: Mapping[str, torch.Generator] | None = None) -> tuple[CheckpointInfo, Any]:
    """Load one checkpoint into the given objects; returns its info and the extra state.

    Every file is hashed as it is read and must match the manifest; the loaded weights must
    hash to the manifest's ``weights_sha256``. Raises :class:`CheckpointError` naming the bad
    file; the objects may then be partly overwritten and must not be used.
    """
    path = Path(path)
    manifest = read_manifest(path)
    weights_file = _model_file(model)
    missing, unexpected = _load_model_bytes(model, _read_verified(path, weights_file, manifest))
    if missing or unexpected:
        raise CheckpointError(f"{path / weights_file}: does not fit the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if manifest.get("weights_sha256") and weights_sha256(model) != manifest["weights_sha256"]:
        raise CheckpointError(f"{path / weights_file}: loaded weights do not hash to weights_sha256")
    if optimizer is not None:
        optimizer.load_state_dict(load_state(path, "optimizer", manifest))
    if scheduler is not None:
        scheduler.load_state_dict(load_state(path, "scheduler", manifest))
    rng_name = f"rng/rank{rank}.safetensors"
    if rng_name in manifest["files"]:
        restore_rng_state(_decode_rng_blob(_read_verified(path, rng_name, manifest)), generators)
    else:
        log.warning("%s has no RNG state for rank %d; keeping the seeded state", path, rank)
    return checkpoint_info(path, manifest), load_state(path, "extra", manifest)


def site_state_dir(run_dir: Path, site: int, step: int) -> Path:
    """Where site ``site`` keeps its own state of the checkpoint after ``step``."""
    return Path(run_dir) / SITE_STATES / f"site{site}" / CheckpointManager.step_dir_name(step)


def save_site_state(run_dir: Path, site: int, step: int, state: Any, *, keep_last: int) -> str:
    """Write one site's own state (what no other site holds: its weights mid-round, its inner
    optimizer, its error-feedback residual) atomically beside the run's checkpoint of ``step``;
    returns the sha256 of its manifest, which the run's checkpoint records. Keeps the newest
    ``keep_last`` states of the site. Called by the site's leader only."""
    directory = site_state_dir(run_dir, site, step)
    _atomic_checkpoint(directory, lambda tmp: save_state(tmp, "site", state), {"step": step, "site": site})
    states = sorted(p for p in directory.parent.iterdir() if _STEP_DIR.match(p.name))
    for old in states[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return sha256_file(directory / MANIFEST)


def load_site_state(run_dir: Path, site: int, step: int, sha256: str) -> Any:
    """The state :func:`save_site_state` wrote for ``site`` at ``step``, every file hashed as
    read; :class:`CheckpointError` when it is missing or is not the state the run's checkpoint
    recorded (``sha256`` of its manifest)."""
    directory = site_state_dir(run_dir, site, step)
    manifest = read_manifest(directory)
    if sha256_file(directory / MANIFEST) != sha256:
        raise CheckpointError(f"{directory / MANIFEST}: not the site state the checkpoint recorded")
    return load_state(directory, "site", manifest)


def _load_model_bytes(model: torch.nn.Module, data: bytes) -> tuple[list[str], list[str]]:
    """Load verified safetensors bytes into ``model``; returns (missing, unexpected) keys, where
    a key missing only because it is tied to a loaded one (``lm_head`` ↔ embeddings) is fine."""
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_safetensors_bytes(data))
        return [], list(result.unexpected_keys)
    result = model.load_state_dict(load_safetensors_bytes(data), strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in result.missing_keys}
    missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
    return missing, list(result.unexpected_keys)
