"""zstd frames for the codec: standard frames, and bare ones for symbol streams.

Standard frames (magic number and content size in the header) hold exact chunks, the
exception list and the original zstd symbol layouts. The adaptive symbol layout uses bare
frames: no magic number and no content size, since the decoder always knows how many bytes
a stream must hold. That saves 6-9 bytes per frame, a few percent of a small tensor's delta.

Contexts are made once per thread and call (``Scratch.keep``): setting one up costs ~250 us.
"""

from __future__ import annotations

import numpy as np
import zstandard

from .chunks import Scratch
from .format import CodecError

LEVEL = 1
_MAX_WINDOW_FACTOR = 4
_MIN_WINDOW_LIMIT = 1 << 20


def compress(data: bytes | memoryview, scratch: Scratch) -> bytes:
    """Standard zstd level 1 frame of ``data``."""
    compressor = scratch.keep("zstd_c", lambda: zstandard.ZstdCompressor(level=LEVEL))
    return compressor.compress(data)


def decompress(body: memoryview, size: int, scratch: Scratch) -> bytes:
    """Decompresses one standard frame that must hold exactly ``size`` bytes.

    Raises:
        CodecError: the frame is invalid or of another size.
    """
    decompressor = scratch.keep("zstd_d", zstandard.ZstdDecompressor)
    check_size(body, size)  # first: zstandard sizes its output from the frame's claim
    return _checked(decompressor, body, size)


def check_size(body: memoryview, size: int) -> None:
    """Raises ``CodecError`` unless the frame header declares exactly ``size`` bytes.

    Cheap (reads the frame header only), so callers check every chunk before allocating the
    output: a corrupt size field must not turn into a huge allocation.
    """
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt blob: invalid zstd frame header ({exc})") from exc
    if declared != size:
        raise CodecError(f"corrupt blob: zstd frame declares {declared} bytes, expected {size}")


def compress_bare(data: np.ndarray, scratch: Scratch) -> bytes:
    """Bare zstd level 1 frame of ``data``'s bytes: no magic, no content size.

    No data gives no bytes at all (a frame would cost 5), which ``decompress_bare`` expects.
    """
    if not data.size:
        return b""
    compressor = scratch.keep("zstd_c_bare", lambda: zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            LEVEL, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=False)))
    return compressor.compress(data.data)


def decompress_bare(body: memoryview, size: int, scratch: Scratch) -> bytes:
    """Inverse of ``compress_bare`` for a stream that must hold exactly ``size`` bytes.

    Raises:
        CodecError: the frame is invalid or of another size.
    """
    if size == 0:
        if len(body):
            raise CodecError(f"corrupt blob: {len(body)} bytes for an empty symbol stream")
        return b""
    _check_bare_header(body, size)
    decompressor = scratch.keep("zstd_d_bare", lambda: zstandard.ZstdDecompressor(
        format=zstandard.FORMAT_ZSTD1_MAGICLESS))
    return _checked(decompressor, body, size)


def _check_bare_header(body: memoryview, size: int) -> None:
    """Raises ``CodecError`` if the frame header claims another size or a large window.

    zstandard allocates what the header declares (a content size, or a window of up to
    128 MiB) before decoding: a corrupt header must not turn into a huge allocation. The
    encoder never writes a content size, and its window (level 1: at most 512 KiB, shrunk
    by zstd to the data) stays under both limits.
    """
    try:
        params = zstandard.get_frame_parameters(body, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt blob: invalid zstd frame header ({exc})") from exc
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, size):
        raise CodecError(f"corrupt blob: zstd frame declares {params.content_size} bytes, "
                         f"expected {size}")
    if params.window_size > max(_MAX_WINDOW_FACTOR * size, _MIN_WINDOW_LIMIT):
        raise CodecError(f"corrupt blob: zstd frame window of {params.window_size} bytes for "
                         f"{size} bytes of data")


def _checked(decompressor: zstandard.ZstdDecompressor, body: memoryview, size: int) -> bytes:
    try:
        data = decompressor.decompress(body, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt blob: zstd frame does not decode ({exc})") from exc
    if len(data) != size:
        raise CodecError(f"corrupt blob: zstd frame holds {len(data)} bytes, expected {size}")
    return data
