"""``streams.decode_reply``, the client's Restore deserializer, and its mirror
``streams.decode_request``, the daemon's Save deserializer: a chunk is parsed by hand into a
view of the received bytes and must mean exactly what protobuf would parse; every other
message, or a chunk framed in a way the hand parser does not take, goes through protobuf
unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.protos import streams
from ckptd.protos.v1 import pb
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st


def parsed_like_protobuf(message: bytes) -> None:
    got = streams.decode_reply(message)
    want = pb.RestoreResponse.FromString(message)
    assert isinstance(got, streams.Chunk)
    assert want.WhichOneof("item") == "chunk"
    assert (got.tensor_index, got.offset, bytes(got.data)) == (
        want.chunk.tensor_index, want.chunk.offset, want.chunk.data)


@given(index=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1),
       data=st.binary(max_size=300))
def test_encode_chunk_output_parses_as_protobuf_does(index: int, offset: int, data: bytes) -> None:
    parsed_like_protobuf(streams.encode_chunk(index, offset, memoryview(data)))


@given(index=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1),
       data=st.binary(max_size=300))
def test_protobuf_serialized_chunks_parse_the_same(index: int, offset: int, data: bytes) -> None:
    message = pb.RestoreResponse(chunk=pb.TensorChunk(tensor_index=index, offset=offset,
                                                      data=data))
    parsed_like_protobuf(message.SerializeToString())


def test_fields_in_another_order_or_repeated_parse_as_protobuf_does() -> None:
    inner = b"\x1a\x03abc" + b"\x10\x05" + b"\x08\x02" + b"\x10\x07"  # offset twice: last wins
    parsed_like_protobuf(b"\x12" + bytes([len(inner)]) + inner)


def test_the_bytes_are_a_view_of_the_message_not_a_copy() -> None:
    payload = np.arange(4096, dtype=np.uint8).tobytes()
    message = streams.encode_chunk(1, 8, memoryview(payload))
    chunk = streams.decode_reply(message)
    assert isinstance(chunk, streams.Chunk)
    assert chunk.data.obj is message


@pytest.mark.parametrize("message", [
    pb.RestoreResponse(segment_ready=3).SerializeToString(),
    pb.RestoreResponse(header=pb.RestoreHeader(checksum="c")).SerializeToString(),
    # An unknown field inside the chunk: protobuf keeps the known ones.
    b"\x12\x07" + b"\x08\x01" + b"\x20\x01" + b"\x1a\x01z",
    # tensor_index past uint32: protobuf truncates it, the hand parser does not guess.
    b"\x12\x09\x08\x80\x80\x80\x80\x10\x1a\x01z",
    b"",
])
def test_other_messages_go_through_protobuf(message: bytes) -> None:
    got = streams.decode_reply(message)
    assert isinstance(got, pb.RestoreResponse)
    assert got == pb.RestoreResponse.FromString(message)


@pytest.mark.parametrize("message", [
    b"\x12\x05\x1a\x09abc",  # data longer than its chunk
    b"\x12\x80",  # a truncated length
])
def test_broken_chunks_fail_as_protobuf_fails(message: bytes) -> None:
    with pytest.raises(DecodeError):
        streams.decode_reply(message)


@given(index=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1),
       data=st.binary(max_size=300))
def test_save_chunks_parse_as_protobuf_does(index: int, offset: int, data: bytes) -> None:
    message = streams.encode_chunk(index, offset, memoryview(data))
    got, want = streams.decode_request(message), pb.SaveRequest.FromString(message)
    assert isinstance(got, streams.Chunk)
    assert streams.item_of(got) == streams.item_of(want) == "chunk"
    assert (got.tensor_index, got.offset, bytes(got.data)) == (
        want.chunk.tensor_index, want.chunk.offset, want.chunk.data)
    assert got.data.obj is message


@pytest.mark.parametrize("message", [
    pb.SaveRequest(header=pb.SaveHeader(run="r", step=3)).SerializeToString(),
    b"\x12\x07" + b"\x08\x01" + b"\x20\x01" + b"\x1a\x01z",  # an unknown field
    b"",
])
def test_other_save_requests_go_through_protobuf(message: bytes) -> None:
    got = streams.decode_request(message)
    assert isinstance(got, pb.SaveRequest)
    assert got == pb.SaveRequest.FromString(message)


def test_broken_save_chunks_fail_as_protobuf_fails() -> None:
    with pytest.raises(DecodeError):
        streams.decode_request(b"\x12\x05\x1a\x09abc")
