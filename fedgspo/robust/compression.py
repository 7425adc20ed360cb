"""Compression of the updates a robust all-reduce moves, and error feedback for its caller.

Codecs (:data:`CODECS`):

* ``none``: the update travels in its own dtype.
* ``bf16``: the update travels (and is aggregated) as bfloat16: half the bytes of float32,
  a relative error of at most 2^-8 per element.
* ``int8``: the update is cut into chunks of :data:`INT8_CHUNK` elements; each chunk travels
  as one float32 scale (its largest magnitude / 127) and one signed byte per element. About a
  quarter of float32's bytes; the error per element is at most half a step, ``scale / 2``.

What arrives from another rank is hostile: an int8 payload has a fixed length (checked by the
exchange's metadata before any data moves), every byte pattern of a code is a valid value, and
a scale that is not finite or is negative decodes as 0, so a decoded update is always finite
and no larger than ``127 * max(finite scale)``; the robust rule then deals with it like any
other Byzantine update.

Compression and detection: quantisation adds noise of at most ``scale / 2`` per element to
every update, honest or not. Detection (:mod:`fedgspo.robust.detection`) measures distances
to the robust aggregate relative to the honest ranks' own spread, so noise that is small
against that spread (int8: ``absmax / 254`` per chunk) leaves the z-scores where they were;
when honest updates differ by less than the quantisation step (nearly identical updates with
large outliers in a chunk), the noise dominates the spread and distances say less.
"""

from __future__ import annotations

import math

import torch

CODECS = ("none", "bf16", "int8")
#: Elements per int8 chunk (one float32 scale each: 1.6 % overhead).
INT8_CHUNK = 256


def payload_numel(codec: str, numel: int) -> int:
    """Bytes of one encoded update of ``numel`` elements (``codec`` ``int8``)."""
    if codec != "int8":
        raise ValueError(f"codec {codec!r} has no byte payload")
    return numel + 4 * math.ceil(numel / INT8_CHUNK)


def encode_int8(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (1-D, floating) as a uint8 payload: the chunk scales (float32), then the codes."""
    numel = flat.numel()
    chunks = math.ceil(numel / INT8_CHUNK)
    padded = torch.zeros(chunks * INT8_CHUNK, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat.float()
    blocks = padded.view(chunks, INT8_CHUNK)
    scales = blocks.abs().amax(dim=1) / 127.0
    codes = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    out = torch.empty(payload_numel("int8", numel), dtype=torch.uint8, device=flat.device)
    out[: 4 * chunks] = scales.view(torch.uint8)
    out[4 * chunks:] = codes.reshape(-1)[:numel].to(torch.int8).view(torch.uint8)
    return out


def decode_int8(payload: torch.Tensor, numel: int) -> torch.Tensor:
    """The float32 update of ``numel`` elements a payload of :func:`encode_int8` carries.
    Raises ``ValueError`` on a payload of the wrong length; non-finite or negative scales
    decode as 0 (the payload is never trusted)."""
    if payload.numel() != payload_numel("int8", numel) or payload.dtype != torch.uint8:
        raise ValueError(f"int8 payload of {payload.numel()} bytes for {numel} elements "
                         f"(expected {payload_numel('int8', numel)})")
    chunks = math.ceil(numel / INT8_CHUNK)
    scales = payload[: 4 * chunks].clone().view(torch.float32)  # a copy: a row may start unaligned
    scales[~torch.isfinite(scales) | (scales < 0)] = 0.0
    codes = payload[4 * chunks:].contiguous().view(torch.int8).float()
    padded = torch.zeros(chunks * INT8_CHUNK, dtype=torch.float32, device=payload.device)
    padded[:numel] = codes
    return (padded.view(chunks, INT8_CHUNK) * scales[:, None]).reshape(-1)[:numel]


def decode_int8_rows(payloads: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``(n, numel)`` float32 updates of ``n`` stacked payloads (one per row), each decoded
    by :func:`decode_int8` (same failure behaviour)."""
    return torch.stack([decode_int8(row, numel) for row in payloads])


def round_trip(codec: str, flat: torch.Tensor) -> torch.Tensor:
    """What the receivers of ``flat`` decode under ``codec`` (a new float tensor of ``flat``'s
    dtype): the value error feedback compares against."""
    if codec == "none":
        return flat.clone()
    if codec == "bf16":
        return flat.to(torch.bfloat16).to(flat.dtype)
    if codec == "int8":
        return decode_int8(encode_int8(flat), flat.numel()).to(flat.dtype)
    raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")


class ErrorFeedback:
    """Error feedback (EF-SGD) for a lossy codec: what compression dropped from this rank's
    update is added to its next one, so nothing is lost for good.

    Call :meth:`compensate` on the update before it is sent (returns the update plus the
    carried error and remembers the new error); the carried error is part of the state a
    checkpoint must keep (:meth:`state_dict`)."""

    def __init__(self, codec: str, numel: int, device: torch.device | str = "cpu") -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
        self.codec = codec
        self.residual = torch.zeros(numel, dtype=torch.float32, device=device)

    def compensate(self, update: torch.Tensor) -> torch.Tensor:
        """``update + residual`` (to send, a new tensor); the residual becomes what the codec
        will drop from it."""
        corrected = update.float() + self.residual
        self.residual = corrected - round_trip(self.codec, corrected)
        return corrected.to(update.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        residual = state["residual"]
        if residual.shape != self.residual.shape:
            raise ValueError(f"error-feedback residual of shape {tuple(residual.shape)}, "
                             f"expected {tuple(self.residual.shape)}")
        self.residual = residual.to(self.residual.device, torch.float32).clone()
