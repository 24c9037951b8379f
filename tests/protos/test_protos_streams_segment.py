"""``streams.receive`` taking a restore out of the client's segment: copied out of a
read-only mapping and verified against the header's checksum as it is copied, or
(``adopt``) handed over as views of a shared mapping (no copy, writable, alive as long as
they are) once verified; a damaged segment, or a reply that breaks the segment framing (a
segment nobody asked for, chunks besides it, a short segment), is refused either way."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from ckptd.protos import checksum, dtypes, segments, streams
from ckptd.protos.v1 import pb

ARRAYS = {"a": np.arange(3000, dtype=np.float32), "b": np.arange(5, dtype=np.int64),
          "none": np.empty(0, dtype=np.float32)}


def wire(array: np.ndarray) -> int:
    return dtypes.from_name(array.dtype.name).wire


def header(name: str, offsets: tuple[int, ...], total: int) -> pb.RestoreHeader:
    specs = [pb.TensorSpec(name=n, dtype=wire(a), shape=list(a.shape), nbytes=a.nbytes)
             for n, a in ARRAYS.items()]
    digest = checksum.tensors_checksum(
        (n, a.dtype.name, a.shape, a) for n, a in ARRAYS.items())
    return pb.RestoreHeader(
        ref=pb.StepRef(run="r", rank=0, step=1), tensors=specs, checksum=digest,
        shared_memory=pb.SharedMemoryRef(segment_name=name, segment_bytes=total,
                                         offsets=offsets))


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[streams.Segment, pb.RestoreHeader, Path]]:
    offsets, total = segments.aligned_offsets([a.nbytes for a in ARRAYS.values()])
    path = tmp_path / "ckptdc_1_test"
    with path.open("wb") as out:
        for array, offset in zip(ARRAYS.values(), offsets, strict=True):
            out.seek(offset)
            out.write(array.tobytes())
        out.truncate(total)
    fd = os.open(path, os.O_RDWR)
    yield streams.Segment(path.name, fd), header(path.name, offsets, total), path
    os.close(fd)


def allocate(spec: pb.TensorSpec) -> np.ndarray:
    return np.zeros(spec.nbytes, dtype=np.uint8)


def never(spec: pb.TensorSpec) -> np.ndarray:
    raise AssertionError(f"a zero-copy restore allocated {spec.name!r}: it maps, never copies")


def ignore(spec: pb.TensorSpec, view: np.ndarray) -> None:
    """An adopter that drops the views."""


# The two ways to take a segment: copied into allocated buffers, or adopted as views.
MODES = {"copy": {}, "views": {"adopt": ignore}}


def replies(*messages: pb.RestoreResponse, ready: tuple[int, ...] = (2, 3)
            ) -> Iterator[pb.RestoreResponse]:
    """``messages``, then the daemon's ``segment_ready`` counts (all three tensors)."""
    return iter([*messages, *(pb.RestoreResponse(segment_ready=n) for n in ready)])


def test_a_segment_is_read_and_verified(
    segment: tuple[streams.Segment, pb.RestoreHeader, Path]
) -> None:
    ref, head, _ = segment
    got: list[np.ndarray] = []

    def keep(spec: pb.TensorSpec) -> np.ndarray:
        got.append(allocate(spec))
        return got[-1]

    progress: list[int] = []
    streams.receive(replies(pb.RestoreResponse(header=head)), keep, progress.append,
                    segment=ref)
    for buffer, array in zip(got, ARRAYS.values(), strict=True):
        assert buffer.tobytes() == array.tobytes()
    assert sum(progress) == sum(a.nbytes for a in ARRAYS.values())


def test_a_segment_is_mapped_verified_and_shared(
    segment: tuple[streams.Segment, pb.RestoreHeader, Path]
) -> None:
    ref, head, path = segment
    got: dict[str, np.ndarray] = {}
    progress: list[int] = []
    streams.receive(replies(pb.RestoreResponse(header=head)), never, progress.append,
                    segment=ref, adopt=lambda spec, view: got.setdefault(spec.name, view))
    assert list(got) == list(ARRAYS)
    for view, array in zip(got.values(), ARRAYS.values(), strict=True):
        assert view.tobytes() == array.tobytes()
    assert sum(progress) == sum(a.nbytes for a in ARRAYS.values())
    # Views of the segment, not copies: writable, and what they write lands in it.
    got["a"][:4] = 0xAB
    assert path.read_bytes()[:4] == b"\xab" * 4
    path.unlink()  # the name goes (as the client unlinks it); the views stay valid
    assert got["b"].tobytes() == ARRAYS["b"].tobytes()


def flip_byte_100(path: Path) -> None:
    with path.open("r+b") as out:
        out.seek(100)
        out.write(b"\xff")


def cut_at_1000(path: Path) -> None:
    os.truncate(path, 1000)


@pytest.mark.parametrize(("damage", "mode", "problem"), [
    (flip_byte_100, "copy", "damaged in transit"),
    (flip_byte_100, "views", "damaged in transit"),
    # Both map the segment, so both check its size before touching it (never a SIGBUS).
    (cut_at_1000, "copy", "holds 1000 bytes, less than the"),
    (cut_at_1000, "views", "holds 1000 bytes, less than the"),
])
def test_damaged_or_short_segments_are_refused(
    segment: tuple[streams.Segment, pb.RestoreHeader, Path],
    damage: Callable[[Path], None], mode: str, problem: str,
) -> None:
    ref, head, path = segment
    damage(path)
    adopted: list[str] = []
    with pytest.raises(streams.StreamError, match=problem):
        streams.receive(replies(pb.RestoreResponse(header=head)), allocate, segment=ref,
                        **({"adopt": lambda spec, view: adopted.append(spec.name)}
                           if mode == "views" else {}))
    assert adopted == []  # nothing unverified is handed over


@pytest.mark.parametrize("mode", MODES)
def test_a_segment_the_request_did_not_name_is_refused(
    segment: tuple[streams.Segment, pb.RestoreHeader, Path], mode: str
) -> None:
    ref, head, _ = segment
    with pytest.raises(streams.StreamError, match="which the request did not name"):
        streams.receive(replies(pb.RestoreResponse(header=head)), allocate, **MODES[mode])
    other = streams.Segment("ckptdc_2_other", ref.fd)
    with pytest.raises(streams.StreamError, match="which the request did not name"):
        streams.receive(replies(pb.RestoreResponse(header=head)), allocate, segment=other,
                        **MODES[mode])


@pytest.mark.parametrize("mode", MODES)
def test_chunks_besides_a_segment_are_refused(
    segment: tuple[streams.Segment, pb.RestoreHeader, Path], mode: str
) -> None:
    ref, head, _ = segment
    chunk = pb.RestoreResponse(chunk=pb.TensorChunk(tensor_index=0, data=b"x"))
    with pytest.raises(streams.StreamError, match="carries no chunks"):
        streams.receive(replies(pb.RestoreResponse(header=head), chunk), allocate, segment=ref,
                        **MODES[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ready", "problem"), [
    ((2,), "ended with 2 of 3 tensors"),
    ((2, 1), "announced 1 tensors ready after 2"),
    ((4,), "announced 4 tensors ready after 0"),
])
def test_segment_ready_counts_must_grow_to_every_tensor(
    segment: tuple[streams.Segment, pb.RestoreHeader, Path], ready: tuple[int, ...],
    problem: str, mode: str,
) -> None:
    ref, head, _ = segment
    with pytest.raises(streams.StreamError, match=problem):
        streams.receive(replies(pb.RestoreResponse(header=head), ready=ready), allocate,
                        segment=ref, **MODES[mode])
