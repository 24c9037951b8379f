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

What ``torch.save`` keeps about a tensor beyond its bytes is kept too, as optional fields of
its node that older clients ignore:

* a tensor that another path already holds (tied weights: two state-dict keys over one
  storage, same offset, shape and strides) is stored once; its node names the first path's
  tensor, and the restored state holds one tensor at both paths, as ``torch.load`` does.
  Overlapping but different views are stored as their own bytes, and restored unshared;
* ``nn.Parameter`` (``"param"``) and ``requires_grad`` (``"grad"``) come back as saved;
* dtypes the wire has no row for (complex, float8) travel as their raw bytes — a uint8
  tensor with one more dimension of the element size, always stored exactly — in a node of
  type ``"bits"`` naming the dtype (``_BITS_DTYPES``), which an older client refuses rather
  than return the bytes.

Anything else raises ``TypeError`` naming the path: the client never pickles.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, is_dataclass, replace
from typing import Any

import numpy as np
import torch
from ckptd.protos import dtypes

STRUCTURE_KEY = "ckptd.structure"
FORMAT_VERSION = 1
ROOT_NAME = "@"
logger = logging.getLogger("ckptd.client")

_TORCH_ROWS: dict[torch.dtype, dtypes.DTypeInfo] = {
    getattr(torch, row.torch_name): row for row in dtypes.BY_WIRE.values()
}
# Dtypes carried as raw bytes ("bits" nodes), by the stable name the document holds; a name
# this torch lacks is left out (older releases had fewer float8 kinds).
_BITS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "complex32", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    )
    if hasattr(torch, name)
}
_BITS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _BITS_DTYPES.items()}
_RAW_ROW = dtypes.BY_NAME["uint8"]
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
    exact: bool = False
    """The raw bytes of a dtype the wire has no row for: stored exactly, whatever the rules."""
    aliases: tuple[str, ...] = ()
    """The names of other paths holding the same tensor (tied weights), stored as this
    leaf: a policy rule for any of them must agree with this one's (``header.py``)."""

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
        return _build(document["root"], tensors, {})
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
        self._stored: dict[tuple[Any, ...], int] = {}  # where a tensor's bytes -> its leaf

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
        if meta is not None:
            if _is_plain_json(meta):
                node["meta"] = meta  # (tuples in it come back as lists: JSON has no tuple)
            elif _show(path) not in _WARNED_METADATA:
                _WARNED_METADATA.add(_show(path))
                logger.warning(
                    "%s._metadata is not plain JSON (%s); saved without it, so "
                    "load_state_dict of the restored state sees no module versions",
                    _show(path), type(meta).__qualname__)
        return node

    def _tensor(self, value: torch.Tensor, path: tuple[Any, ...]) -> dict[str, Any]:
        _check_tensor(value, path)
        node: dict[str, Any] = {"t": "tensor"}
        bits = _BITS_NAMES.get(value.dtype)
        if bits is not None:
            node.update(t="bits", dtype=bits)
        if type(value) is torch.nn.Parameter:
            node["param"] = True
        if value.requires_grad:
            node["grad"] = True
        place = _placement(value)
        stored = self._stored.get(place) if place is not None else None
        if stored is not None:  # tied: another path holds these bytes already
            leaf = self.leaves[stored]
            self.leaves[stored] = replace(
                leaf, aliases=(*leaf.aliases, self._name(path)))
            node["name"] = leaf.name
            return node
        if bits is None:
            leaf = Leaf(self._name(path), value, _TORCH_ROWS[value.dtype])
        else:
            # One more dimension of the element size (stride 1), so any view, 0-d included,
            # reinterprets as bytes without a copy; a conjugate view is resolved first.
            raw = value.resolve_conj().unsqueeze(-1).view(torch.uint8)
            leaf = Leaf(self._name(path), raw, _RAW_ROW, exact=True)
        node["name"] = self._add(leaf, path)
        if place is not None:
            self._stored[place] = len(self.leaves) - 1
        return node

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
# Paths whose non-JSON ``_metadata`` was warned about: once per process, not once per save.
_WARNED_METADATA: set[str] = set()


