"""Checkpoints written atomically with a sha256 manifest, and verified on read.

A checkpoint is a directory: the model in transformers layout (``config.json`` +
``model.safetensors``), optional extra tensors/files, and ``manifest.json`` listing the sha256
of every other file. It is written into a hidden temporary sibling and renamed into place, so
a crash mid-write never leaves a visible partial checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the bad file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, model: torch.nn.Module, *, step: int,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``metadata`` into the manifest) as a checkpoint at ``directory``.

    An existing checkpoint at ``directory`` is replaced only after the new one is complete.
    Failure: any exception leaves the previous state untouched (the temporary directory is
    removed) and propagates to the caller.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"step": step, "files": files, **(metadata or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, stale)
            os.replace(tmp, directory)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest.

    Raises :class:`CheckpointError` naming the first missing, unlisted or mismatching file.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: manifest missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{manifest_path}: manifest is not valid JSON") from None
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
