"""Checks of a save's header against the daemon's limits, before any byte is reserved.

Each check raises ``InvalidRequestError`` with the offending name or value and the limit,
so that a client (in any language) can tell its user what to change.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Literal

from ckptd.daemon.config import AUTO_BITS, EngineConfig
from ckptd.daemon.domain import CheckpointHeader, Policy, TensorSpec
from ckptd.daemon.errors import InvalidRequestError
from ckptd.protos import dtypes
from ckptd.protos.names import MAX_STEP, run_name_problem

MAX_BITS = 8
# The policies that are always lossy, and the codec domain of those that are not linear.
_LOSSY = frozenset({Policy.LOSSY, Policy.LOSSY_LOG, Policy.LOSSY_SCALED})
_DOMAINS = {Policy.LOSSY_LOG: "log", Policy.LOSSY_SCALED: "scaled"}


def check_run_name(run: str) -> None:
    """Run names become storage path segments: 1-128 of ``[A-Za-z0-9._-]``, no leading '.'."""
    if (problem := run_name_problem(run)) is not None:
        raise InvalidRequestError(problem)


def check_key(run: str, rank: int, step: int | None = None) -> None:
    check_run_name(run)
    if rank < 0:
        raise InvalidRequestError(f"invalid rank {rank}: must be >= 0")
    if step is not None and not 0 <= step <= MAX_STEP:
        raise InvalidRequestError(f"invalid step {step}: must be in 0..{MAX_STEP}")


def check_header(header: CheckpointHeader, config: EngineConfig) -> None:
    """Raises ``InvalidRequestError`` naming the first problem of ``header``."""
    key = header.key
    check_key(key.run, key.rank, key.step)
    if len(header.tensors) > config.max_tensors:
        raise InvalidRequestError(
            f"save {key} has {len(header.tensors)} tensors; the limit is {config.max_tensors} "
            "(max_tensors)"
        )
    seen: set[str] = set()
    for spec in header.tensors:
        _check_spec(spec, config)
        if spec.name in seen:
            raise InvalidRequestError(f"save {key} names tensor {spec.name!r} twice")
        seen.add(spec.name)
    _check_metadata(header, config)
    _check_size(header, config)


def _check_spec(spec: TensorSpec, config: EngineConfig) -> None:
    if not spec.name:
        raise InvalidRequestError("tensor name is empty; every tensor needs a unique name")
    if len(spec.name) > config.max_name_chars:
        raise InvalidRequestError(
            f"tensor name {spec.name[:64]!r}... has {len(spec.name)} characters; the limit is "
            f"{config.max_name_chars} (max_name_chars)"
        )
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in spec.name):
        raise InvalidRequestError(f"tensor name {spec.name!r} contains control characters")
    try:
        info = spec.dtype_info
    except ValueError as exc:
        raise InvalidRequestError(f"tensor {spec.name!r}: {exc}") from None
    if any(dim < 0 for dim in spec.shape):
        raise InvalidRequestError(
            f"tensor {spec.name!r} has shape {list(spec.shape)}; dimensions must be >= 0"
        )
    if not isinstance(spec.policy, Policy):
        raise InvalidRequestError(f"tensor {spec.name!r} has unknown policy {spec.policy!r}")
    if spec.policy in _LOSSY and not info.is_float:
        raise InvalidRequestError(
            f"tensor {spec.name!r} asks for a lossy policy but has dtype {info.name}; lossy "
            "compression applies to float tensors only (use exact or auto)"
        )
    if not 0 <= spec.bits <= MAX_BITS:
        raise InvalidRequestError(
            f"tensor {spec.name!r} asks for {spec.bits} bits; use 1..{MAX_BITS}, or 0 for the "
            f"daemon's default "
            f"({'auto' if config.default_bits == AUTO_BITS else config.default_bits})"
        )


def _check_metadata(header: CheckpointHeader, config: EngineConfig) -> None:
    size = 0
    for name, value in header.metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequestError(f"metadata entry {name!r} must map a string to a string")
        size += len(name.encode("utf-8", "surrogatepass")) + len(
            value.encode("utf-8", "surrogatepass")
        )
    for name, number in header.metrics.items():
        if not name or not math.isfinite(number):
            raise InvalidRequestError(
                f"save {header.key} has metric {name[:64]!r} = {number}; metrics need a "
                "name and a finite value")
        size += len(name.encode("utf-8", "surrogatepass")) + 8
    if size > config.max_metadata_bytes:
        raise InvalidRequestError(
            f"save {header.key} has {size} bytes of metadata; the limit is "
            f"{config.max_metadata_bytes} (max_metadata_bytes)"
        )


def _check_size(header: CheckpointHeader, config: EngineConfig) -> None:
    nbytes = header.nbytes
    if nbytes > config.max_checkpoint_bytes:
        raise InvalidRequestError(
            f"save {header.key} holds {nbytes} bytes; the limit is "
            f"{config.max_checkpoint_bytes} (max_checkpoint_bytes)"
        )
    if nbytes > config.max_inflight_bytes:
        raise InvalidRequestError(
            f"save {header.key} holds {nbytes} bytes, more than the whole in-flight budget of "
            f"{config.max_inflight_bytes} bytes (max_inflight_bytes), so it could never be "
            "admitted; raise max_inflight_bytes or split the state across ranks"
        )


def is_lossy(spec: TensorSpec, config: EngineConfig) -> bool:
    """Per-tensor policy: AUTO is lossy for float tensors of at least min_lossy_elements."""
    info: dtypes.DTypeInfo = spec.dtype_info
    if spec.policy is Policy.EXACT or not info.is_float:
        return False
    if spec.policy in _LOSSY:
        return True
    return spec.numel >= config.min_lossy_elements


def domain_for(spec: TensorSpec) -> str:
    """The codec domain of a lossy tensor: ``"log"`` for LOSSY_LOG, ``"scaled"`` for
    LOSSY_SCALED, else ``"linear"``."""
    return _DOMAINS.get(spec.policy, "linear")


def buckets_for(spec: TensorSpec, config: EngineConfig) -> int:
    """Buckets per octave of a lossy tensor's delta: the daemon's setting for the tensors it
    decides about (policy AUTO, linear domain), octaves (1) for a client's lossy rules."""
    return config.buckets_per_octave if spec.policy is Policy.AUTO else 1


def bits_for(spec: TensorSpec, config: EngineConfig) -> int | Literal["auto"]:
    """The tensor's bit width: its own, else the daemon's default (``"auto"`` for
    ``AUTO_BITS``: the codec picks per tensor and save)."""
    bits = spec.bits or config.default_bits
    return "auto" if bits == AUTO_BITS else bits
