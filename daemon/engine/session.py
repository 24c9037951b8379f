"""A save between its header and its acceptance: the receive buffers and their bookkeeping.

The transport fills the buffers (``write`` for streamed chunks, ``fill_with`` for shared
memory, which reads straight into them; ``fill_from`` copies a whole tensor from a view)
from the event loop's thread, then calls ``commit`` (hand
over to the pipeline) or ``abort`` (give back the budget and the step). The session owns
one byte buffer per tensor (``allocate``: the engine's ``ReceiveBuffers``, which hands out
a buffer of an earlier save where one fits); after commit those buffers become the pipeline's
input and, for exact tensors, the chain's next reconstruction, so no byte is copied twice.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

import numpy as np
from ckptd.daemon.domain import CheckpointHeader, SaveStatus, TensorSpec
from ckptd.daemon.errors import IncompleteStreamError, InvalidRequestError

_OPEN, _COMMITTED, _ABORTED = "open", "committed", "aborted"


class SaveSession:
    """One save between its header and its acceptance; owns the reserved budget."""

    header: CheckpointHeader

    def __init__(
        self,
        header: CheckpointHeader,
        on_commit: Callable[[SaveSession], Awaitable[SaveStatus]],
        on_abort: Callable[[SaveSession], None],
        *,
        identity: str = "",
        allocate: Callable[[int], np.ndarray] | None = None,
        on_tensor: Callable[[int, np.ndarray], None] | None = None,
    ) -> None:
        """``allocate(nbytes)`` returns a 1-D uint8 buffer (default: a new one).
        ``on_tensor(index, array)`` hears of each tensor once its bytes are complete, in
        table order, with the buffer viewed as the tensor (the session never writes it
        again); it is called on the thread that completed it (a ``fill_with`` may run in a
        worker thread)."""
        self.header = header
        self.identity = identity  # whose share of the in-flight budget the bytes count in
        self._on_commit = on_commit
        self._on_abort = on_abort
        allocate = allocate or functools.partial(np.empty, dtype=np.uint8)
        self._buffers = [allocate(spec.nbytes) for spec in header.tensors]
        self._received = [0] * len(header.tensors)
        self._cursor = 0  # first tensor that is not complete; chunks must go there
        self._on_tensor = on_tensor
        self._announced = 0  # tensors handed to on_tensor: those before the cursor
        self._state = _OPEN
        self._opened_s = time.perf_counter()
        self.receive_s = 0.0  # header to commit, once committed: the "receive" stage
        self.ready_bytes = 0  # of the buffers, mapped already (the engine's ReceiveBuffers)
        self._advance()

    @property
    def nbytes(self) -> int:
        return self.header.nbytes

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Copies a chunk of tensor ``index`` at ``offset`` (must equal bytes already written
        to it, and tensors are filled in table order); raises ``InvalidRequestError`` naming
        the tensor, offset and size when the chunk is out of order or past the tensor's end."""
        self._check_open()
        spec = self._spec(index)
        if index != self._cursor or offset != self._received[index]:
            expected = self._describe_expected()
            raise InvalidRequestError(
                f"save {self.header.key}: chunk for tensor {index} ({spec.name!r}) at offset "
                f"{offset} is out of order; expected {expected}"
            )
        chunk = np.frombuffer(data, dtype=np.uint8)
        end = offset + chunk.size
        if end > spec.nbytes:
            raise InvalidRequestError(
                f"save {self.header.key}: chunk of {chunk.size} bytes at offset {offset} runs "
                f"past the end of tensor {index} ({spec.name!r}, {spec.nbytes} bytes)"
            )
        self._buffers[index][offset:end] = chunk
        self._received[index] = end
        self._advance()

    def fill_from(self, index: int, view: memoryview) -> None:
        """Copies a whole tensor from ``view``; ``len(view)`` must equal its nbytes."""
        self._check_open()
        spec = self._spec(index)
        source = np.frombuffer(view, dtype=np.uint8)
        if source.size != spec.nbytes:
            raise InvalidRequestError(
                f"save {self.header.key}: tensor {index} ({spec.name!r}) needs {spec.nbytes} "
                f"bytes, the shared-memory view has {source.size}"
            )
        self.fill_with(index, lambda target: np.copyto(np.frombuffer(target, np.uint8), source))

    def fill_with(self, index: int, fill: Callable[[memoryview], None]) -> None:
        """Lets ``fill`` write tensor ``index`` whole into its receive buffer (shared memory
        reads it there with ``preadv``, no bytes in between); the tensor counts as received
        only if ``fill`` returns. May run in a worker thread while the loop leaves the
        session alone."""
        self._check_open()
        self._spec(index)
        with self._buffers[index].data as target:
            fill(target)
        self._received[index] = len(self._buffers[index])
        self._advance()

    async def commit(self) -> SaveStatus:
        """Raises ``IncompleteStreamError`` naming the first short tensor if any bytes are
        missing; else queues the save and returns its ACCEPTED status."""
        self._check_open()
        if self._cursor < len(self._buffers):
            spec = self.header.tensors[self._cursor]
            raise IncompleteStreamError(
                f"save {self.header.key} ended early: tensor {self._cursor} ({spec.name!r}) "
                f"has {self._received[self._cursor]} of {spec.nbytes} bytes"
            )
        self._state = _COMMITTED
        self.receive_s = time.perf_counter() - self._opened_s
        try:
            return await self._on_commit(self)
        except BaseException:
            self._state = _OPEN
            self.abort()
            raise

    def abort(self) -> None:
        """Releases the budget and the step; idempotent; a no-op after commit."""
        if self._state != _OPEN:
            return
        self._state = _ABORTED
        self._buffers = []
        self._on_abort(self)

    def take_arrays(self) -> list[np.ndarray | None]:
        """Hands the filled buffers, viewed as their tensors, to the pipeline (once)."""
        arrays: list[np.ndarray | None] = [self._view(i) for i in range(len(self._buffers))]
        self._buffers = []
        return arrays

    def _view(self, index: int) -> np.ndarray:
        spec = self.header.tensors[index]
        return self._buffers[index].view(spec.dtype_info.numpy).reshape(spec.shape)

    async def __aenter__(self) -> SaveSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self.abort()

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise InvalidRequestError(f"save {self.header.key} is already {self._state}")

    def _spec(self, index: int) -> TensorSpec:
        if not 0 <= index < len(self.header.tensors):
            raise InvalidRequestError(
                f"save {self.header.key}: tensor index {index} is out of range; the header "
                f"has {len(self.header.tensors)} tensors"
            )
        return self.header.tensors[index]

    def _advance(self) -> None:
        while (
            self._cursor < len(self._buffers)
            and self._received[self._cursor] == self.header.tensors[self._cursor].nbytes
        ):
            self._cursor += 1
        if self._on_tensor is not None:
            while self._announced < self._cursor:
                index = self._announced
                self._announced += 1
                self._on_tensor(index, self._view(index))

    def _describe_expected(self) -> str:
        if self._cursor >= len(self._buffers):
            return "no more chunks (every tensor is complete)"
        spec = self.header.tensors[self._cursor]
        return f"tensor {self._cursor} ({spec.name!r}) at offset {self._received[self._cursor]}"
