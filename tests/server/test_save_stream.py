"""The daemon parses save chunks by hand (``streams.decode_request``, ``savestream.py``): a
chunk reaches the session as a view of the received message, and a chunk framed in any
other valid way — fields in another order, an unknown field, which another language's
protobuf may write — is saved exactly as protobuf would read it."""

from __future__ import annotations

import daemon_wire as wire
import grpc
import numpy as np
from ckptd.daemon.server import servicer
from ckptd.protos import streams
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon

SAVE_METHOD = "/ckptd.v1.CheckpointdService/Save"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _reordered(index: int, offset: int, data: bytes) -> bytes:
    """``SaveRequest{chunk}`` with data first and the scalars after it (the hand parser's
    other order)."""
    inner = (b"\x1a" + _varint(len(data)) + data + b"\x10" + _varint(offset)
             + b"\x08" + _varint(index))
    return b"\x12" + _varint(len(inner)) + inner


def _with_unknown_field(index: int, offset: int, data: bytes) -> bytes:
    """The same chunk plus field 15 (a varint), which protobuf skips and the hand parser
    leaves to protobuf."""
    message = pb.TensorChunk(tensor_index=index, offset=offset, data=data).SerializeToString()
    inner = message + b"\x78\x01"
    return b"\x12" + _varint(len(inner)) + inner


def test_chunks_framed_otherwise_are_saved_as_protobuf_reads_them(
    daemon: InProcessDaemon,
) -> None:
    arrays = {"w": np.arange(3000, dtype=np.float32), "b": np.arange(5, dtype=np.int64)}
    raw = [array.tobytes() for array in arrays.values()]
    header = pb.SaveRequest(header=wire.header_of("framed", 1, arrays)).SerializeToString()
    requests = [header,
                _reordered(0, 0, raw[0][:4000]), _with_unknown_field(0, 4000, raw[0][4000:]),
                _with_unknown_field(1, 0, raw[1])]  # fmt: skip
    with grpc.insecure_channel(daemon.address) as channel:
        save = channel.stream_unary(SAVE_METHOD, request_serializer=None,
                                    response_deserializer=pb.SaveResponse.FromString)
        assert save(iter(requests), timeout=60).status.state == pb.SAVE_STATE_ACCEPTED
        client = wire.stub(channel)
        assert wire.wait(client, "framed", 1).state == pb.SAVE_STATE_DURABLE
        restored_header, restored = wire.restore(client, "framed", 1)
    for name, array in arrays.items():
        np.testing.assert_array_equal(restored[name], array)
    assert wire.received_checksum(restored_header, restored) == restored_header.checksum


def test_save_chunks_reach_the_handler_as_views_of_the_message() -> None:
    deserialize = servicer._lenient(pb.SaveRequest)
    message = streams.encode_chunk(2, 64, memoryview(bytes(range(200))))
    chunk = deserialize(message)
    assert isinstance(chunk, streams.Chunk)
    assert (chunk.tensor_index, chunk.offset, chunk.data.obj) == (2, 64, message)
    assert isinstance(deserialize(_with_unknown_field(2, 64, b"x")), pb.SaveRequest)
    malformed = deserialize(b"\x12\x05\x1a\x09abc")  # data longer than its chunk
    assert isinstance(malformed, servicer.MalformedMessage)
    assert "ckptd.v1.SaveRequest" in malformed.problem
