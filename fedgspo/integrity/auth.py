"""Secret keys, authenticated gradient updates, and signed operator requests.

Keys. ``fedgspo keygen --ranks N`` draws one random 32-byte key per ordered pair of ranks
``K[i][j]`` (i sends, j receives) and an admin key. The full key file (mode 0600) lets one
trusted operator run every rank; ``--split DIR`` also writes ``rank<r>.json`` holding only
``K[r][*]`` and ``K[*][r]`` (plus the admin key for rank 0), so a compromised rank learns no
key that would let it forge a message between two other ranks.

Updates. Rank ``i``'s message to rank ``j`` at step ``s`` carries
``HMAC-SHA256(K[i][j], domain | run | kind | s | i | j | shard | nbytes | sha256(bytes))``.
A forged update (wrong bytes), a replayed one (an old step) and a swapped one (another rank's
tag, or a tag meant for another receiver) fail to verify. The update bytes are hashed once
through a ``memoryview`` of the tensor's numpy view, without copies (CPU, contiguous).

Operator requests. ``fedgspo hotswap|stop|quarantine|release RUN ...`` writes
``RUN/requests/<ns>-<nonce>.json`` signed with the admin key; the trainer's rank 0 polls them
at step boundaries with :class:`RequestInbox`, which rejects (and audits) unsigned, badly
signed, stale and replayed requests.

Keys never appear in ``repr``, logs, the audit log or the registry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from fedgspo.integrity.audit import AUTH_FAILURE, OPERATOR_REQUEST, REQUEST_REJECTED, AuditSink, canonical_json
from fedgspo.runfiles import write_json_atomic
from fedgspo.distributed import all_gather_single, broadcast_json
from fedgspo import runfiles

KEY_BYTES = 32
TAG_BYTES = 32
KEY_FORMAT = 1
REQUESTS = runfiles.REQUESTS
ACTIONS = ("hotswap", "stop", "quarantine", "release")
_DOMAIN = b"fedgspo-update-v1"
_FULL, _SHARD = 0, 1


class AuthError(RuntimeError):
    """A key file is missing, malformed, too permissive, or lacks a needed key."""


class SecurityConfig(BaseModel):
    """Keys and the optional integrity checks of a run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    key_file: Path | None = Field(None, description="Key file from `fedgspo keygen` (full or per-rank); "
                                                    "None disables update authentication and operator requests.")
    authenticate_updates: bool = Field(True, description="Tag every update (needs key_file).")
    request_max_age_s: float = Field(86400.0, gt=0, description="Operator requests older than this are rejected.")


class SecretKey:
    """32 secret bytes whose ``repr``/``str`` never show them."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise AuthError(f"a key must be {KEY_BYTES} bytes, got {len(raw)}")
        self._raw = raw

    def reveal(self) -> bytes:
        return self._raw

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True)
class Keyring:
    """The keys one process holds: pair keys ``(sender, receiver) -> key`` and maybe the admin key."""

    world_size: int
    pairs: dict[tuple[int, int], SecretKey] = field(repr=False)
    admin: SecretKey | None = field(default=None, repr=False)

    def pair(self, sender: int, receiver: int) -> bytes:
        """``K[sender][receiver]``; :class:`AuthError` if this keyring does not hold it."""
        try:
            return self.pairs[(sender, receiver)].reveal()
        except KeyError:
            raise AuthError(f"no key for updates from rank {sender} to rank {receiver} in this key file") from None

    def admin_key(self) -> bytes:
        if self.admin is None:
            raise AuthError("this key file holds no admin key")
        return self.admin.reveal()

    def for_rank(self, rank: int) -> "Keyring":
        """The subset rank ``rank`` needs: its row, its column, and the admin key on rank 0."""
        pairs = {(i, j): k for (i, j), k in self.pairs.items() if rank in (i, j)}
        return Keyring(self.world_size, pairs, self.admin if rank == 0 else None)


def generate_keyring(world_size: int) -> Keyring:
    """Fresh random keys for ``world_size`` ranks (``secrets.token_bytes``)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pairs = {(i, j): SecretKey(secrets.token_bytes(KEY_BYTES)) for i in range(world_size) for j in range(world_size)}
    return Keyring(world_size, pairs, SecretKey(secrets.token_bytes(KEY_BYTES)))


