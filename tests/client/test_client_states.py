"""Training states beyond plain state dicts, through a real daemon on both transports.

What ``torch.save`` keeps and a trainer relies on: tied weights stay one tensor (stored
once), ``nn.Parameter`` and ``requires_grad`` survive, complex and float8 tensors come back
bit for bit, and a conjugated or negated view saves like any tensor, with
``snapshot="overlap"`` too. What cannot be stored fails in ``save()`` naming the path and
what to save instead.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.client import Checkpointer, GrpcLimitError, InvalidCheckpointError, SaveState
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon, start_in_process

MODES = [("shm", "copy"), ("grpc", "copy"), ("shm", "overlap"), ("grpc", "overlap")]


class TiedLM(torch.nn.Module):
    """An embedding tied to the output projection, as GPT-2 and Llama-3.2 tie theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.head = torch.nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight


def save_and_restore(checkpointer: Checkpointer, step: int, state: Any, **kwargs: Any) -> Any:
    handle = checkpointer.save(step, state, **kwargs)
    checkpointer.wait_snapshot()
    assert handle.durable(60), handle.exception(0)
    return checkpointer.restore(step)


@pytest.fixture(scope="module")
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> InProcessDaemon:
    """One daemon for the module (on a unix socket, for shared memory): every test saves
    under a run of its own, and a daemon per test would cost more than the tests."""
    root = tmp_path_factory.mktemp("states")
    running = start_in_process(root / "storage", listen=f"unix://{root}/ckptd.sock")
    request.addfinalizer(running.stop)
    return running


