"""Rollout verification in the manner of TOPLOC (Ong et al., 2025): a rank proves that its
completions and log-probs came from the shared model.

Prover. Each completion is cut into chunks of ``chunk_size`` tokens; per chunk the ``topk``
entries of largest magnitude of the model's last-layer hidden state at the chunk's last token
(the state *after* consuming that token, which attends to every earlier token, so every
token, the very last one included, influences some proven state) are kept as
``(index, float16 value)``: ``4k`` bytes per chunk plus an 8-byte header (:func:`build_proofs`).
The hidden states can come from any forward over prompt + completion with the rollout's
weights: the first training forward of a rollout with ``output_hidden_states=True`` (free),
or a separate no-grad prefill (:func:`prefill`).

Verifier. One no-grad prefill over the claimed prompt + completion (:func:`prefill`), then
:func:`check_proofs` accepts a completion when, in every chunk, the claimed indices overlap
the recomputed top-k by at least ``min_overlap``, every claimed value is within
``value_rtol * |v| + value_atol`` of the recomputed (float16-rounded) value, the claimed
old log-probs are within ``logp_atol`` of the prefill's, no token is implausible
(log-prob below ``min_token_logprob``), and the completion mask is well formed.

What it proves, and what not: a completion whose tokens or log-probs were changed after the
fact, or a proof copied from another completion, fails. A rank that fabricates tokens and
then runs the model honestly over them to build a consistent proof and log-probs passes the
hidden-state and log-prob checks; it is caught only when its tokens are implausible under
the model. See SECURITY.md.

How often. Each proved rollout, every rank commits its claim; a rank's rollout is then checked
(``proof.rate`` of its rows) every time until it has ``proof.clean_before_adaptive`` clean
checks in a row, and from then on with probability ``1 / proof.adaptive_every``, drawn from the
hash of every committed claim, and never more than ``adaptive_every - 1`` rollouts in a row
unchecked; a failed check returns it to every rollout (:class:`ProofSchedule`).

Defaults were set from measurements of honest float32 CPU noise between KV-cached generation
and a full prefill (max hidden-state difference ~1e-6, log-prob ~5e-7); float16 encoding adds
at most one float16 ulp (``2**-10`` relative). Recalibrate for bf16/GPU models with
``benchmarks/integrity.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from fedgspo.distributed import all_gather_bytes
from fedgspo.gspo.rollout import StopCondition, TextDecoder
from fedgspo.gspo.rollout import decode_hidden  # noqa: F401 - the prover's generation-path states

PROOF_VERSION = 1
_HEADER = struct.Struct("<BBHHH")  # version, index bytes, topk, chunk_size, chunks


class ProofError(ValueError):
    """A proof cannot be decoded (truncated, wrong version or shape)."""


class ProofConfig(BaseModel):
    """Rollout proofs: how they are built, how often they are checked, and the tolerances."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rate: float = Field(0.125, ge=0, le=1, description="Fraction of completions verified each rollout.")
    topk: int = Field(8, ge=1, le=1024, description="Hidden-state entries kept per chunk.")
    chunk_size: int = Field(32, ge=1, le=4096, description="Completion tokens per proof chunk.")
    min_overlap: float = Field(0.75, gt=0, le=1, description="Fraction of top-k indices that must match.")
    value_rtol: float = Field(2.0 ** -9, ge=0, description="Relative tolerance on a claimed value (2 fp16 ulps).")
    value_atol: float = Field(1e-4, ge=0, description="Absolute tolerance on a claimed value.")
    logp_atol: float = Field(1e-3, ge=0, description="Tolerance on a claimed old log-prob.")
    min_token_logprob: float = Field(-18.0, description="A token less likely than exp(this) is implausible.")
    adaptive_every: int = Field(
        1, ge=1, le=1024, description="k: a rank with a clean record has each rollout checked with probability "
                                      "1/k, drawn after every claim is committed, and never more than k - 1 rollouts "
                                      "in a row unchecked; 1 checks every rollout.")
    clean_before_adaptive: int = Field(
        8, ge=1, description="m: clean checks in a row before a rank's rollouts are checked at the adaptive rate; "
                             "any failed check starts the count again.")

    def schedule(self, world_size: int) -> "ProofSchedule":
        """A fresh :class:`ProofSchedule` for ``world_size`` ranks: every rollout checked."""
        return ProofSchedule(world_size, self)


