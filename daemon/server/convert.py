"""Conversions between ckptd.v1 protobuf messages and the engine's domain records.

Only wire-level facts are checked here (enum values the table knows, the ``nbytes`` a
client announces against its dtype and shape); everything else about a request (names,
limits, step order) is the engine's to judge. Errors are ``InvalidRequestError`` naming the
tensor and the offending value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

from ckptd.daemon.domain import (
    CheckpointHeader,
    Policy,
    RestoredCheckpoint,
    RetentionPolicy,
    RunInfo,
    SaveStatus,
    StepKey,
    StreamedCheckpoint,
    TensorSpec,
)
from ckptd.daemon.errors import InvalidRequestError
from ckptd.protos import dtypes, streams
from ckptd.protos.records import SaveState, StepInfo
from ckptd.protos.v1 import pb

_POLICY_FROM_WIRE = {
    pb.POLICY_UNSPECIFIED: Policy.AUTO,
    pb.POLICY_LOSSY: Policy.LOSSY,
    pb.POLICY_EXACT: Policy.EXACT,
    pb.POLICY_LOSSY_LOG: Policy.LOSSY_LOG,
    pb.POLICY_LOSSY_SCALED: Policy.LOSSY_SCALED,
}
_POLICY_TO_WIRE = {policy: wire for wire, policy in _POLICY_FROM_WIRE.items()}
_STATE_TO_WIRE = {
    SaveState.ACCEPTED: pb.SAVE_STATE_ACCEPTED,
    SaveState.ENCODING: pb.SAVE_STATE_ENCODING,
    SaveState.WRITING: pb.SAVE_STATE_WRITING,
    SaveState.DURABLE: pb.SAVE_STATE_DURABLE,
    SaveState.FAILED: pb.SAVE_STATE_FAILED,
}
MAX_DIMS = 32
MAX_ARRAY_BYTES = 2**63 - 1
_KIND_TO_WIRE = {"base": pb.STEP_KIND_BASE, "delta": pb.STEP_KIND_DELTA}


def key_from_ref(ref: pb.StepRef) -> StepKey:
    return StepKey(run=ref.run, rank=ref.rank, step=ref.step)


def ref_from_key(key: StepKey) -> pb.StepRef:
    return pb.StepRef(run=key.run, rank=key.rank, step=key.step)


def spec_from_proto(index: int, spec: pb.TensorSpec) -> TensorSpec:
    """Converts one table entry; raises ``InvalidRequestError`` for unknown enums or sizes
    that contradict the dtype and shape."""
    label = f"tensor {index} ({spec.name[:64]!r})"
    try:
        info = dtypes.from_wire(spec.dtype)
    except ValueError as exc:
        raise InvalidRequestError(f"{label}: {exc}") from None
    policy = _POLICY_FROM_WIRE.get(spec.policy)
    if policy is None:
        raise InvalidRequestError(
            f"{label}: unknown policy value {spec.policy}; expected 0 (unspecified: the daemon "
            "decides), 1 (lossy), 2 (exact), 3 (lossy-log), 4 (lossy-scaled)"
        )
    if any(dim < 0 for dim in spec.shape):
        raise InvalidRequestError(f"{label}: negative dimension in shape {list(spec.shape)}")
    _check_shape_fits(label, tuple(spec.shape), info.itemsize)
    if spec.HasField("bits") and spec.bits == 0:
        raise InvalidRequestError(
            f"{label}: bits 0 is not a bit width; give 1..8, or leave bits unset for the "
            "daemon's default"
        )
    converted = TensorSpec(
        name=spec.name, dtype=info.name, shape=tuple(spec.shape), policy=policy, bits=spec.bits
    )
    if converted.nbytes != spec.nbytes:
        raise InvalidRequestError(
            f"{label}: nbytes {spec.nbytes} contradicts dtype {info.name} and shape "
            f"{list(spec.shape)}, which hold {converted.nbytes} bytes"
        )
    return converted


def _check_shape_fits(label: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuses shapes no array can have (numpy's limits), e.g. ``[0, 2**63-1]``: empty, yet
    a restore could never allocate it, so it would fail only after being stored."""
    if len(shape) > MAX_DIMS:
        raise InvalidRequestError(
            f"{label}: shape has {len(shape)} dimensions; the limit is {MAX_DIMS}")
    # numpy bounds the product of the non-zero dimensions, in bytes, even for empty arrays.
    if math.prod(max(dim, 1) for dim in shape) * itemsize > MAX_ARRAY_BYTES:
        shown = str(list(shape))
        raise InvalidRequestError(
            f"{label}: shape {shown[:128]} is impossible: its dimensions multiply past "
            f"{MAX_ARRAY_BYTES} bytes"
        )


def spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=cast("pb.Dtype", spec.dtype_info.wire),
        shape=spec.shape,
        policy=_POLICY_TO_WIRE[spec.policy],
        bits=spec.bits or None,  # 0 in the domain: the daemon's default, absent on the wire
        nbytes=spec.nbytes,
    )


def header_from_proto(header: pb.SaveHeader) -> CheckpointHeader:
    """Converts a save header (its shared-memory reference, if any, is the servicer's)."""
    return CheckpointHeader(
        key=StepKey(run=header.run, rank=header.rank, step=header.step),
        tensors=tuple(spec_from_proto(i, spec) for i, spec in enumerate(header.tensors)),
        metadata=dict(header.metadata),
        fail_if_busy=header.fail_if_busy,
        metrics=dict(header.metrics),
        world_size=header.world_size,
        reshardable=header.reshardable,
    )


def status_to_proto(status: SaveStatus) -> pb.SaveStatus:
    return pb.SaveStatus(
        ref=ref_from_key(status.key), state=_STATE_TO_WIRE[status.state], error=status.error
    )


def run_info_to_proto(info: RunInfo) -> pb.RunInfo:
    return pb.RunInfo(
        run=info.run,
        rank=info.rank,
        step_count=info.step_count,
        latest_step=info.latest_step,
        stored_bytes=info.stored_bytes,
        retention=info.retention.to_message() if info.retention else None,
        hidden_steps=info.hidden_steps,
        hidden_bytes=info.hidden_bytes,
    )


def retention_from_proto(message: pb.RetentionPolicy) -> RetentionPolicy:
    """Raises ``InvalidRequestError`` naming a rule the policy cannot have."""
    try:
        return RetentionPolicy.from_message(message)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def step_info_to_proto(info: StepInfo) -> pb.StepInfo:
    return pb.StepInfo(
        step=info.step,
        kind=_KIND_TO_WIRE.get(info.kind, pb.STEP_KIND_UNSPECIFIED),
        parent_step=info.parent_step,
        raw_bytes=info.raw_bytes,
        stored_bytes=info.stored_bytes,
        compression_ratio=info.compression_ratio,
        chain_depth=info.chain_depth,
        created_unix_s=info.created_unix_s,
        metrics=dict(info.metrics),
        world_size=info.world_size,
        missing_ranks=list(info.missing_ranks),
    )


def restore_header_to_proto(
    restored: RestoredCheckpoint | StreamedCheckpoint,
) -> pb.RestoreHeader:
    return pb.RestoreHeader(
        ref=ref_from_key(restored.key),
        tensors=[spec_to_proto(spec) for spec in restored.tensors],
        metadata=dict(restored.metadata),
        checksum=restored.checksum,
    )


def restore_chunks(restored: RestoredCheckpoint, max_chunk_bytes: int) -> Iterator[bytes]:
    """Yields every tensor's bytes in table order, in chunks of at most ``max_chunk_bytes``,
    each already a serialized ``RestoreResponse{chunk}`` (``streams.encode_chunk``: one
    copy of the bytes, where a ``TensorChunk`` message costs two)."""
    for index, array in enumerate(restored.arrays):
        # reshape(-1) keeps 0-d arrays viewable; the arrays are C-contiguous by contract.
        with array.reshape(-1).data.cast("B") as raw:
            for offset in range(0, len(raw), max_chunk_bytes):
                yield streams.encode_chunk(index, offset, raw[offset : offset + max_chunk_bytes])