@pytest.fixture
def run(request: pytest.FixtureRequest) -> str:
    """A run name of this test's own (the module's tests share one daemon)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in request.node.name)[-128:]


@pytest.fixture(params=MODES, ids=[f"{t}-{s}" for t, s in MODES])
def checkpointer(
    request: pytest.FixtureRequest, daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory, run: str,
) -> Checkpointer:
    transport, snapshot = request.param
    made = make_checkpointer(daemon.address, run, transport=transport, snapshot=snapshot)
    assert made.transport == transport
    return made


def test_tied_weights_are_stored_once_and_come_back_tied(checkpointer: Checkpointer) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    state = {"model": model.state_dict(), "ema": model.state_dict()}

    restored = save_and_restore(checkpointer, 1, state)

    tied = [restored[part][key] for part in ("model", "ema") for key in ("embed.weight",
                                                                          "head.weight")]
    assert all(tensor is tied[0] for tensor in tied)  # one tensor, as torch.load gives
    assert torch.equal(tied[0], model.embed.weight.detach())
    weight_bytes = model.embed.weight.numel() * 4
    assert checkpointer.step_infos()[-1].raw_bytes == weight_bytes  # the bytes once
    fresh = TiedLM()
    fresh.load_state_dict(restored["model"])
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_views_of_one_tensor_come_back_with_their_own_values(checkpointer: Checkpointer) -> None:
    base = torch.arange(24.0).reshape(6, 4)
    state = {"w": base, "row": base[2], "cols": base[:, 1:3], "t": base.t(),
             "zero_stride": torch.arange(4.0).reshape(4, 1).expand(4, 5)}

    restored = save_and_restore(checkpointer, 1, state)

    for key, tensor in state.items():
        assert restored[key].shape == tensor.shape and torch.equal(restored[key], tensor), key


def test_parameters_and_requires_grad_come_back_as_saved(checkpointer: Checkpointer) -> None:
    model = torch.nn.Linear(3, 2)
    grad = torch.randn(4, requires_grad=True)
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    state = {"params": model.state_dict(keep_vars=True), "grad": grad, "frozen": frozen,
             "plain": model.state_dict()}

    restored = save_and_restore(checkpointer, 1, state)

    for key in ("weight", "bias"):
        got = restored["params"][key]
        assert type(got) is torch.nn.Parameter and got.requires_grad, key
        assert torch.equal(got, getattr(model, key))
        plain = restored["plain"][key]  # the same bytes, saved without the Parameter
        assert type(plain) is torch.Tensor and not plain.requires_grad, key
        assert plain.data_ptr() == got.data_ptr()  # tied to the Parameter, stored once
    assert type(restored["grad"]) is torch.Tensor and restored["grad"].requires_grad
    assert restored["grad"].is_leaf and torch.equal(restored["grad"], grad)
    assert type(restored["frozen"]) is torch.nn.Parameter
    assert not restored["frozen"].requires_grad


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.resolve_conj().resolve_neg()
    return tensor.contiguous().unsqueeze(-1).view(torch.uint8)


def test_complex_and_float8_tensors_come_back_bit_for_bit(checkpointer: Checkpointer) -> None:
    torch.manual_seed(0)
    complex64 = torch.randn(5, 3, dtype=torch.complex64)
    state = {
        "freqs_cis": complex64,
        "transposed": complex64.t(),
        "conj": torch.randn(4, dtype=torch.complex128).conj(),
        "scalar": torch.tensor(1 + 2j, dtype=torch.complex64),
        "fp8": torch.randn(8, 4).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.randn(4).to(torch.float8_e5m2)[::2],
        "empty": torch.empty(0, 3, dtype=torch.float8_e4m3fn),
        "negated": torch.randn(3, dtype=torch.complex64).conj().imag,  # real, negative bit
    }

    # A rule asking for lossy storage of everything: raw bytes stay exact regardless.
    restored = save_and_restore(checkpointer, 1, state, bits=2)

    for key, tensor in state.items():
        got = restored[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(_bits(got), _bits(tensor)), key
    assert not restored["conj"].is_conj()


def test_lossy_rules_never_touch_raw_bytes(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, run: str
) -> None:
    checkpointer = make_checkpointer(daemon.address, run, policies=[("*", "lossy:2")])
    torch.manual_seed(0)
    state = {"c": torch.randn(4096, dtype=torch.complex64), "w": torch.randn(4096)}
    save_and_restore(checkpointer, 1, state)  # the base: stored exactly anyway
    update = {key: value + 1e-3 * torch.randn_like(value) for key, value in state.items()}

    restored = save_and_restore(checkpointer, 2, update)  # a delta, lossy where allowed

    assert torch.equal(restored["c"], update["c"])
    assert not torch.equal(restored["w"], update["w"])  # the rule did apply to the float


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        (torch.randn(3, 3).to_sparse(), ["sparse_coo", "to_dense()"]),
        (torch.empty(3, device="meta"), ["meta device", "to_empty"]),
        (collections.namedtuple("Pair", "a b")(1, 2), ["Pair", "_asdict()"]),
        ({1, 2}, ["set", "sorted(value)"]),
        (torch.Generator(), ["Generator", "get_state()"]),
        (torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
         ["float4_e2m1fn_x2", "complex64", "float8_e4m3fn"]),
    ],
    ids=["sparse", "meta", "namedtuple", "set", "generator", "float4"],
)
def test_unsupported_values_fail_in_save_naming_the_path_and_what_to_do(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, run: str, value: Any,
    fragments: list[str],
) -> None:
    checkpointer = make_checkpointer(daemon.address, run)
    with pytest.raises(TypeError) as info:
        checkpointer.save(1, {"model": {"layer.x": value}})
    message = str(info.value)
    assert "state['model']['layer.x']" in message
    for fragment in fragments:
        assert fragment in message
    assert checkpointer.save(1, {"ok": torch.ones(1)}).durable(60)  # nothing was held back


@pytest.fixture
def small_message_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> InProcessDaemon:
    running = start_in_process(tmp_path / "storage", listen=f"unix://{tmp_path}/small.sock",
                               max_message_bytes=2 << 20)
    request.addfinalizer(running.stop)
    return running


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_header_over_the_daemons_message_limit_fails_in_save(
    small_message_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    transport: str,
) -> None:
    checkpointer = make_checkpointer(small_message_daemon.address, "history",
                                     transport=transport)
    history = [0.5 + step for step in range(100_000)]  # a loss per step, as a Python list

    with pytest.raises(InvalidCheckpointError) as info:
        checkpointer.save(1, {"w": torch.ones(4), "losses": history})

    message = str(info.value)
    assert "max_message_bytes of 2097152" in message and "torch.tensor(values)" in message
    restored = save_and_restore(checkpointer, 1, {"w": torch.ones(4),
                                                  "losses": torch.tensor(history)})
    assert restored["losses"].tolist() == history
    assert checkpointer.steps() == [1]


@pytest.mark.parametrize(("transport", "when_busy"), [("grpc", "wait"), ("shm", "skip")])
def test_a_header_refused_by_grpcs_own_limit_fails_the_save_rather_than_skipping_it(
    small_message_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    transport: str, when_busy: str,
) -> None:
    """A daemon that does not advertise its message limit (0: unknown, as from a daemon
    older than the check above) gets a header over it: gRPC answers RESOURCE_EXHAUSTED
    without a ckptd reason. That is no busy daemon: the save fails, with what to do
    (before: it was skipped as busy, and ``wait`` raised nothing)."""
    checkpointer = make_checkpointer(small_message_daemon.address, "unadvertised",
                                     transport=transport, when_busy=when_busy)
    checkpointer.server_info.max_message_bytes = 0  # the header check has no limit to apply
    history = [0.5 + step for step in range(100_000)]  # a header of ~3 MB, over 2 MiB

    handle = checkpointer.save(1, {"w": torch.ones(4), "losses": history})

    with pytest.raises(GrpcLimitError) as info:
        handle.wait_durable(60)
    assert handle.state is SaveState.FAILED and not handle.skipped
    message = str(info.value)
    assert "RESOURCE_EXHAUSTED" in message and "not because the daemon was busy" in message
    assert "--max-message-bytes" in message and "as tensors" in message
    with pytest.raises(GrpcLimitError):
        checkpointer.wait(60)
    assert save_and_restore(checkpointer, 2, {"w": torch.ones(4)})["w"].tolist() == [1.0] * 4
