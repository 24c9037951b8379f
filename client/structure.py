"""Flattening a training state into named tensors plus a JSON description, and back.

The wire carries only named tensors and string metadata, so a state such as
``{"model": model.state_dict(), "optim": opt.state_dict(), "step": 7}`` is split into:

* leaves holding bytes — torch tensors and numpy arrays — each named by its path
  (``"model/fc.weight"``, ``"optim/state/0/exp_avg"``); ``/`` separates levels, and a key
  that contains ``/`` or ``~`` is escaped as in JSON Pointer (``~1``, ``~0``);
* a JSON tree (metadata key ``ckptd.structure``) recording container kinds (dict,
  OrderedDict, list, tuple, torch.Size), key types (str vs int) in their order, and every
  Python scalar inline, tagged with its type so ``1`` and ``1.0`` and ``True`` stay apart.
  Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the
  document stays strict JSON that any language can read.

Anything else raises ``TypeError`` naming the path: the client never pickles.
"""

from __future__ import annotations

import base64
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ckptd.protos import dtypes

STRUCTURE_KEY = "ckptd.structure"
FORMAT_VERSION = 1
ROOT_NAME = "@"

_TORCH_ROWS: dict[torch.dtype, dtypes.DTypeInfo] = {
    getattr(torch, row.torch_name): row for row in dtypes.BY_WIRE.values()
}
# bfloat16 has no numpy dtype; uint16 arrays are uint16.
_NUMPY_ROWS: dict[np.dtype, dtypes.DTypeInfo] = {
    row.numpy: row for row in dtypes.BY_WIRE.values() if not row.is_bfloat16
}


@dataclass(frozen=True)
class Leaf:
    """One tensor-like leaf of the state: its wire name and the object holding its bytes."""

    name: str
    value: torch.Tensor | np.ndarray
    dtype: dtypes.DTypeInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FlatState:
    """A flattened state: leaves in traversal order and the JSON structure document."""

    leaves: tuple[Leaf, ...]
    structure: str


def escape_key(key: str) -> str:
    """Escapes one path segment so ``/`` only ever separates levels."""
    return key.replace("~", "~0").replace("/", "~1")


def torch_dtype_info(dtype: torch.dtype) -> dtypes.DTypeInfo | None:
    """Returns the wire dtype row of a torch dtype, or None when the wire cannot carry it."""
    return _TORCH_ROWS.get(dtype)


def flatten(state: Any) -> FlatState:
    """Splits ``state`` into leaves and a structure document (see the module docstring).

    Raises:
        TypeError: A value, key or tensor dtype cannot be represented; names the path.
        ValueError: Two different keys flatten to the same tensor name.
    """
    walker = _Flattener()
    tree = walker.visit(state, ())
    document = {"format": FORMAT_VERSION, "root": tree}
    return FlatState(tuple(walker.leaves), json.dumps(document, allow_nan=False))


