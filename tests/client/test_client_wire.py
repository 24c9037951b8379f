"""Wire-level pieces without a daemon: chunk encoding, restore assembly, policies, targets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from ckptd.client.errors import CorruptCheckpointError, InvalidCheckpointError
from ckptd.client.grpc_transport import encode_chunk
from ckptd.client.header import HeaderBuilder
from ckptd.client.policies import parse_rules, parse_spec, resolve
from ckptd.client.restore import receive
from ckptd.client.shm import is_unix_target
from ckptd.client.staging import HostBuffer, plan_layout, snapshot
from ckptd.client.structure import STRUCTURE_KEY, flatten
from ckptd.protos.checksum import tensors_checksum
from ckptd.protos.v1 import pb


@pytest.mark.parametrize(
    ("index", "offset", "size"),
    [(0, 0, 1), (1, 0, 5), (0, 7, 3), (300, 2**40 + 5, 200), (2**32 - 1, 2**63, 128 * 1024)],
)
def test_hand_encoded_chunks_match_protobuf_bytes(index: int, offset: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ours = encode_chunk(index, offset, memoryview(data))
    reference = pb.SaveRequest(chunk=pb.TensorChunk(tensor_index=index, offset=offset, data=data))
    assert ours == reference.SerializeToString()
    assert pb.SaveRequest.FromString(ours) == reference
    # The daemon sends restore chunks with the same bytes (RestoreResponse.chunk is field 2).
    restored = pb.RestoreResponse(chunk=pb.TensorChunk(tensor_index=index, offset=offset,
                                                       data=data))
    assert ours == restored.SerializeToString()


def restore_stream(state: Any, chunk_bytes: int, step: int = 3) -> Iterator[pb.RestoreResponse]:
    """What a daemon would send back for ``state`` (built the way a save stages it)."""
    flat = flatten(state)
    layout = plan_layout([leaf.nbytes for leaf in flat.leaves])
    buffer = HostBuffer(layout.total_bytes)
    snapshot(flat.leaves, layout, buffer)
    specs = [
        pb.TensorSpec(name=leaf.name, dtype=leaf.dtype.wire, shape=leaf.shape, nbytes=leaf.nbytes)
        for leaf in flat.leaves
    ]
    raw = buffer.data.numpy()
    tensors = [
        (leaf.name, leaf.dtype.name, leaf.shape, raw[offset : offset + leaf.nbytes])
        for leaf, offset in zip(flat.leaves, layout.offsets, strict=True)
    ]
    header = pb.RestoreHeader(
        ref=pb.StepRef(run="r", rank=0, step=step),
        tensors=specs,
        metadata={STRUCTURE_KEY: flat.structure, "note": "hi"},
        checksum=tensors_checksum(tensors),
    )
    yield pb.RestoreResponse(header=header)
    for index, (offset, size) in enumerate(zip(layout.offsets, layout.nbytes, strict=True)):
        for start in range(0, size, chunk_bytes):
            data = raw[offset + start : offset + min(size, start + chunk_bytes)].tobytes()
            chunk = pb.TensorChunk(tensor_index=index, offset=start, data=data)
            yield pb.RestoreResponse(chunk=chunk)


def test_restore_rebuilds_state_with_dtypes_and_shapes() -> None:
    state: dict[str, Any] = {
        "model": {"w": torch.randn(4, 5), "bf": torch.randn(3).to(torch.bfloat16)},
        "count": torch.tensor(5, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "mask": torch.tensor([True, False, True]),
        "np": np.arange(5, dtype=np.int16),
        "step": 9,
    }
    replies = list(restore_stream(state, chunk_bytes=7))
    restored = receive(iter(replies))
    assert restored.step == 3 and restored.checksum == replies[0].header.checksum
    assert restored.metadata["note"] == "hi"
    out = restored.state
    for key in ("w", "bf"):
        assert out["model"][key].dtype == state["model"][key].dtype
        assert torch.equal(out["model"][key], state["model"][key])
    assert out["count"].shape == () and out["count"].item() == 5
    assert out["empty"].shape == (0, 3)
    assert out["mask"].tolist() == [True, False, True]
    assert isinstance(out["np"], np.ndarray) and out["np"].dtype == np.int16
    assert out["step"] == 9
    # What it would need in /dev/shm: each tensor at a 64-byte aligned offset, as the daemon
    # counts (80 + 6 + 8 + 0 + 3 + 10 raw bytes).
    assert restored.nbytes == 128 + 64 + 64 + 0 + 64 + 64


def test_restore_without_structure_is_a_flat_dict() -> None:
    replies = list(restore_stream({"a": torch.ones(2)}, chunk_bytes=64))
    del replies[0].header.metadata[STRUCTURE_KEY]
    restored = receive(iter(replies))
    assert list(restored.state) == ["a"] and torch.equal(restored.state["a"], torch.ones(2))


def test_truncated_restore_stream_is_detected() -> None:
    replies = list(restore_stream({"a": torch.ones(100)}, chunk_bytes=64))
    with pytest.raises(CorruptCheckpointError, match="ended early: tensor 'a' has 384 of 400"):
        receive(iter(replies[:-1]))


@pytest.mark.parametrize("damage", ["flip a byte", "wrong checksum"])
def test_restore_verifies_the_checksum_end_to_end(damage: str) -> None:
    replies = list(restore_stream({"a": torch.ones(100), "b": torch.empty(0)}, chunk_bytes=64))
    if damage == "flip a byte":
        data = bytearray(replies[2].chunk.data)
        data[5] ^= 0x10
        replies[2].chunk.data = bytes(data)
    else:
        replies[0].header.checksum = "0" * 32
    with pytest.raises(CorruptCheckpointError, match=r"step 3 of r/rank0 arrived with checksum"):
        receive(iter(replies))


def test_out_of_order_restore_stream_is_detected() -> None:
    replies = list(restore_stream({"a": torch.ones(100)}, chunk_bytes=64))
    replies[1], replies[2] = replies[2], replies[1]
    with pytest.raises(CorruptCheckpointError, match="out of order"):
        receive(iter(replies))


def test_inconsistent_header_is_detected() -> None:
    replies = list(restore_stream({"a": torch.ones(4)}, chunk_bytes=64))
    replies[0].header.tensors[0].nbytes = 15
    with pytest.raises(CorruptCheckpointError, match="announces 15 bytes"):
        receive(iter(replies))


def test_policy_specs_parse() -> None:
    assert parse_spec("exact") == (pb.POLICY_EXACT, 0)
    assert parse_spec("lossy") == (pb.POLICY_LOSSY, 0)
    assert parse_spec("lossy:4") == (pb.POLICY_LOSSY, 4)
    assert parse_spec("auto") == (pb.POLICY_UNSPECIFIED, 0)
    assert parse_spec("lossy-log") == (pb.POLICY_LOSSY_LOG, 0)
    assert parse_spec("lossy-log:5") == (pb.POLICY_LOSSY_LOG, 5)
    assert parse_spec("lossy-scaled") == (pb.POLICY_LOSSY_SCALED, 0)
    assert parse_spec("lossy-scaled:2") == (pb.POLICY_LOSSY_SCALED, 2)
    for bad in ("lossy:0", "lossy:9", "lossy:x", "exact:2", "fast", "", "lossy-log:9",
                "log", "lossy-log:", "scaled", "lossy-scaled:0"):
        with pytest.raises(ValueError, match=r"invalid policy|bits in policy"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="pair of strings"):
        parse_rules([("only-a-pattern",)])


def test_first_matching_rule_wins_and_exact_has_no_bits() -> None:
    rules = parse_rules([("optim/*", "exact"), ("*.bias", "lossy:2"), ("model/*", "lossy")])
    assert resolve(rules, "optim/state/0/exp_avg", 3) == (pb.POLICY_EXACT, 0)
    assert resolve(rules, "model/fc.bias", 3) == (pb.POLICY_LOSSY, 2)
    assert resolve(rules, "model/fc.weight", 3) == (pb.POLICY_LOSSY, 3)
    assert resolve(rules, "rng", 0) == (pb.POLICY_UNSPECIFIED, 0)


def test_adams_moments_are_lossy_log_and_scaled_unless_a_user_rule_says_otherwise() -> None:
    # The built-in rule comes after the user's: it applies by default, and any user rule
    # naming the tensor (even a broad one) takes precedence.
    assert resolve((), "optimizer/state/3/exp_avg_sq", 4) == (pb.POLICY_LOSSY_LOG, 4)
    exact = parse_rules([("optim*", "exact")])
    assert resolve(exact, "optim/state/3/exp_avg_sq", 4) == (pb.POLICY_EXACT, 0)
    assert resolve((), "optimizer/state/3/exp_avg", 4) == (pb.POLICY_LOSSY_SCALED, 4)
    assert resolve(exact, "optim/state/3/exp_avg", 4) == (pb.POLICY_EXACT, 0)
    assert resolve((), "optimizer/state/3/momentum_buffer", 4) == (pb.POLICY_UNSPECIFIED, 4)
    lossy = parse_rules([("*exp_avg_sq", "lossy:6")])
    assert resolve(lossy, "optimizer/state/3/exp_avg_sq", 4) == (pb.POLICY_LOSSY, 6)
    everything_lossy = parse_rules([("*", "lossy")])
    assert resolve(everything_lossy, "optimizer/state/3/exp_avg_sq", 4) == (pb.POLICY_LOSSY, 4)


def test_tied_tensors_take_one_policy_and_must_agree_on_it() -> None:
    """Tied weights are stored once: a rule for the second name must not be dropped
    silently, so rules that disagree on the two names are refused at save."""
    weight = torch.randn(8, 4)
    flat = flatten({"model": {"embed.weight": weight, "head.weight": weight}})
    agree = HeaderBuilder("r", 0, parse_rules([("model/*", "lossy:3")]), pb.ServerInfo())
    header = agree.build(1, flat, 0, None)
    assert [(t.name, t.policy, t.bits) for t in header.tensors] == [
        ("model/embed.weight", pb.POLICY_LOSSY, 3)]
    differ = HeaderBuilder("r", 0, parse_rules([("model/head.weight", "exact"),
                                                ("model/*", "lossy:3")]), pb.ServerInfo())
    with pytest.raises(InvalidCheckpointError,
                       match=r"'model/head\.weight' and 'model/embed\.weight' are one tensor"):
        differ.build(1, flat, 0, None)


def test_only_unix_socket_targets_may_use_shared_memory() -> None:
    assert is_unix_target("unix:/tmp/x.sock") and is_unix_target("unix:///tmp/x.sock")
    assert not is_unix_target("127.0.0.1:5000") and not is_unix_target("localhost:1")
    assert not is_unix_target("10.1.2.3:5000")


def test_headers_carry_policies_and_respect_the_daemons_limits() -> None:
    server = pb.ServerInfo(max_tensors=2, max_checkpoint_bytes=100)
    builder = HeaderBuilder("r", 1, parse_rules([("*.b", "exact")]), server)
    header = builder.build(3, flatten({"a": torch.ones(2), "x.b": torch.ones(2)}), 4, {"k": "v"})
    assert (header.run, header.rank, header.step) == ("r", 1, 3)
    assert [(t.name, t.policy, t.bits) for t in header.tensors] == [
        ("a", pb.POLICY_UNSPECIFIED, 4),
        ("x.b", pb.POLICY_EXACT, 0),
    ]
    assert [t.nbytes for t in header.tensors] == [8, 8]
    assert header.metadata["k"] == "v" and STRUCTURE_KEY in header.metadata
    three = flatten({"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)})
    with pytest.raises(InvalidCheckpointError, match="3 tensors; the daemon accepts at most 2"):
        builder.build(4, three, 0, None)
    with pytest.raises(InvalidCheckpointError, match="400 bytes; the daemon accepts at most 100"):
        builder.build(4, flatten({"a": torch.ones(100)}), 0, None)
    with pytest.raises(ValueError, match="str to str"):
        builder.build(4, flatten({}), 0, {"k": 1})
