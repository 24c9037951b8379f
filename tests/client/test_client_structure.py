"""Flattening states into named tensors plus a JSON structure, and rebuilding them."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from ckptd.client.structure import STRUCTURE_KEY, flatten, unflatten


def roundtrip(state: Any) -> Any:
    """Flattens, copies every leaf into a fresh tensor (as a restore would), rebuilds."""
    flat = flatten(state)
    tensors = {}
    for leaf in flat.leaves:
        value = leaf.value
        tensors[leaf.name] = (
            torch.from_numpy(np.array(value, dtype=leaf.dtype.numpy, copy=True))
            if isinstance(value, np.ndarray)
            else value.detach().clone()
        )
    return unflatten(flat.structure, tensors)


def small_training_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3)
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
        "step": 7,
        "rng": torch.get_rng_state(),
    }


def test_names_are_paths_with_escaped_separators() -> None:
    state = {"model": {"fc.weight": torch.ones(2)}, "a/b~c": torch.ones(1), 3: [torch.ones(1)]}
    names = [leaf.name for leaf in flatten(state).leaves]
    assert names == ["model/fc.weight", "a~1b~0c", "3/0"]


def test_training_state_round_trips_and_loads() -> None:
    state = small_training_state()
    restored = roundtrip(state)

    assert list(restored) == list(state)
    assert type(restored["model"]) is OrderedDict
    assert list(restored["model"]) == list(state["model"])
    assert restored["model"]._metadata == state["model"]._metadata  # type: ignore[attr-defined]
    assert restored["optim"]["param_groups"] == state["optim"]["param_groups"]
    assert list(restored["optim"]["state"]) == [0, 1, 2, 3]  # int keys stay ints
    for key, tensor in state["model"].items():
        assert torch.equal(restored["model"][key], tensor)
        assert restored["model"][key].dtype == tensor.dtype
    assert torch.equal(restored["rng"], state["rng"])

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.load_state_dict(restored["model"])
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    optim.load_state_dict(restored["optim"])
    assert optim.state_dict()["state"][0]["exp_avg"].equal(state["optim"]["state"][0]["exp_avg"])


def test_python_scalars_keep_their_types_including_non_finite_floats() -> None:
    values: list[Any] = [
        0,
        -(2**70),
        1.0,
        -0.0,
        0.1,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        "",
        "é/~",
        b"\x00\xff",
        torch.float16,
        torch.device("cpu"),
    ]
    restored = roundtrip({"v": values, "t": (1, [2, (3,)]), "size": torch.Size([2, 3])})
    for got, want in zip(restored["v"], values, strict=True):
        assert type(got) is type(want)
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == want
    assert math.copysign(1.0, restored["v"][3]) == -1.0
    assert restored["t"] == (1, [2, (3,)]) and type(restored["t"][1][1]) is tuple
    assert type(restored["size"]) is torch.Size and restored["size"] == torch.Size([2, 3])


def test_structure_document_is_strict_json() -> None:
    flat = flatten({"x": [math.nan, math.inf], "y": 2**64})

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    document = json.loads(flat.structure, parse_constant=refuse)
    assert document["format"] == 1
    assert STRUCTURE_KEY == "ckptd.structure"


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        torch.tensor(3, dtype=torch.int64),
        torch.tensor([True, False]),
        torch.empty(0, 4),
        torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # non-contiguous
        torch.tensor([-1, 7], dtype=torch.int8),
        torch.tensor([1.5], dtype=torch.float64),
    ],
    ids=["bf16", "int64-0d", "bool", "empty", "transposed", "int8", "f64"],
)
def test_tensor_dtypes_and_shapes_round_trip(tensor: torch.Tensor) -> None:
    restored = roundtrip({"t": tensor})["t"]
    assert restored.dtype == tensor.dtype and restored.shape == tensor.shape
    assert torch.equal(restored, tensor)


def test_numpy_arrays_and_scalars_come_back_as_numpy() -> None:
    state = {"a": np.arange(4, dtype=">i4"), "s": np.float64(2.5), "b": np.array([True])}
    flat = flatten(state)
    assert [leaf.dtype.name for leaf in flat.leaves] == ["int32", "float64", "bool"]
    restored = roundtrip(state)
    assert isinstance(restored["a"], np.ndarray) and restored["a"].tolist() == [0, 1, 2, 3]
    assert type(restored["s"]) is np.float64 and restored["s"] == 2.5


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ({"model": {"w": object()}}, "state['model']['w']"),
        ({"x": {1.5: 2}}, "key 1.5"),
        ({"x": {True: 2}}, "key True"),
        ({"c": torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)},
         "torch.float4_e2m1fn_x2"),
        ({"s": {1, 2}}, "set"),
        ({"z": 1 + 2j}, "complex"),
        ({"sp": torch.eye(2).to_sparse()}, "dense"),
        ({"o": np.array(["a"], dtype=object)}, "numpy dtype object"),
    ],
)
def test_unsupported_values_raise_type_error_naming_the_path(state: Any, fragment: str) -> None:
    with pytest.raises(TypeError) as info:
        flatten(state)
    assert fragment in str(info.value)


def test_quantized_tensors_are_refused_naming_what_to_save() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors; users have some
        quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"state\['q'\]: quantized .*dequantize\(\)"):
        flatten({"q": quantized})


def test_dict_subclasses_are_refused() -> None:
    from collections import defaultdict

    with pytest.raises(TypeError, match=r"state\['d'\].*defaultdict"):
        flatten({"d": defaultdict(int)})


def test_keys_that_flatten_to_the_same_name_are_refused() -> None:
    with pytest.raises(ValueError, match="both flatten to tensor name '0'"):
        flatten({0: torch.ones(1), "0": torch.ones(1)})


def test_a_bare_tensor_is_a_valid_state() -> None:
    flat = flatten(torch.ones(2))
    assert [leaf.name for leaf in flat.leaves] == ["@"]
    assert torch.equal(roundtrip(torch.ones(2)), torch.ones(2))


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format 99"):
        unflatten(json.dumps({"format": 99, "root": {"t": "none"}}), {})


def test_missing_tensor_is_named() -> None:
    flat = flatten({"w": torch.ones(1)})
    with pytest.raises(ValueError, match="'w'"):
        unflatten(flat.structure, {})


class _Wrapper(torch.Tensor):
    """A wrapper subclass (as torchao's are): no storage of its own, address 0."""

    wrapped: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapper:
        made = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)
        made.wrapped = inner
        return made

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        def unwrap(x: Any) -> Any:
            return x.wrapped if isinstance(x, _Wrapper) else x

        return func(*[unwrap(a) for a in args],
                    **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_tensor_subclasses_save_their_values_and_are_never_taken_for_tied() -> None:
    state = {"a": _Wrapper(torch.arange(4.0)), "b": _Wrapper(torch.ones(4))}
    assert [leaf.name for leaf in flatten(state).leaves] == ["a", "b"]
    restored = roundtrip(state)
    assert type(restored["a"]) is torch.Tensor
    assert restored["a"].tolist() == [0.0, 1.0, 2.0, 3.0] and restored["b"].tolist() == [1.0] * 4


def test_tied_tensors_are_one_leaf_and_one_restored_object() -> None:
    weight = torch.randn(3, 2)
    state = {"embed": weight, "head": weight.detach(), "row": weight[0], "empty": torch.empty(0),
             "empty2": torch.empty(0)}
    flat = flatten(state)
    assert [leaf.name for leaf in flat.leaves] == ["embed", "row", "empty", "empty2"]
    restored = roundtrip(state)
    assert restored["head"] is restored["embed"]
    assert restored["row"] is not restored["embed"] and torch.equal(restored["row"], weight[0])
    assert flat.leaves[0].aliases == ("head",)


def test_conjugate_and_negative_views_are_never_taken_for_tied() -> None:
    """``x.conj()`` and ``y.conj().imag`` lie over the bytes of ``x`` and ``y.imag`` with
    their shapes and strides, but their values are not those bytes'."""
    x = torch.randn(4, dtype=torch.complex64)
    y = torch.randn(4, dtype=torch.complex64)
    state = {"x": x, "x_conj": x.conj(), "im": y.imag, "neg_im": y.conj().imag}
    assert len(flatten(state).leaves) == 4
    restored = roundtrip(state)
    assert torch.equal(restored["x_conj"], x.conj().resolve_conj())
    assert torch.equal(restored["neg_im"], -y.imag) and torch.equal(restored["im"], y.imag)


def test_a_metadata_that_is_not_json_is_left_out_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state: OrderedDict[str, Any] = OrderedDict(w=torch.ones(2))
    state._metadata = {"": {"version": object()}}  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="ckptd.client"):
        for _ in range(3):
            restored = roundtrip({"odd_model": state})
    assert not hasattr(restored["odd_model"], "_metadata")
    warned = [r for r in caplog.records if "_metadata is not plain JSON" in r.getMessage()]
    assert len(warned) == 1 and "state['odd_model']" in warned[0].getMessage()