def _check_tensor(value: torch.Tensor, path: tuple[Any, ...]) -> None:
    """Raises ``TypeError`` naming the path and what to save instead for a tensor whose
    bytes cannot be stored as they are."""
    where = f"cannot checkpoint {_show(path)}"
    if value.is_quantized:
        raise TypeError(
            f"{where}: quantized tensors (dtype {value.dtype}) are not supported; save "
            "t.dequantize(), or t.int_repr() with its scale and zero point"
        )
    if value.layout != torch.strided:
        raise TypeError(
            f"{where}: {value.layout} tensors are not supported; save t.to_dense(), or the "
            "tensors it is made of (indices() and values() of a COO tensor)"
        )
    if value.device.type == "meta":
        raise TypeError(
            f"{where}: a tensor on the meta device has no data; materialize it first "
            "(module.to_empty(device=...) and initialize it) or leave it out of the state"
        )
    if torch_dtype_info(value.dtype) is None and value.dtype not in _BITS_NAMES:
        supported = ", ".join(sorted([*dtypes.BY_NAME, *_BITS_DTYPES]))
        raise TypeError(f"{where}: dtype {value.dtype} is not one of {supported}")


def _placement(value: torch.Tensor) -> tuple[Any, ...] | None:
    """Where a tensor's bytes lie, so a second path over the same bytes (tied weights) is
    stored once; None for an empty tensor (no bytes, and no address to tell them apart),
    for a subclass, whose memory may not be its values (a wrapper's address is 0), and for
    a conjugate or negative view, whose values are not its memory's (``x.conj()`` over
    ``x``'s bytes)."""
    if (value.numel() == 0 or type(value) not in (torch.Tensor, torch.nn.Parameter)
            or value.is_conj() or value.is_neg()):
        return None
    return (value.device, value.dtype, value.data_ptr(), tuple(value.shape), value.stride())


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
        f"supported; {_instead(value)}"
    )


def _instead(value: Any) -> str:
    """What to save in place of an unsupported value (the end of its error message)."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return "save value._asdict() (a dict) or tuple(value) instead of the namedtuple"
    if is_dataclass(value):
        return "save dataclasses.asdict(value) instead of the dataclass"
    if isinstance(value, set | frozenset):
        return "save sorted(value) (a list) instead of the set"
    if isinstance(value, torch.Generator):
        return "save generator.get_state() (a uint8 tensor) and restore it with set_state()"
    return ("use tensors, numpy arrays, dict/list/tuple, int, float, bool, str, bytes, None, "
            "torch.dtype, torch.device")


def _is_plain_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _build(node: dict[str, Any], tensors: Mapping[str, torch.Tensor],
           built: dict[tuple[str, bool, bool], torch.Tensor]) -> Any:
    kind = node["t"]
    if kind in ("dict", "odict"):
        pairs = [(key, _build(item, tensors, built)) for (_, key), item in node["items"]]
        if kind == "dict":
            return dict(pairs)
        result: OrderedDict[Any, Any] = OrderedDict(pairs)
        if "meta" in node:
            result._metadata = node["meta"]  # type: ignore[attr-defined]
        return result
    if kind in ("list", "tuple", "size"):
        items = [_build(item, tensors, built) for item in node["items"]]
        return {"list": list, "tuple": tuple, "size": torch.Size}[kind](items)
    if kind in ("tensor", "bits"):
        return _build_tensor(node, tensors, built)
    if kind == "ndarray":
        array = _stored(node, tensors).cpu().numpy()
        return array[()] if node.get("scalar") else array
    return _build_scalar(kind, node.get("v"))


def _stored(node: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        return tensors[node["name"]]
    except KeyError:
        raise ValueError(
            f"the checkpoint's structure names tensor {node['name']!r}, which it does not hold"
        ) from None


def _build_tensor(node: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                  built: dict[tuple[str, bool, bool], torch.Tensor]) -> torch.Tensor:
    """The tensor of a node; paths that saved one tensor (tied) get one object back, and
    a Parameter or ``requires_grad`` comes back as saved."""
    param, grad = bool(node.get("param")), bool(node.get("grad"))
    key = (node["name"], param, grad)
    if key in built:
        return built[key]
    tensor = _stored(node, tensors)
    if node["t"] == "bits":
        tensor = _from_bits(tensor, node.get("dtype"))
    if param:
        tensor = torch.nn.Parameter(tensor, requires_grad=grad)
    elif grad:
        tensor = tensor.detach().requires_grad_(True)
    built[key] = tensor
    return tensor


def _from_bits(raw: torch.Tensor, name: Any) -> torch.Tensor:
    """A ``"bits"`` leaf (uint8, one more dimension of the element size) as its dtype."""
    dtype = _BITS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {str(name)[:64]!r} in {STRUCTURE_KEY}; "
                         "written by a newer client or torch?")
    size = dtype.itemsize
    if raw.dtype != torch.uint8 or raw.dim() == 0 or raw.shape[-1] != size:
        raise ValueError(f"a {name} tensor's bytes have shape {tuple(raw.shape)} and dtype "
                         f"{raw.dtype}; expected uint8 with a last dimension of {size}")
    return raw.contiguous().view(dtype).squeeze(-1)


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