@dataclass(frozen=True)
class ProofCheck:
    """The verdict on one completion; ``reason`` is empty when ``ok``."""

    ok: bool
    reason: str
    min_overlap: float  # worst chunk's index overlap (1.0 when there are no chunks)
    max_value_error: float  # worst |claimed - recomputed| / (rtol |v| + atol); <= 1 passes
    max_logp_error: float


@dataclass(frozen=True)
class Prefill:
    """What a verifier (or a prover without generation-time states) computes in one pass."""

    hidden: torch.Tensor  # (B, T, H) float32: last-layer state at each completion token
    logps: torch.Tensor  # (B, T) float32: log-prob of each completion token at the temperature


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
            temperature: float) -> Prefill:
    """One no-grad forward over left-padded prompt + completion (as in :mod:`fedgspo.gspo.rollout`).

    The model is put in eval mode for the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    use_cache=False, output_hidden_states=True)
    model.train(was_training)
    return prefill_from_outputs(out.hidden_states[-1], out.logits, input_ids, prompt_length, temperature)


def prefill_from_outputs(last_hidden: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor,
                         prompt_length: int, temperature: float) -> Prefill:
    """A :class:`Prefill` sliced from an existing forward's outputs (e.g. the first training
    forward of a rollout run with ``output_hidden_states=True``); detached, no extra pass."""
    completion = input_ids[:, prompt_length:]
    t = completion.shape[1]
    hidden = last_hidden[:, prompt_length:prompt_length + t].detach().float()
    scaled = logits[:, prompt_length - 1:prompt_length - 1 + t].detach().float() / temperature
    logps = F.log_softmax(scaled, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return Prefill(hidden, logps)


def _chunk_topk(hidden: torch.Tensor, mask: torch.Tensor, cfg: ProofConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, k)`` indices of the top-|.| entries of the state at the last real token of each
    chunk, and those ``(B, C, H)`` states (chunks past a completion's end repeat its last state
    and are not used)."""
    b, t, h = hidden.shape
    chunks = max(1, math.ceil(t / cfg.chunk_size))
    lengths = mask.sum(-1).long()
    ends = torch.arange(1, chunks + 1, device=hidden.device) * cfg.chunk_size
    last = (torch.minimum(ends.unsqueeze(0), lengths.unsqueeze(1)) - 1).clamp(min=0)
    states = hidden.gather(1, last.unsqueeze(-1).expand(b, chunks, h))
    index = states.abs().topk(min(cfg.topk, h), dim=-1, sorted=False).indices
    return index, states


def _index_bytes(hidden_size: int) -> int:
    return 2 if hidden_size <= 1 << 16 else 4


def build_proofs(hidden: torch.Tensor, completion_mask: torch.Tensor, cfg: ProofConfig) -> list[bytes]:
    """One proof per completion from ``(B, T, H)`` last-layer states at the completion tokens.

    ``completion_mask`` (B, T) marks the real tokens (1 up to and including EOS). A
    completion with ``n`` tokens gets ``ceil(n / chunk_size)`` chunks.
    """
    index, states = _chunk_topk(hidden.float(), completion_mask, cfg)
    values = states.gather(-1, index).to(torch.float16)
    width = _index_bytes(hidden.shape[-1])
    idx_np = index.to(torch.int32).numpy().astype("<u2" if width == 2 else "<u4")
    val_np = values.numpy().astype("<f2")
    lengths = completion_mask.sum(-1).long().tolist()
    proofs = []
    for row, n in enumerate(lengths):
        used = math.ceil(n / cfg.chunk_size)
        header = _HEADER.pack(PROOF_VERSION, width, index.shape[-1], cfg.chunk_size, used)
        proofs.append(header + idx_np[row, :used].tobytes() + val_np[row, :used].tobytes())
    return proofs