def write_keyring(path: Path, keyring: Keyring, *, overwrite: bool = False) -> Path:
    """Write ``keyring`` as JSON with mode 0600 (created that way, never world-readable).

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    data = {"format": KEY_FORMAT, "world_size": keyring.world_size,
            "admin": keyring.admin.reveal().hex() if keyring.admin else None,
            "pairs": {f"{i},{j}": k.reveal().hex() for (i, j), k in sorted(keyring.pairs.items())}}
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def load_keyring(path: Path) -> Keyring:
    """Read a key file. :class:`AuthError` if it is missing, readable by group or others
    (like ssh, a key file must be 0600 or stricter), or malformed."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AuthError(f"{path}: key file not found") from None
    if mode & 0o077:
        raise AuthError(f"{path}: key file is accessible by group or others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        data = json.loads(path.read_text())
        pairs = {}
        for name, hexkey in data["pairs"].items():
            i, j = (int(x) for x in name.split(","))
            pairs[(i, j)] = SecretKey(bytes.fromhex(hexkey))
        admin = SecretKey(bytes.fromhex(data["admin"])) if data.get("admin") else None
        if data.get("format") != KEY_FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return Keyring(int(data["world_size"]), pairs, admin)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AuthError(f"{path}: not a fedgspo key file ({type(err).__name__})") from None


# -- authenticated updates -------------------------------------------------------------------------

def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of the raw bytes of ``tensor``: zero-copy for a contiguous CPU tensor (a
    non-contiguous or device tensor is copied to contiguous CPU memory first)."""
    flat = tensor.detach()
    if flat.device.type != "cpu" or not flat.is_contiguous():
        flat = flat.to("cpu").contiguous()
    return hashlib.sha256(memoryview(flat.reshape(-1).view(torch.uint8).numpy())).digest()


class UpdateAuthenticator:
    """Tags and checks one rank's updates with the pair keys of a :class:`Keyring`.

    ``run_id`` binds tags to one run (tags of another run with the same keys do not verify).
    ``sign_*`` needs ``K[rank][*]``, ``verify_*`` needs ``K[*][rank]``; a missing key raises
    :class:`AuthError`. ``verify_*`` return False (never raise) on a bad tag; the caller
    must exclude that sender's update and audit an ``auth_failure``.
    """

    def __init__(self, keyring: Keyring, rank: int, run_id: str = "") -> None:
        self.keyring, self.rank, self.world_size = keyring, rank, keyring.world_size
        self._run = hashlib.sha256(run_id.encode()).digest()

    def __repr__(self) -> str:
        return f"UpdateAuthenticator(rank={self.rank}, world_size={self.world_size}, keys=<redacted>)"

    def _tag(self, key: bytes, kind: int, step: int, sender: int, receiver: int, shard: int,
             nbytes: int, digest: bytes) -> bytes:
        msg = _DOMAIN + self._run + struct.pack(">BqiiiQ", kind, step, sender, receiver, shard, nbytes) + digest
        return hmac.new(key, msg, hashlib.sha256).digest()

    def sign_full(self, update: torch.Tensor, step: int) -> torch.Tensor:
        """``(world_size, 32)`` uint8 tags of this rank's whole update, one per receiver (the
        update is hashed once)."""
        digest, nbytes = tensor_digest(update), update.numel() * update.element_size()
        rows = [self._tag(self.keyring.pair(self.rank, j), _FULL, step, self.rank, j, -1, nbytes, digest)
                if j != self.rank else bytes(TAG_BYTES) for j in range(self.world_size)]
        return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(self.world_size, TAG_BYTES)

    def verify_full(self, update: torch.Tensor, sender: int, step: int, tag: torch.Tensor | bytes) -> bool:
        """Whether ``tag`` is ``sender``'s tag of ``update`` at ``step`` addressed to this rank."""
        nbytes = update.numel() * update.element_size()
        expected = self._tag(self.keyring.pair(sender, self.rank), _FULL, step, sender, self.rank, -1,
                             nbytes, tensor_digest(update))
        return hmac.compare_digest(expected, _as_bytes(tag))

    def sign_shards(self, shards: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        """``(world_size, 32)`` uint8 tags: row ``j`` signs ``shards[j]``, sent to rank ``j``."""
        if len(shards) != self.world_size:
            raise ValueError(f"expected {self.world_size} shards, got {len(shards)}")
        rows = [self._tag(self.keyring.pair(self.rank, j), _SHARD, step, self.rank, j, j,
                          s.numel() * s.element_size(), tensor_digest(s)) if j != self.rank else bytes(TAG_BYTES)
                for j, s in enumerate(shards)]
        return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(self.world_size, TAG_BYTES)

    def verify_shard(self, shard: torch.Tensor, sender: int, step: int, tag: torch.Tensor | bytes) -> bool:
        """Whether ``tag`` is ``sender``'s tag of the shard it sent to this rank at ``step``."""
        expected = self._tag(self.keyring.pair(sender, self.rank), _SHARD, step, sender, self.rank, self.rank,
                             shard.numel() * shard.element_size(), tensor_digest(shard))
        return hmac.compare_digest(expected, _as_bytes(tag))

    # -- fedgspo.robust.authentication.ExchangeAuthenticator ---------------------------------

    def check(self, rank: int, world_size: int) -> None:
        """``ValueError`` unless this authenticator is ``rank``'s of ``world_size`` and holds the
        pair keys to sign for and verify from every other rank."""
        if self.world_size != world_size or self.rank != rank:
            raise ValueError(f"authenticator is for rank {self.rank} of {self.world_size}, "
                             f"but this is rank {rank} of {world_size}")
        try:
            for other in range(world_size):
                if other != rank:
                    self.keyring.pair(rank, other)
                    self.keyring.pair(other, rank)
        except AuthError as err:
            raise ValueError(str(err)) from None

    def rejected_senders(self, sent: torch.Tensor, received: torch.Tensor, *, step: int, replicated: bool,
                         group: dist.ProcessGroup | None) -> list[int]:
        """Senders whose update to this rank fails its tag (collective: one tag all-gather)."""
        if replicated:
            tags = exchange_tags(self.sign_full(sent, step), group)
            return [i for i in range(self.world_size)
                    if i != self.rank and not self.verify_full(received[i], i, step, tags[i, self.rank])]
        return verify_shards(self, sent, received, step, group)


def _as_bytes(tag: torch.Tensor | bytes) -> bytes:
    return tag if isinstance(tag, bytes) else bytes(tag.contiguous().numpy())


def exchange_tags(tags: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather every rank's ``(n, 32)`` tags into ``(n, n, 32)`` indexed ``[sender, receiver]``.

    Collective over ``group`` (``n * n * 32`` bytes; tags are not secret; on the current CUDA
    device for an nccl group, returned on the CPU). Single process: returns ``tags[None]``.
    Failure: collective errors propagate (the step cannot continue).
    """
    if not dist.is_initialized():
        return tags.unsqueeze(0)
    n = dist.get_world_size(group)
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    out = torch.empty(n * tags.numel(), dtype=torch.uint8, device=device)
    all_gather_single(out, tags.contiguous().view(-1).to(device), group=group)
    return out.view(n, *tags.shape).cpu()


def verify_gathered(auth: UpdateAuthenticator, gathered: torch.Tensor | Sequence[torch.Tensor], step: int,
                    group: dist.ProcessGroup | None = None) -> list[int]:
    """Replicated mode: every rank holds every full update (``gathered[i]`` from rank ``i``).

    Signs this rank's own row, exchanges tags (one tiny all_gather), and checks every other
    row. Returns the senders whose update failed (sorted; empty when all verify). Collective:
    every rank of ``group`` calls at the same step. The caller must leave the failed senders
    out of the aggregate (e.g. ``robust_all_reduce(..., exclude=failed)``) and audit them.
    """
    tags = exchange_tags(auth.sign_full(gathered[auth.rank], step), group)
    return [i for i in range(len(gathered))
            if i != auth.rank and not auth.verify_full(gathered[i], i, step, tags[i, auth.rank])]


def verify_shards(auth: UpdateAuthenticator, sent: torch.Tensor | Sequence[torch.Tensor],
                  received: torch.Tensor | Sequence[torch.Tensor], step: int,
                  group: dist.ProcessGroup | None = None) -> list[int]:
    """Sharded mode: ``sent[j]`` is the shard this rank sent to rank ``j``, ``received[i]`` the
    shard it received from rank ``i``. Signs the outgoing shards, exchanges tags, and returns
    the senders whose shard failed. Collective; same caller duties as :func:`verify_gathered`
    (a failing sender's shard row must be left out of this rank's local aggregate).
    """
    tags = exchange_tags(auth.sign_shards(list(sent), step), group)
    return [i for i in range(len(received))
            if i != auth.rank and not auth.verify_shard(received[i], i, step, tags[i, auth.rank])]


def audit_auth_failures(audit: AuditSink | None, failed: Sequence[int], *, step: int, mode: str) -> None:
    """Record one ``auth_failure`` per failing sender (no-op off rank 0, where ``audit`` is None)."""
    if audit is None:
        return
    for sender in failed:
        audit.append(AUTH_FAILURE, {"subject_rank": sender, "mode": mode}, step=step, rank=sender)


# -- operator requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OperatorRequest:
    """A verified operator action for a running job."""

    action: str
    args: dict[str, Any]
    nonce: str
    created: float


def _request_mac(admin: bytes, body: dict[str, Any]) -> str:
    return hmac.new(admin, b"fedgspo-request-v1" + canonical_json(body), hashlib.sha256).hexdigest()


def write_request(run_dir: Path, admin_key: bytes, action: str, args: dict[str, Any]) -> Path:
    """Write a signed request into ``run_dir/requests/`` atomically; returns its path.

    ``ValueError`` for an unknown action; ``FileNotFoundError`` if ``run_dir`` does not exist.
    The request binds the run directory's name, a random nonce and the creation time.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    body = {"action": action, "args": args, "nonce": secrets.token_hex(16), "created": time.time(),
            "run": run_dir.resolve().name}
    inbox = run_dir / REQUESTS
    inbox.mkdir(exist_ok=True)
    path = inbox / f"{time.time_ns()}-{body['nonce']}.json"
    write_json_atomic(path, body | {"mac": _request_mac(admin_key, body)})
    return path


class RequestInbox:
    """Rank 0's view of ``run_dir/requests/``: verifies, audits and files each request once.

    :meth:`poll` returns the accepted requests, oldest first, and moves every request file to
    ``requests/done/`` or ``requests/rejected/``. Rejected: unreadable, unsigned or badly
    signed, for another run, older than ``max_age_s``, from the future, replayed (nonce seen),
    or an unknown action; each rejection is audited as ``request_rejected`` and never raises.
    """

    def __init__(self, run_dir: Path, admin_key: bytes, audit: AuditSink | None, *,
                 max_age_s: float = 86400.0) -> None:
        self.run_dir, self._key, self.audit, self.max_age_s = Path(run_dir), admin_key, audit, max_age_s
        self.inbox = self.run_dir / REQUESTS
        self._seen = {p.stem.partition("-")[2] for p in (self.inbox / "done").glob("*.json")}

    def __repr__(self) -> str:
        return f"RequestInbox({str(self.inbox)!r}, key=<redacted>)"

    def _check(self, path: Path) -> OperatorRequest | str:
        """The request in ``path``, or the reason it is rejected."""
        try:
            data = json.loads(path.read_text())
            mac = data.pop("mac", None)
            body = {k: data[k] for k in ("action", "args", "nonce", "created", "run")}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return "unreadable or incomplete request"
        if set(data) != set(body):
            return "unexpected fields"
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _request_mac(self._key, body)):
            return "missing or bad signature"
        now = time.time()
        if body["run"] != self.run_dir.resolve().name:
            return f"addressed to run {body['run']!r}"
        if not isinstance(body["created"], (int, float)) or not now - self.max_age_s <= body["created"] <= now + 60:
            return "stale or from the future"
        if body["nonce"] in self._seen:
            return "replayed (nonce already used)"
        if body["action"] not in ACTIONS or not isinstance(body["args"], dict):
            return f"unknown action {body['action']!r}"
        return OperatorRequest(body["action"], body["args"], body["nonce"], float(body["created"]))

    def poll(self, step: int | None = None) -> list[OperatorRequest]:
        """Verify and file every pending request (rank 0, at a step boundary)."""
        if not self.inbox.is_dir():
            return []
        accepted: list[OperatorRequest] = []
        for path in sorted(self.inbox.glob("*.json")):
            outcome = self._check(path)
            folder = self.inbox / ("done" if isinstance(outcome, OperatorRequest) else "rejected")
            folder.mkdir(exist_ok=True)
            os.replace(path, folder / path.name)
            if isinstance(outcome, OperatorRequest):
                self._seen.add(outcome.nonce)
                accepted.append(outcome)
                record = (OPERATOR_REQUEST, {"action": outcome.action, "args": outcome.args, "nonce": outcome.nonce})
            else:
                record = (REQUEST_REJECTED, {"file": path.name, "reason": outcome})
            if self.audit is not None:
                self.audit.append(*record, step=step)
        return accepted


def poll_requests(inbox: RequestInbox | None, step: int) -> list[OperatorRequest]:
    """Rank 0 polls ``inbox`` and every rank receives the same accepted requests.

    Collective: every rank calls at the same step boundary (``inbox`` is None off rank 0).
    Apply the returned actions before the next step so all ranks change together.
    """
    accepted = inbox.poll(step) if inbox is not None else []
    shared = broadcast_json([dataclasses.asdict(r) for r in accepted])
    if not isinstance(shared, list):
        raise AuthError("operator requests from rank 0 are malformed")
    return [_request_from_json(item) for item in shared]


def _request_from_json(item: Any) -> OperatorRequest:
    """An :class:`OperatorRequest` from its broadcast JSON form; :class:`AuthError` unless it
    has exactly the request's fields with their types and a known action."""
    if (not isinstance(item, dict) or set(item) != {"action", "args", "nonce", "created"}
            or item["action"] not in ACTIONS or not isinstance(item["args"], dict)
            or not isinstance(item["nonce"], str) or not isinstance(item["created"], (int, float))):
        raise AuthError(f"operator request from rank 0 is malformed: {str(item)[:200]}")
    return OperatorRequest(item["action"], item["args"], item["nonce"], float(item["created"]))
