"""Writing a restored step as a standalone file that loads without ckptd.

* ``.safetensors``: written here byte by byte (no dependency): an 8-byte little-endian
  header length, a JSON header mapping each tensor's flat ckptd name to its ``dtype``,
  ``shape`` and ``data_offsets`` (plus ``__metadata__``, string values only, holding the
  checkpoint's metadata and where it came from), then the raw little-endian bytes.
  ``safetensors.torch.load_file`` (or any safetensors reader) loads it.
* ``.pt``: ``torch.save`` of the nested state ``Checkpointer.restore()`` returns, rebuilt
  with the client's own ``unflatten``; torch is imported only here, when asked for.

Both are written to a temporary file in the target's directory, fsynced and renamed over
the target, so a crash or a failure never leaves half a file under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from ckptd.daemon.domain import RestoredCheckpoint, TensorSpec
from ckptd.daemon.errors import InvalidRequestError

__all__ = ["FORMATS", "SAFETENSORS_DTYPES", "export", "format_for"]

FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
# ckptd dtype-table name -> safetensors dtype string.
SAFETENSORS_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}
_METADATA_KEY = "__metadata__"
_WRITE_CHUNK_BYTES = 8 << 20
# The safetensors reference writer pads the header with spaces to this alignment.
_HEADER_ALIGN = 8
STRUCTURE_KEY = "ckptd.structure"  # written by ckptd.client.structure (not imported: torch)


def format_for(path: Path) -> str:
    """``"safetensors"`` or ``"torch"`` from ``path``'s suffix; checked before any restore."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidRequestError(
            f"cannot tell the export format of {str(path)!r} from its suffix "
            f"{path.suffix!r}; use one of {', '.join(FORMATS)}"
        )
    if not path.parent.is_dir():
        raise InvalidRequestError(f"output directory {str(path.parent)!r} does not exist")
    return fmt


def export(
    checkpoint: RestoredCheckpoint, path: Path, on_progress: Callable[[int], None] | None = None
) -> str:
    """Writes ``checkpoint`` to ``path`` in the format its suffix names; returns the format."""
    fmt = format_for(path)
    if fmt == "safetensors":
        write_safetensors(checkpoint, path, on_progress)
    else:
        write_torch(checkpoint, path)
    return fmt


def safetensors_header(checkpoint: RestoredCheckpoint) -> bytes:
    """The JSON header, padded with spaces so that the data starts 8-byte aligned."""
    header: dict[str, Any] = {}
    offset = 0
    for spec in checkpoint.tensors:
        if spec.name == _METADATA_KEY:
            raise InvalidRequestError(f"tensor name {_METADATA_KEY!r} is reserved in safetensors")
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    key = checkpoint.key
    metadata = {"ckptd.run": key.run, "ckptd.rank": str(key.rank), "ckptd.step": str(key.step),
                "ckptd.checksum": checkpoint.checksum}
    metadata.update(checkpoint.metadata)
    header[_METADATA_KEY] = metadata
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % _HEADER_ALIGN)


def write_safetensors(
    checkpoint: RestoredCheckpoint, path: Path, on_progress: Callable[[int], None] | None = None
) -> None:
    header = safetensors_header(checkpoint)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec, array in zip(checkpoint.tensors, checkpoint.arrays, strict=True):
            _write_array(f, spec, array, on_progress)


def _write_array(
    f: IO[bytes], spec: TensorSpec, array: np.ndarray, on_progress: Callable[[int], None] | None
) -> None:
    flat = np.ascontiguousarray(array, dtype=spec.dtype_info.numpy).reshape(-1).view(np.uint8)
    for start in range(0, flat.nbytes, _WRITE_CHUNK_BYTES):
        piece = flat[start : start + _WRITE_CHUNK_BYTES]
        f.write(piece.data)
        if on_progress is not None:
            on_progress(piece.nbytes)


def write_torch(checkpoint: RestoredCheckpoint, path: Path) -> None:
    """``torch.save`` of the state as ``Checkpointer.restore()`` returns it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            f"exporting to {path.suffix} needs PyTorch, which is not installed ({exc}); "
            "install it (pip install 'ckptd[client]') or export to .safetensors instead"
        ) from exc
    from ckptd.client.structure import unflatten

    tensors = {
        spec.name: to_torch(spec, array)
        for spec, array in zip(checkpoint.tensors, checkpoint.arrays, strict=True)
    }
    structure = checkpoint.metadata.get(STRUCTURE_KEY)
    state = unflatten(structure, tensors) if structure is not None else tensors
    with atomic_file(path) as f:
        torch.save(state, f)


def to_torch(spec: TensorSpec, array: np.ndarray) -> Any:
    """A CPU tensor of ``spec``'s dtype over a writable copy of ``array`` if needed."""
    import torch

    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
    if spec.dtype_info.is_bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Yields a temporary file next to ``path``; on success it is fsynced and renamed over
    ``path``, on failure removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
