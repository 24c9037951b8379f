"""Building the ``SaveHeader`` of one save: tensor table, policies, metadata, limits.

Checks the daemon's advertised limits before any byte is copied, so a state that can
never be accepted fails synchronously in ``save()`` with the sizes in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from ckptd.protos.v1 import pb

from .errors import InvalidCheckpointError
from .policies import PolicyRule, builtin_rules, resolve
from .structure import STRUCTURE_KEY, FlatState

RESERVED_PREFIX = "ckptd."
# A shared-memory save sends its header with the segment's reference added: a varint
# offset per tensor (at most 10 bytes) and the segment's name and size.
SHM_REFERENCE_BYTES_PER_TENSOR = 10
SHM_REFERENCE_BYTES = 256


class HeaderBuilder:
    """Turns flattened states into headers for one checkpointer (trainer thread only)."""

    def __init__(
        self, run: str, rank: int, rules: tuple[PolicyRule, ...], server: pb.ServerInfo,
        *, world_size: int = 0, reshardable: bool = False,
    ) -> None:
        self.run, self.rank = run, rank
        self.world_size = world_size  # 0: no world (``Checkpointer(world_size=...)``)
        self.reshardable = reshardable  # ckptd.client.dcp: DCP saves carry their layout
        self.rules = rules
        self.server = server
        # Tensor names repeat every save; matching globs once per (built-in set, name,
        # width, float or not) keeps save() cheap.
        self._policies: dict[tuple[str, str, int, bool], tuple[int, int]] = {}
        # The built-in set of the last structure seen: a trainer saves one structure.
        self._builtin: tuple[tuple[str, ...], tuple[str, tuple[PolicyRule, ...]]] | None = None

    def build(
        self, step: int, flat: FlatState, bits: int, metadata: Mapping[str, str] | None
    ) -> pb.SaveHeader:
        """Raises ``InvalidCheckpointError`` beyond the daemon's limits and ``ValueError``
        for malformed or reserved metadata."""
        self._check_limits(flat)
        # Which optimizer's built-in rules apply follows from the names alone: matched again
        # only when they change (the structure document changes with every Python scalar
        # in the state, a step counter or a scheduler's lr, so it is no key for this).
        names = tuple(leaf.name for leaf in flat.leaves)
        if self._builtin is None or self._builtin[0] != names:
            self._builtin = (names, builtin_rules(names))
        label, builtin = self._builtin[1]
        specs = []
        for leaf in flat.leaves:
            # Raw bytes of a dtype the wire lacks (complex, float8) are never quantized,
            # whatever a rule says: the daemon would read them as uint8.
            policy, leaf_bits = (pb.POLICY_EXACT, 0) if leaf.exact else self._policy(
                label, builtin, leaf.name, bits, leaf.dtype.is_float)
            for alias in () if leaf.exact else leaf.aliases:
                if self._policy(label, builtin, alias, bits, leaf.dtype.is_float) != (
                        policy, leaf_bits):
                    raise InvalidCheckpointError(
                        f"{alias!r} and {leaf.name!r} are one tensor (tied weights), stored "
                        "once, but the policy rules give them different policies; give both "
                        "names the same rule"
                    )
            specs.append(
                pb.TensorSpec(
                    name=leaf.name,
                    dtype=cast("pb.Dtype", leaf.dtype.wire),
                    shape=leaf.shape,
                    policy=cast("pb.Policy", policy),
                    bits=leaf_bits or None,  # 0: unset, the daemon's default
                    nbytes=leaf.nbytes,
                )
            )
        meta = {**user_metadata(metadata), STRUCTURE_KEY: flat.structure}
        header = pb.SaveHeader(run=self.run, rank=self.rank, step=step, tensors=specs,
                               metadata=meta, world_size=self.world_size,
                               reshardable=self.reshardable)
        self._check_message(header, len(flat.structure))
        return header

    def _check_limits(self, flat: FlatState) -> None:
        info = self.server
        if info.max_tensors and len(flat.leaves) > info.max_tensors:
            raise InvalidCheckpointError(
                f"the state has {len(flat.leaves)} tensors; "
                f"the daemon accepts at most {info.max_tensors}"
            )
        total = sum(leaf.nbytes for leaf in flat.leaves)
        if info.max_checkpoint_bytes and total > info.max_checkpoint_bytes:
            raise InvalidCheckpointError(
                f"the state holds {total} bytes; "
                f"the daemon accepts at most {info.max_checkpoint_bytes}"
            )

    def _check_message(self, header: pb.SaveHeader, structure_bytes: int) -> None:
        """The header travels as one gRPC message: past the daemon's limit it would be
        refused after ``save()`` returned (as if the daemon were busy), so refuse it here."""
        limit = self.server.max_message_bytes
        size = (header.ByteSize() + SHM_REFERENCE_BYTES
                + SHM_REFERENCE_BYTES_PER_TENSOR * len(header.tensors))
        if limit and size > limit:
            raise InvalidCheckpointError(
                f"step {header.step}: the save's header (a table of {len(header.tensors)} "
                f"tensors, a structure of {structure_bytes} bytes and the metadata) needs up "
                f"to {size} bytes, over the daemon's max_message_bytes of {limit}; hold long "
                "lists of numbers and large bytes as tensors or numpy arrays "
                "(torch.tensor(values), np.frombuffer(data, np.uint8)), save fewer tensors, "
                "or raise the daemon's --max-message-bytes"
            )

    def _policy(
        self, label: str, builtin: tuple[PolicyRule, ...], name: str, bits: int,
        is_float: bool,
    ) -> tuple[int, int]:
        key = (label, name, bits, is_float)
        cached = self._policies.get(key)
        if cached is None:
            cached = self._policies[key] = resolve(self.rules, name, bits, builtin,
                                                   is_float=is_float)
        return cached


def user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Validates user metadata: str to str, no key in the client's reserved namespace."""
    result = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"metadata key {key!r} is reserved "
                f"(keys starting with {RESERVED_PREFIX!r} belong to the client)"
            )
        result[key] = value
    return result