def decode_proof(proof: bytes, hidden_size: int, cfg: ProofConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, k)`` int64 indices and float32 values of a proof; :class:`ProofError` if it is
    malformed or was built with another ``topk``/``chunk_size``/hidden size."""
    if len(proof) < _HEADER.size:
        raise ProofError("proof shorter than its header")
    version, width, k, chunk, chunks = _HEADER.unpack_from(proof)
    expected_k = min(cfg.topk, hidden_size)
    if version != PROOF_VERSION or width != _index_bytes(hidden_size) or k != expected_k or chunk != cfg.chunk_size:
        raise ProofError(f"proof parameters (v{version}, k={k}, chunk={chunk}) do not match the verifier's")
    body = proof[_HEADER.size:]
    if len(body) != chunks * k * (width + 2):
        raise ProofError(f"proof body has {len(body)} bytes, expected {chunks * k * (width + 2)}")
    split = chunks * k * width
    idx = torch.frombuffer(bytearray(body[:split]), dtype=torch.uint16 if width == 2 else torch.uint32)
    val = torch.frombuffer(bytearray(body[split:]), dtype=torch.float16)
    if bool((idx.to(torch.int64) >= hidden_size).any()):
        raise ProofError("proof index out of range")
    return idx.to(torch.int64).view(chunks, k), val.float().view(chunks, k)


def _mask_problem(completion_ids: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor, pad_id: int) -> str:
    """Why ``mask`` is not ``1`` up to and including the first token where the completion
    ended (``ended``: bool per token, EOS or stop string), or to the end, else ''."""
    n = int(mask.sum())
    if not bool((mask[:n] == 1).all()) or bool((mask[n:] != 0).any()):
        return "completion mask is not a prefix mask"
    if bool((completion_ids[n:] != pad_id).any()):
        return "tokens after the completion are not padding"
    ends = ended[:n].nonzero()
    if len(ends) and int(ends[0]) != n - 1:
        return "completion continues after EOS or a stop string"
    if len(ends) == 0 and n != completion_ids.shape[0]:
        return "completion ends before EOS and before the length limit"
    return ""


def check_proofs(reference: Prefill, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                 claimed_logps: torch.Tensor, proofs: Sequence[bytes], cfg: ProofConfig, *,
                 eos_id: int | Sequence[int], pad_id: int, stop_strings: Sequence[str] = (),
                 tokenizer: TextDecoder | None = None) -> list[ProofCheck]:
    """Compare claims with a verifier's :class:`Prefill` of the same rows; one verdict per row.

    A completion must end exactly where :func:`fedgspo.gspo.rollout.generate` ends it with the
    same ``eos_id``, ``stop_strings`` and ``tokenizer``. Never raises on bad claims: a
    malformed proof is a failed check with its reason (``ValueError`` only for stop strings
    without a tokenizer).
    """
    mask = completion_mask.float()
    ended = StopCondition(eos_id, stop_strings, tokenizer).ended_at(completion_ids)
    h = reference.hidden.shape[-1]
    index, states = _chunk_topk(reference.hidden, mask, cfg)
    logp_err = ((claimed_logps.float() - reference.logps) * mask).abs()
    logp_err = logp_err + claimed_logps.float().abs() * (1 - mask)  # padding must claim 0
    results = []
    for row, proof in enumerate(proofs):
        n = int(mask[row].sum())
        max_logp = float(logp_err[row].max()) if logp_err.shape[1] else 0.0
        reason = _mask_problem(completion_ids[row], completion_mask[row], ended[row], pad_id)
        overlap, value_err = 1.0, 0.0
        if not reason:
            try:
                idx, val = decode_proof(proof, h, cfg)
            except ProofError as err:
                idx, val, reason = None, None, f"malformed proof: {err}"
        if not reason and idx.shape[0] != math.ceil(n / cfg.chunk_size):
            reason = f"proof has {idx.shape[0]} chunks for {n} tokens"
        if not reason and idx.shape[0]:
            mine = index[row, :idx.shape[0]]
            hits = (idx.unsqueeze(-1) == mine.unsqueeze(-2)).any(-1).float().mean(-1)
            overlap = float(hits.min())
            recomputed = states[row, :idx.shape[0]].gather(-1, idx).to(torch.float16).float()
            value_err = float(((val - recomputed).abs() / (cfg.value_rtol * recomputed.abs() + cfg.value_atol)).max())
            if overlap < cfg.min_overlap:
                reason = f"top-k indices overlap {overlap:.2f} < {cfg.min_overlap}"
            elif value_err > 1.0:
                reason = f"hidden-state values differ ({value_err:.1f}x the tolerance)"
        if not reason and max_logp > cfg.logp_atol:
            reason = f"claimed log-probs differ by {max_logp:.2e} > {cfg.logp_atol}"
        if not reason and n and float(reference.logps[row, :n].min()) < cfg.min_token_logprob:
            reason = "a token is implausible under the model"
        results.append(ProofCheck(not reason, reason, overlap, value_err, max_logp))
    return results


def select_rows(num_rows: int, rate: float, seed: bytes) -> list[int]:
    """Rows to verify: each row independently with probability ``rate``, decided by
    ``sha256(seed | row)``. Pass a seed the prover cannot know before committing its claims
    (e.g. the hash of every rank's gathered claims)."""
    threshold = rate * 2 ** 64
    return [r for r in range(num_rows)
            if int.from_bytes(hashlib.sha256(seed + r.to_bytes(8, "little")).digest()[:8], "little") < threshold]


def _draw(seed: bytes, label: bytes, index: int) -> float:
    """A uniform number in [0, 1) from ``sha256(seed | label | index)``."""
    digest = hashlib.sha256(seed + label + index.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") / 2 ** 64


class ProofSchedule:
    """Which ranks' rollouts are checked, rollout by rollout (``proof.adaptive_every`` k,
    ``proof.clean_before_adaptive`` m): every rollout until a rank has m clean checks in a row,
    then each rollout with probability 1/k (drawn from the seed of all committed claims, so no
    rank knows before committing whether its rollout will be checked) and at least every k-th;
    a failed check sets the rank back to every rollout.

    Every rank must hold the same schedule: it changes only through :meth:`record` with the
    agreed outcome of :func:`cross_verify` (and :meth:`load_state_dict`), and :meth:`examined`
    is a function of that state and the agreed seed.
    """

    def __init__(self, world_size: int, cfg: ProofConfig) -> None:
        self.cfg = cfg
        self.clean = [0] * world_size  # clean checks in a row, by rank
        self.unchecked = [0] * world_size  # rollouts in a row not checked, by rank

    def examined(self, seed: bytes) -> list[int]:
        """The ranks whose rollout committed under ``seed`` is checked."""
        k, m = self.cfg.adaptive_every, self.cfg.clean_before_adaptive
        return [r for r in range(len(self.clean))
                if self.clean[r] < m or self.unchecked[r] >= k - 1 or _draw(seed, b"rollout", r) < 1 / k]

    def record(self, examined: Sequence[int], failed: Sequence[int]) -> None:
        """Fold one verification's agreed outcome in: a failed rank starts over, a checked
        clean one adds to its record, an unchecked one to its run of unchecked rollouts."""
        for r in range(len(self.clean)):
            if r in failed:
                self.clean[r], self.unchecked[r] = 0, 0
            elif r in examined:
                self.clean[r], self.unchecked[r] = self.clean[r] + 1, 0
            else:
                self.unchecked[r] += 1

    def state_dict(self) -> dict[str, list[int]]:
        """The counters, by rank (JSON-serialisable)."""
        return {"clean": list(self.clean), "unchecked": list(self.unchecked)}

    def load_state_dict(self, state: dict[str, list[int]] | None) -> None:
        """Restore :meth:`state_dict` output. ``None`` (a checkpoint from before adaptive
        proofs) or a state of another world size leaves every rank at zero: checked every
        rollout until it earns its record again. ``ValueError`` if the state is malformed."""
        if state is None or len(state.get("clean", ())) != len(self.clean):
            self.clean, self.unchecked = [0] * len(self.clean), [0] * len(self.clean)
            return
        clean, unchecked = [int(c) for c in state["clean"]], [int(u) for u in state["unchecked"]]
        if len(unchecked) != len(clean) or min(clean + unchecked) < 0:
            raise ValueError("proof schedule state: counters must be non-negative, one of each per rank")
        self.clean, self.unchecked = clean, unchecked


# -- cross-rank verification ---------------------------------------------------------------------

@dataclass(frozen=True)
class RolloutClaim:
    """What a rank claims about its rollout: the rows, their old log-probs and their proofs."""

    input_ids: torch.Tensor  # (B, Lp + T) left-padded prompt, then completion
    attention_mask: torch.Tensor  # (B, Lp + T)
    completion_mask: torch.Tensor  # (B, T)
    old_logps: torch.Tensor  # (B, T)
    prompt_length: int
    proofs: list[bytes]

    def to_bytes(self) -> bytes:
        """A safetensors blob (no pickle: decoding untrusted claims runs no code)."""
        lengths = torch.tensor([len(p) for p in self.proofs], dtype=torch.int64)
        tensors = {"input_ids": self.input_ids.cpu().long().contiguous(),
                   "attention_mask": self.attention_mask.cpu().long().contiguous(),
                   "completion_mask": self.completion_mask.cpu().float().contiguous(),
                   "old_logps": self.old_logps.detach().cpu().float().contiguous(),
                   "proof_lengths": lengths,
                   "proofs": torch.frombuffer(bytearray(b"".join(self.proofs) or b"\0"), dtype=torch.uint8)}
        return save_safetensors_bytes(tensors, metadata={"prompt_length": str(self.prompt_length)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "RolloutClaim":
        """Inverse of :meth:`to_bytes`; :class:`ProofError` if the blob is not a consistent claim."""
        try:
            t = load_safetensors_bytes(blob)
            header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
            prompt_length = int(header["__metadata__"]["prompt_length"])
            ids, mask, cmask, logps = t["input_ids"], t["attention_mask"], t["completion_mask"], t["old_logps"]
            raw, lengths = bytes(t["proofs"].numpy()), t["proof_lengths"].tolist()
        except Exception as err:  # noqa: BLE001 - any decoding failure of untrusted bytes
            raise ProofError(f"undecodable claim ({type(err).__name__})") from None
        b, width = ids.shape if ids.dim() == 2 else (-1, -1)
        t_len = width - prompt_length
        if (mask.shape != ids.shape or cmask.shape != (b, t_len) or logps.shape != (b, t_len) or t_len < 0
                or len(lengths) != b or min(lengths, default=0) < 0 or sum(lengths) > len(raw)):
            raise ProofError("claim tensors have inconsistent shapes")
        offsets = [0, *itertools.accumulate(lengths)]
        return cls(ids, mask, cmask, logps, prompt_length, [raw[offsets[i]:offsets[i + 1]] for i in range(b)])


@dataclass(frozen=True)
class CrossVerification:
    """The outcome of :func:`cross_verify`, identical on every rank (except ``local``)."""

    failed: list[int]  # ranks whose checked rows did not all verify (accused by their verifier)
    checked: list[int]  # rows checked per target rank, by rank
    local: list[ProofCheck]  # this rank's verdicts on its target's selected rows
    examined: list[int]  # ranks whose rollout was checked this time (all, without a schedule)


def cross_verify(model: torch.nn.Module, claim: RolloutClaim, *, step: int, cfg: ProofConfig, temperature: float,
                 eos_id: int | Sequence[int], pad_id: int, stop_strings: Sequence[str] = (),
                 tokenizer: TextDecoder | None = None,
                 expected_prompt_ids: Callable[[int], torch.Tensor] | None = None,
                 schedule: ProofSchedule | None = None,
                 group: dist.ProcessGroup | None = None) -> CrossVerification:
    """Every rank commits its claim, then rank ``r`` checks sampled rows of rank ``(r+1) % n``.

    Call right after the rollout, before any optimizer step (the verifier's weights must be
    the rollout's). Collective: all ranks call at the same step. Steps: all-gather every
    claim (bytes only); the rows to check are drawn from the hash of all claims (no rank can
    know them before committing); one prefill over the selected rows; an all-gather of the
    verdicts. ``eos_id``, ``stop_strings`` and ``tokenizer`` are the rollout's (where a
    completion must end). ``expected_prompt_ids(rank)`` (optional) returns the ``(B, Lp)``
    prompt ids the task gives that rank; claims with other prompts fail. With a ``schedule``
    only the rollouts it selects from the claims' seed are checked (none: no verdict round);
    the caller must then :meth:`ProofSchedule.record` ``examined`` and ``failed`` on every rank.
    ``model`` may be the compiled loss forward (:func:`fedgspo.gspo.model.compile_forward`): the
    prefill is an ordinary no-grad forward.

    Failure behaviour: never raises on a bad claim (an undecodable claim is a failure of its
    sender); ``ValueError`` (on every rank, after the claims' all-gather) when ``schedule``
    was built for another world size. The caller must leave ``failed`` ranks out of this step's aggregation, audit a
    ``proof_failure`` per failed rank, and feed it to reputation; a failure is an accusation
    by one verifier (a Byzantine verifier can accuse falsely: treat it as a detection, not
    proof, unless rank 0 re-verifies).
    """
    blobs = all_gather_bytes(claim.to_bytes(), group)
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    world = len(blobs)
    target = (rank + 1) % world
    seed = hashlib.sha256(step.to_bytes(8, "little", signed=True) + b"".join(
        hashlib.sha256(b).digest() for b in blobs)).digest()
    if schedule is not None and len(schedule.clean) != world:
        raise ValueError(f"proof schedule holds {len(schedule.clean)} ranks, the group {world}")
    examined = list(range(world)) if schedule is None else schedule.examined(seed)
    if not examined:
        return CrossVerification([], [0] * world, [], [])
    local = [] if target not in examined else _check_target(
        model, blobs[target], target, seed, cfg, temperature, expected_prompt_ids,
        eos_id=eos_id, pad_id=pad_id, stop_strings=stop_strings, tokenizer=tokenizer)
    verdict = [target, int(any(not c.ok for c in local)), len(local)]
    table = all_gather_bytes(struct.pack("<iii", *verdict), group)
    failed, checked = set(), [0] * world
    for raw in table:
        tgt, bad, count = struct.unpack("<iii", raw)
        checked[tgt] = count
        if bad:
            failed.add(tgt)
    return CrossVerification(sorted(failed), checked, local, examined)


def _check_target(model: torch.nn.Module, blob: bytes, target: int, seed: bytes, cfg: ProofConfig,
                  temperature: float, expected_prompt_ids: Callable[[int], torch.Tensor] | None, *,
                  eos_id: int | Sequence[int], pad_id: int, stop_strings: Sequence[str],
                  tokenizer: TextDecoder | None) -> list[ProofCheck]:
    """This rank's verdicts on ``target``'s committed claim ``blob`` (its selected rows, or
    one failed verdict for an undecodable claim or wrong prompts); never raises on bad claims."""
    local: list[ProofCheck] = []
    try:
        theirs = RolloutClaim.from_bytes(blob)
        rows = select_rows(theirs.input_ids.shape[0], cfg.rate, seed + target.to_bytes(4, "little"))
        prompts_ok = expected_prompt_ids is None or _same_prompts(theirs, expected_prompt_ids(target))
        if not prompts_ok:
            local = [ProofCheck(False, "prompts differ from the task's", 0.0, math.inf, math.inf)]
        elif rows:
            sel = torch.tensor(rows)
            device = next(model.parameters()).device
            ref = prefill(model, theirs.input_ids[sel].to(device), theirs.attention_mask[sel].to(device),
                          theirs.prompt_length, temperature)
            ref = Prefill(ref.hidden.cpu(), ref.logps.cpu())
            local = check_proofs(ref, theirs.input_ids[sel, theirs.prompt_length:], theirs.completion_mask[sel],
                                 theirs.old_logps[sel], [theirs.proofs[r] for r in rows], cfg,
                                 eos_id=eos_id, pad_id=pad_id, stop_strings=stop_strings, tokenizer=tokenizer)
    except ProofError as err:
        local = [ProofCheck(False, str(err), 0.0, math.inf, math.inf)]
    return local


def _same_prompts(claim: RolloutClaim, expected: torch.Tensor) -> bool:
    """Whether the claim's prompt part equals ``expected`` repeated for each completion."""
    prompts = claim.input_ids[:, :claim.prompt_length]
    if expected.shape[1] != claim.prompt_length or prompts.shape[0] % max(1, expected.shape[0]):
        return False
    return torch.equal(prompts, expected.cpu().repeat_interleave(prompts.shape[0] // expected.shape[0], dim=0))