def unflatten(structure: str, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuilds the state described by ``structure`` from restored tensors (by name).

    Raises:
        ValueError: The document is not a structure this client understands (malformed
            JSON, nesting too deep, wrong types included), or it names a tensor that is
            missing.
    """
    try:
        document = json.loads(structure)  # JSONDecodeError is a ValueError
        if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
            found = document.get("format") if isinstance(document, dict) else None
            raise ValueError(
                f"unsupported {STRUCTURE_KEY} document (format {str(found)[:64]}); "
                f"this client reads format {FORMAT_VERSION}"
            )
        return _build(document["root"], tensors)
    except (RecursionError, LookupError, TypeError, AttributeError, ArithmeticError) as exc:
        # Hostile or damaged metadata (nesting past the recursion limit, missing keys,
        # wrong types) is a malformed document, never a crash of another kind.
        raise ValueError(
            f"malformed {STRUCTURE_KEY} document ({type(exc).__name__}: {str(exc)[:64]})"
        ) from None


class _Flattener:
    """Depth-first walk that collects leaves and returns the JSON node of each value."""

    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self._paths: dict[str, tuple[Any, ...]] = {}

    def visit(self, value: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray | np.generic):
            return self._array(value, path)
        if isinstance(value, dict):
            return self._mapping(value, path)
        kind = _SEQUENCE_KINDS.get(type(value))
        if kind is not None:
            items = [self.visit(item, (*path, i)) for i, item in enumerate(value)]
            return {"t": kind, "items": items}
        return _scalar_node(value, path)

    def _mapping(self, value: dict[Any, Any], path: tuple[Any, ...]) -> dict[str, Any]:
        if type(value) not in (dict, OrderedDict):
            raise TypeError(
                f"cannot checkpoint {_show(path)}: {type(value).__qualname__} is not supported;"
                " convert it to a dict"
            )
        items = [
            [_key_node(key, path), self.visit(item, (*path, key))] for key, item in value.items()
        ]
        node: dict[str, Any] = {
            "t": "odict" if type(value) is OrderedDict else "dict",
            "items": items,
        }
        meta = getattr(value, "_metadata", None)  # nn.Module.state_dict() versions
        if meta is not None and _is_plain_json(meta):
            node["meta"] = meta
        return node

    def _tensor(self, value: torch.Tensor, path: tuple[Any, ...]) -> dict[str, Any]:
        row = torch_dtype_info(value.dtype)
        if row is None:
            supported = ", ".join(sorted(dtypes.BY_NAME))
            raise TypeError(
                f"cannot checkpoint {_show(path)}: dtype {value.dtype} is not one of {supported}"
            )
        if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
            raise TypeError(
                f"cannot checkpoint {_show(path)}: only dense tensors with data are supported "
                f"(got layout {value.layout}, device {value.device}); call .to_dense() first"
            )
        return {"t": "tensor", "name": self._add(Leaf(self._name(path), value, row), path)}

    def _array(self, value: np.ndarray | np.generic, path: tuple[Any, ...]) -> dict[str, Any]:
        array = np.asarray(value)
        row = _NUMPY_ROWS.get(
            array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        )
        if row is None:
            raise TypeError(
                f"cannot checkpoint {_show(path)}: numpy dtype {array.dtype} is not supported"
            )
        node: dict[str, Any] = {
            "t": "ndarray",
            "name": self._add(Leaf(self._name(path), array, row), path),
        }
        if isinstance(value, np.generic):
            node["scalar"] = True
        return node

    def _name(self, path: tuple[Any, ...]) -> str:
        return "/".join(escape_key(str(part)) for part in path) if path else ROOT_NAME

    def _add(self, leaf: Leaf, path: tuple[Any, ...]) -> str:
        clash = self._paths.get(leaf.name)
        if clash is not None:
            raise ValueError(
                f"keys {_show(clash)} and {_show(path)} both flatten to tensor name "
                f"{leaf.name!r}; rename one of the keys"
            )
        self._paths[leaf.name] = path
        self.leaves.append(leaf)
        return leaf.name


_SEQUENCE_KINDS: dict[type, str] = {list: "list", tuple: "tuple", torch.Size: "size"}


def _show(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{part!r}]" for part in path)


def _key_node(key: Any, path: tuple[Any, ...]) -> list[Any]:
    if isinstance(key, str):
        return ["s", key]
    if isinstance(key, int) and not isinstance(key, bool):
        return ["i", key]
    raise TypeError(
        f"cannot checkpoint {_show(path)}: key {key!r} is a {type(key).__qualname__}; "
        "only str and int keys are supported"
    )


def _scalar_node(value: Any, path: tuple[Any, ...]) -> dict[str, Any]:
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": int(value)}
    if isinstance(value, float):
        number = float(value)
        return {"t": "float", "v": number if math.isfinite(number) else repr(number)}
    if isinstance(value, str):
        return {"t": "str", "v": str(value)}
    if isinstance(value, bytes):
        return {"t": "bytes", "v": base64.b64encode(value).decode("ascii")}
    if isinstance(value, torch.dtype):
        return {"t": "torch.dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"t": "torch.device", "v": str(value)}
    raise TypeError(
        f"cannot checkpoint {_show(path)}: values of type {type(value).__qualname__} are not "
        "supported (use tensors, numpy arrays, dict/list/tuple, int, float, bool, str, bytes, None)"
    )


def _is_plain_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _build(node: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    kind = node["t"]
    if kind in ("dict", "odict"):
        pairs = [(key, _build(item, tensors)) for (_, key), item in node["items"]]
        if kind == "dict":
            return dict(pairs)
        result: OrderedDict[Any, Any] = OrderedDict(pairs)
        if "meta" in node:
            result._metadata = node["meta"]  # type: ignore[attr-defined]
        return result
    if kind in ("list", "tuple", "size"):
        items = [_build(item, tensors) for item in node["items"]]
        return {"list": list, "tuple": tuple, "size": torch.Size}[kind](items)
    if kind in ("tensor", "ndarray"):
        return _build_leaf(node, tensors)
    return _build_scalar(kind, node.get("v"))


def _build_leaf(node: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    try:
        tensor = tensors[node["name"]]
    except KeyError:
        raise ValueError(
            f"the checkpoint's structure names tensor {node['name']!r}, which it does not hold"
        ) from None
    if node["t"] == "tensor":
        return tensor
    array = tensor.cpu().numpy()
    return array[()] if node.get("scalar") else array


def _build_scalar(kind: str, value: Any) -> Any:
    if kind == "none":
        return None
    if kind in ("bool", "int", "str"):
        return value
    if kind == "float":
        return float(value)  # float("nan") / float("inf") read the non-finite spellings
    if kind == "bytes":
        return base64.b64decode(value)
    if kind == "torch.dtype":
        return getattr(torch, value)
    if kind == "torch.device":
        return torch.device(value)
    raise ValueError(f"unknown node type {kind!r} in {STRUCTURE_KEY}; written by a newer client?")
