"""Reductions over positions inside the modules that pool: over visible positions, or refused.

Squeeze-excitation and its relatives (SE, ECA, CBAM, selective kernels, split attention), global
context blocks (softmax attention pooling) and statistics norms (FilterResponseNorm, EvoNorm)
pool over positions in their own ``forward`` code, then run ordinary layers on the pooled vectors.
A dense reduction would count the masked zeros and leak the mask into every gate. No list of
"the reductions SE blocks use" can be complete (``x.amin((2, 3))``, ``x.flatten(2).max(-1)``, a
full-size ``F.max_pool2d``, ``topk`` ...), so this module is **default-deny**.

How an operation is recognised as a reduction over positions
-----------------------------------------------------------
:class:`PositionMode` (a scoped :class:`torch.overrides.TorchFunctionMode`) follows the positions
through the module's code. The module's input map [B, C, H, W] is tagged with one label per
dimension (``b``, ``-``, ``h``, ``w``); every torch call on a tagged tensor propagates the labels:

* layout operations (view, reshape, flatten, permute, transpose, unsqueeze, squeeze, indexing that
  keeps whole positional dims, cat/split along non-positional dims, dtype casts, ...) move them;
  ``h`` and ``w`` merged in row-major order become ``hw`` (a flattened position axis), and any
  other merge that involves positions becomes ``p`` (positions in an unknown arrangement);
* operations ATen tags ``pointwise`` (``torch.Tag.pointwise``: add, mul, sigmoid, where, ...) and
  dropout broadcast them;
* convolutions and poolings whose window is smaller than the map keep them (a local window; the
  masked positions hold zeros, as in SparK's own sparse convolution);
* sub-modules that are themselves sparse layers (converted convolutions, norms) are trusted: their
  output is tagged as a map that is exactly zero at masked positions.

A call whose reduced dimensions include a positional label is a reduction over positions: a
reduction over dims 2-3, over a flattened position axis, a pooling or convolution whose window
covers the map, sort/top-k/k-th value/median/quantile/logsumexp/softmax along positions, or a
matrix product that contracts a positional dimension (attention). Any other call that receives a
tagged tensor and is neither layout, pointwise, local nor a known reduction is refused as well.

What is converted, what is refused
----------------------------------
Converted, with the module's own mask, over *all* positional dims at once:
``mean``/``nanmean``, ``sum``/``nansum``, ``var``/``std`` (any correction), ``var_mean``/``std_mean``,
``amax``/``amin``/``max``/``min`` (values and indices)/``aminmax``, ``logsumexp``, ``softmax`` and
``log_softmax`` (masked logits excluded: the attention weights are exactly 0 there), vector norms
and ``F.normalize``, global adaptive pools and full-window max/avg pooling; a matrix product that
contracts positions when one factor is exactly zero at masked positions (a sum over visible
positions: global-context and attention pooling after a converted softmax).
Refused, naming the module, its class and the operation: reductions over only some of the
positional dims or over positions in an unknown arrangement (``p``); order statistics and scans
(sort, argsort, top-k, k-th value, median, quantile, mode, cumulative ops, argmax/argmin), products,
any/all, counting, gather/index/roll/flip along positions, interpolation, einsum, a product over
positions with neither factor zero at masked positions (non-local, all-pairs attention), and every
unrecognised operation on a positional tensor.

The same machinery runs once on the dense model at construction (``PositionMode(None, ...)``, the
audit): it finds the modules whose own code reduces over positions (they get this mode at run
time) and refuses unconvertible code before any training. No global state: a mode lives for one
forward call of one module, and nests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .layers import SparseLayer, UnsupportedLayerError, describe_layer
from .masking import ActiveMask
from .norms import visible_mean, visible_moments

POSITIONAL = ("h", "w", "hw", "p")
Labels = tuple[Optional[str], ...]  # per dimension: 'b', 'h', 'w', 'hw', 'p' or None


@dataclass
class Track:
    """What is known of a tensor derived from the module's input map."""

    labels: Labels
    grid: tuple[int, int]  # (H, W) of the map the positions belong to
    zero_masked: bool  # exactly 0 at every masked position

    @property
    def positional(self) -> bool:
        return any(label in POSITIONAL for label in self.labels)


# ----------------------------------------------------------------------------------------------
# Recognising operations


def _base_name(func: Callable) -> str:
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__") and name != "__get__":
        name = name[2:-2]
        if name.startswith("i") and name[1:] in _DUNDER_BINARY:  # __iadd__ -> add_
            name = name[1:] + "_"
        elif name.startswith("r") and name[1:] in _DUNDER_BINARY:  # __radd__ -> add
            name = name[1:]
    return name


_DUNDER_BINARY = {"add", "sub", "mul", "truediv", "floordiv", "div", "pow", "mod", "and", "or", "xor",
                  "matmul", "lshift", "rshift"}
_DUNDER_ALIASES = {"truediv": "div", "floordiv": "floor_divide", "and": "bitwise_and", "or": "bitwise_or",
                   "xor": "bitwise_xor", "invert": "bitwise_not", "mod": "remainder", "lt": "lt", "gt": "gt"}
# pointwise in effect but not tagged (or not an ATen name): random masks per element or channel, casts
_EXTRA_POINTWISE = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                    "relu6", "hardtanh", "hardtanh_", "threshold", "leaky_relu", "elu", "selu", "celu", "gelu",
                    "silu", "mish", "hardswish", "hardsigmoid", "softplus", "softsign", "tanhshrink", "logsigmoid",
                    "rrelu", "glu_", "relu_", "sigmoid_", "tanh_", "neg", "abs", "clamp_min", "clamp_max"}
_METADATA = {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "len", "ndimension", "nelement",
             "element_size", "is_floating_point", "is_complex", "data_ptr", "storage_offset", "get_device",
             "format", "repr", "hash", "untyped_storage", "has_names", "index", "int",
             "float_", "bool", "is_nonzero", "dim_order", "is_inference", "register_hook", "retain_grad",
             "backward", "requires_grad_", "is_shared", "is_pinned", "__reduce_ex__", "reduce_ex", "setstate",
             "deepcopy"}
_ESCAPES = {"tolist", "item", "numpy", "__array__", "array"}  # values leave torch's sight
_LAYOUT = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "permute", "transpose", "swapaxes",
           "swapdims", "movedim", "moveaxis", "unsqueeze", "squeeze", "expand", "expand_as", "contiguous",
           "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "detach", "t",
           "getitem", "cat", "concat", "concatenate", "stack", "split", "chunk", "unbind", "tensor_split",
           "narrow", "squeeze_", "unsqueeze_"}
_LOCAL_WINDOWS = {"conv1d", "conv2d", "conv3d", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d",
                  "lp_pool1d", "lp_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                  "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"}
_CONVERTIBLE = {"mean", "nanmean", "sum", "nansum", "var", "std", "var_mean", "std_mean", "amax", "amin", "max",
                "min", "aminmax", "logsumexp", "softmax", "log_softmax", "norm", "vector_norm", "normalize"}
_MATMUL = {"matmul", "bmm", "mm"}


@functools.cache
def is_pointwise(name: str) -> bool:
    """Whether ATen tags the op ``name`` (or its in-place form) pointwise: each output element is a
    function of the input elements at the same (broadcast) index."""
    name = _DUNDER_ALIASES.get(name, name)
    if name in _EXTRA_POINTWISE:
        return True
    for candidate in (name, name.rstrip("_")):
        packet = getattr(torch.ops.aten, candidate, None)
        if packet is None:
            continue
        try:
            overloads = [getattr(packet, o) for o in packet.overloads()]
        except (AttributeError, RuntimeError):
            continue
        if any(torch.Tag.pointwise in o.tags for o in overloads):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Propagating labels through layout operations


def _dims(dim: Any, ndim: int) -> Optional[tuple[int, ...]]:
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % ndim for d in dims)) if dims else None


def reshape_labels(labels: Labels, shape_in: Sequence[int], shape_out: Sequence[int]) -> Labels:
    """Labels after a view/reshape from ``shape_in`` to ``shape_out`` (row-major)."""
    keep_in = [i for i, s in enumerate(shape_in) if s != 1]
    keep_out = [i for i, s in enumerate(shape_out) if s != 1]
    out: list[Optional[str]] = [None] * len(shape_out)
    i = j = 0
    while i < len(keep_in) and j < len(keep_out):
        group_in, group_out = [keep_in[i]], [keep_out[j]]
        p_in, p_out = shape_in[keep_in[i]], shape_out[keep_out[j]]
        while p_in != p_out:
            if p_in < p_out:
                i += 1
                group_in.append(keep_in[i])
                p_in *= shape_in[keep_in[i]]
            else:
                j += 1
                group_out.append(keep_out[j])
                p_out *= shape_out[keep_out[j]]
        got = [labels[k] for k in group_in]
        if len(group_in) == len(group_out):  # dims kept as they are
            new = got
        elif len(group_out) == 1 and got == ["h", "w"]:
            new = ["hw"]
        elif len(group_in) == 1 and got == ["hw"] and len(group_out) == 2:
            new = ["h", "w"]
        elif any(g is not None for g in got):
            new = ["p"] * len(group_out)  # batch or positions merged with something else
        else:
            new = [None] * len(group_out)
        for k, label in zip(group_out, new):
            out[k] = label
        i += 1
        j += 1
    return tuple(out)


def _split_dim_labels(labels: Labels, ndim: int) -> Labels:
    return tuple(labels) + (None,) * (ndim - len(labels))


# ----------------------------------------------------------------------------------------------
# The mode


def _refusal(owner: str, module: Optional[nn.Module], op: str, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(describe_layer(owner, module, f"computes {op} {why}; it cannot run sparsely "
                                                "(use another model or add a sparse version of the block)"))


class _Refused(Exception):
    """An operation that cannot run sparsely (raised inside the mode, reported by its caller)."""

    def __init__(self, op: str, why: str) -> None:
        super().__init__(f"{op} {why}")
        self.op, self.why = op, why


class PositionMode(TorchFunctionMode):
    """Follows positions through one module's code; converts or refuses reductions over them.

    Args:
        active: the encoder's mask holder (run time), or None for the construction audit, which
            only records (``found``) and never converts.
        owner: the module's name (for messages), ``module`` the module itself.
        audit: the construction audit's stack of running module names (innermost last), so that a
            finding is charged to the module whose own code made the call.
    """

    def __init__(self, active: Optional[ActiveMask], owner: str = "", module: Optional[nn.Module] = None,
                 audit: Optional["Audit"] = None) -> None:
        super().__init__()
        self.active, self.owner, self.module, self.audit = active, owner, module, audit
        self.tracks: dict[int, tuple[torch.Tensor, Track]] = {}
        self.trusted = 0  # >0 while a trusted sub-module (a sparse layer) runs

    # -- bookkeeping
    def tag(self, x: Any, track: Track) -> None:
        if isinstance(x, torch.Tensor) and track.positional:
            self.tracks[id(x)] = (x, track)

    def track_of(self, x: Any) -> Optional[Track]:
        if not isinstance(x, torch.Tensor):
            return None
        entry = self.tracks.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None

    def tag_input_map(self, x: Any, zero_masked: bool = True) -> None:
        """The module's input: a [B, C, H, W] map, or [B, paths, C, H, W] (selective kernels' stacked paths)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 4 or x.shape[-2:] == (1, 1):
            return
        labels = ("b",) + (None,) * (x.dim() - 3) + ("h", "w")
        self.tag(x, Track(labels, (int(x.shape[-2]), int(x.shape[-1])), zero_masked))

    def _where(self) -> tuple[str, Optional[nn.Module]]:
        if self.audit is not None:
            return self.audit.current()
        return self.owner, self.module

    def refuse(self, op: str, why: str) -> "_Refused":
        return _Refused(op, why)

    def _found(self, op: str) -> None:
        """Audit: record a convertible reduction over positions for the module whose code runs it."""
        if self.audit is not None:
            self.audit.record(op, True, "")

    # -- dispatch
    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if self.trusted:
            return func(*args, **kwargs)
        try:
            return self._dispatch(func, args, kwargs)
        except _Refused as refused:
            if self.audit is None:
                name, module = self._where()
                raise _refusal(name, module, refused.op, refused.why) from None
            self.audit.record(refused.op, False, refused.why)
            return func(*args, **kwargs)  # the audit goes on (untracked) to find every other finding

    def _dispatch(self, func: Any, args: Sequence, kwargs: dict) -> Any:
        tensors = [a for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)]
        tracked = [(t, self.track_of(t)) for t in tensors]
        tracked = [(t, tr) for t, tr in tracked if tr is not None]
        name = _base_name(func)
        if not tracked:
            return func(*args, **kwargs)
        if name in _ESCAPES:
            raise self.refuse(f"'{name}'", "on a map with positions: its values leave torch, where spark-det cannot "
                              "follow which of them are masked")
        if name in _METADATA:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and name == "__get__":  # x.T, x.mT, x.data
                self._tag_property(out, tracked[0])
            return out
        if name in _LAYOUT:
            return self._layout(func, name, args, kwargs, tracked)
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            name = "maximum"  # the binary form is pointwise
        reduction = name in _CONVERTIBLE or name in _REFUSED_REDUCTIONS
        if not reduction and (is_pointwise(name) or name in ("maximum", "minimum")):
            out = func(*args, **kwargs)
            self._tag_pointwise(out, tracked, name, args)
            return out
        source = self.track_of(args[0]) if args else None
        if source is None and name not in _MATMUL:  # the positional tensor is not the input (e.g. out=)
            raise self.refuse(f"'{name}'", "with a map with positions as a secondary argument")
        if name in _LOCAL_WINDOWS:
            return self._window(func, name, args, kwargs, (args[0], source))
        if name in _MATMUL:
            return self._matmul(func, name, args, kwargs)
        if name == "layer_norm":
            x, tr = args[0], source
            normalized = kwargs.get("normalized_shape", args[1] if len(args) > 1 else ())
            dims = tuple(range(x.dim() - len(normalized), x.dim()))
            if any(tr.labels[d] in POSITIONAL for d in dims):
                raise self.refuse("layer_norm over positions", "(a norm over the map)")
            out = func(*args, **kwargs)
            self.tag(out, Track(tr.labels, tr.grid, False))
            return out
        if reduction:
            x, tr = args[0], source
            dims = self._reduced_dims(name, x, args, kwargs)
            if not any(tr.labels[d] in POSITIONAL for d in dims):
                out = func(*args, **kwargs)
                self._tag_reduced(out, tr, dims, name, args, kwargs)
                return out
            return self._over_positions(func, name, x, tr, dims, args, kwargs)
        raise self.refuse(f"'{name}'", "on a map with positions, and it is not recognised as per-position, "
                          "a local window or a reduction spark-det converts")

    # -- categories
    def _tag_property(self, out: torch.Tensor, source: tuple[torch.Tensor, Track]) -> None:
        x, tr = source
        if out.shape == x.shape:
            self.tag(out, tr)
        elif tuple(out.shape) == tuple(reversed(x.shape)):
            self.tag(out, Track(tuple(reversed(tr.labels)), tr.grid, tr.zero_masked))
        elif out.dim() == x.dim() and out.shape[:-2] == x.shape[:-2]:
            self.tag(out, Track(tr.labels[:-2] + (tr.labels[-1], tr.labels[-2]), tr.grid, tr.zero_masked))
        else:
            raise self.refuse("a tensor property", "that reshapes a map with positions")

    def _tag_pointwise(self, out: Any, tracked: list, name: str, args: Sequence) -> None:
        """Labels broadcast from the tracked operands; zero at masked positions when the op keeps it so."""
        if not isinstance(out, torch.Tensor):
            return
        labels: list[Optional[str]] = [None] * out.dim()
        for t, tr in tracked:
            offset = out.dim() - t.dim()
            for d, label in enumerate(tr.labels):
                if label is not None and t.shape[d] != 1:
                    labels[offset + d] = label
        zero_tracked = [t for t, tr in tracked if tr.zero_masked]
        if name.rstrip("_") == "mul":
            zero = bool(zero_tracked)
        elif name.rstrip("_") in ("div", "true_divide"):
            zero = bool(args) and any(args[0] is t for t in zero_tracked)
        else:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            zero = len(tensors) == len(zero_tracked) and _keeps_zero(name, args)
        self.tag(out, Track(tuple(labels), tracked[0][1].grid, zero))

    def _layout(self, func: Any, name: str, args: Sequence, kwargs: dict, tracked: list) -> Any:
        out = func(*args, **kwargs)
        x, tr = tracked[0]
        if name not in ("cat", "concat", "concatenate", "stack"):
            x, tr = args[0], self.track_of(args[0])
            if tr is None:  # e.g. untracked.expand_as(tracked): no information from the map
                return out
        if name in ("cat", "concat", "concatenate", "stack"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            ref = x.dim() + (1 if name == "stack" else 0)
            dim = dim % ref
            if name == "stack":
                labels = tr.labels[:dim] + (None,) + tr.labels[dim:]
            else:
                if tr.labels[dim] is not None:
                    raise self.refuse(f"'{name}' along positions", "(it changes the map's grid)")
                labels = tr.labels
            parts = [t for t in args[0] if isinstance(t, torch.Tensor)]
            zero = all(self.track_of(t) is not None and self.track_of(t).zero_masked for t in parts)
            self.tag(out, Track(labels, tr.grid, zero))
            return out
        if name in ("split", "chunk", "unbind", "tensor_split"):
            position = 1 if name == "unbind" else 2
            dim = kwargs.get("dim", args[position] if len(args) > position else 0) % x.dim()
            if tr.labels[dim] is not None:
                raise self.refuse(f"'{name}' along positions", "(it selects some positions)")
            labels = tr.labels[:dim] + tr.labels[dim + 1:] if name == "unbind" else tr.labels
            for piece in out:
                self.tag(piece, Track(labels, tr.grid, tr.zero_masked))
            return out
        if not isinstance(out, torch.Tensor):
            return out
        if name == "getitem":
            labels = self._index_labels(x, tr, args[1] if len(args) > 1 else kwargs.get("idx"))
        elif out.shape == x.shape and name not in ("permute", "transpose", "swapaxes", "swapdims", "movedim",
                                                    "moveaxis", "t"):
            labels = tr.labels
        elif name in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"):
            labels = self._permuted(name, x, tr, args, kwargs)
        else:
            labels = reshape_labels(tr.labels, x.shape, out.shape)
        self.tag(out, Track(labels, tr.grid, tr.zero_masked))
        return out

    def _permuted(self, name: str, x: torch.Tensor, tr: Track, args: Sequence, kwargs: dict) -> Labels:
        """Labels after a dimension permutation: the same call on a meta tensor whose sizes name its dims."""
        named = torch.empty(tuple(range(2, x.dim() + 2)), device="meta")
        func = getattr(torch.Tensor, name)
        moved = func(named, *args[1:], **kwargs)
        return tuple(tr.labels[s - 2] for s in moved.shape)

    def _index_labels(self, x: torch.Tensor, tr: Track, index: Any) -> Labels:
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (torch.Tensor, list)) for i in index) or index.count(Ellipsis) > 1:
            if tr.positional:
                raise self.refuse("tensor indexing", "of a map with positions (it selects positions)")
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        labels: list[Optional[str]] = []
        d = 0
        for i in index:
            if i is Ellipsis:
                for _ in range(x.dim() - n_real):
                    labels.append(tr.labels[d])
                    d += 1
            elif i is None:
                labels.append(None)
            elif isinstance(i, slice):
                if tr.labels[d] in POSITIONAL and i != slice(None):
                    raise self.refuse("slicing along positions", "(it selects some positions)")
                labels.append(tr.labels[d])
                d += 1
            else:  # an integer
                if tr.labels[d] in POSITIONAL or tr.labels[d] == "b":
                    raise self.refuse("indexing one position", "(it selects a position)") \
                        if tr.labels[d] in POSITIONAL else self.refuse("indexing one sample", "of a map")
                d += 1
        labels.extend(tr.labels[d:])
        return tuple(labels)

    def _reduced_dims(self, name: str, x: torch.Tensor, args: Sequence, kwargs: dict) -> tuple[int, ...]:
        """The dims a reduction-like call reduces over (all of them when it takes no dim)."""
        dim = bind(name, args, kwargs).get("dim")
        return _dims(dim, x.dim()) or tuple(range(x.dim()))

    def _tag_reduced(self, out: Any, tr: Track, dims: tuple[int, ...], name: str, args: Sequence,
                     kwargs: dict) -> None:
        """Labels of a reduction's output over non-positional dims."""
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if not isinstance(o, torch.Tensor):
                continue
            if o.dim() == len(tr.labels):
                labels = tuple(None if d in dims and o.shape[d] == 1 else label for d, label in enumerate(tr.labels))
            else:
                labels = tuple(label for d, label in enumerate(tr.labels) if d not in dims)
            if len(labels) == o.dim():
                self.tag(o, Track(labels, tr.grid, tr.zero_masked and name in ("sum", "nansum", "amax", "amin",
                                                                                "max", "min", "mean", "normalize")))
            elif tr.positional:
                raise self.refuse(f"'{name}'", "whose output layout spark-det cannot follow")

    def _window(self, func: Any, name: str, args: Sequence, kwargs: dict, source: tuple) -> Any:
        x, tr = source
        out = func(*args, **kwargs)
        values = out[0] if isinstance(out, tuple) else out
        spatial = 1 if name.endswith("1d") else 2
        in_hw, out_hw = tuple(x.shape[-spatial:]), tuple(values.shape[-spatial:])
        positions_last = tuple(tr.labels[-spatial:]) in (("h", "w"), ("hw",), ("w",), ("h",))
        if not positions_last:
            if tr.positional:
                raise self.refuse(f"'{name}'", "on a tensor whose last dims are not its positions")
            return out
        covers = math.prod(out_hw) == 1 and math.prod(in_hw) > 1
        if not covers:
            if "adaptive" in name and out_hw != in_hw:
                raise self.refuse(f"'{name}' to {out_hw}", "(pooling to a coarser grid mixes patches)")
            if values.shape[-spatial:] != x.shape[-spatial:] and name in ("conv1d",) and tr.labels[-1] == "hw":
                raise self.refuse(f"'{name}' along a flattened position axis", "")
            labels = tr.labels
            self.tag(values, Track(labels, (int(values.shape[-2]), int(values.shape[-1])) if spatial == 2
                                   else tr.grid, False))
            return out
        # the window covers the whole map: a reduction over positions
        kind = "max" if "max" in name else "mean" if "avg" in name else None
        if kind is None or spatial != 2 or tuple(tr.labels[-2:]) != ("h", "w") or name.endswith("with_indices") \
                or kwargs.get("return_indices") or tr.labels[0] != "b":
            raise self.refuse(f"'{name}'", "over the whole map (a pooling or convolution whose window covers it)")
        self._found(f"'{name}' over the whole map")
        if self.active is None:
            return out
        mask = self._mask_for(x, tr)
        if kind == "mean":
            return visible_mean(x, mask, (x.dim() - 2, x.dim() - 1))
        return x.masked_fill(~mask.bool(), float("-inf")).amax((-2, -1), keepdim=True)

    def _matmul(self, func: Any, name: str, args: Sequence, kwargs: dict) -> Any:
        a, b = args[0], args[1]
        ta, tb = self.track_of(a), self.track_of(b)
        out = func(*args, **kwargs)
        la = ta.labels if ta else (None,) * a.dim()
        lb = tb.labels if tb else (None,) * b.dim()
        if a.dim() < 2 or b.dim() < 2:
            raise self.refuse(f"'{name}'", "of a vector with a map with positions")
        contracted = {la[-1], lb[-2]} & set(POSITIONAL)
        if contracted:
            zero = (ta is not None and ta.zero_masked and la[-1] in POSITIONAL) or \
                   (tb is not None and tb.zero_masked and lb[-2] in POSITIONAL)
            if la[-1] != lb[-2] or not zero:
                why = ("over positions where neither factor is zero at masked positions (all-pairs or "
                       "non-local attention)" if la[-1] == lb[-2] else "between different position axes")
                raise self.refuse(f"a matrix product '{name}'", why)
            self._found(f"a matrix product '{name}' over positions")
            # a product over positions with a factor zero at masked positions sums visible terms only
        if la[-2] in POSITIONAL and lb[-1] in POSITIONAL:
            raise self.refuse(f"a matrix product '{name}'", "that pairs every position with every other "
                              "(all-pairs or non-local attention)")
        batch_a, batch_b = la[:-2], lb[:-2]
        n = out.dim() - 2
        batch = [None] * n
        for labels in (batch_a, batch_b):
            for k, label in enumerate(labels):
                batch[n - len(labels) + k] = batch[n - len(labels) + k] or label
        labels = tuple(batch) + (la[-2], lb[-1])
        grid = (ta or tb).grid
        zero = bool((ta and ta.zero_masked and la[-2] in POSITIONAL)
                    or (tb and tb.zero_masked and lb[-1] in POSITIONAL))
        self.tag(out, Track(labels, grid, zero))
        return out

    # -- reductions over positions
    def _mask_for(self, x: torch.Tensor, tr: Track) -> torch.Tensor:
        """The visibility mask (x's dtype, 0/1) broadcastable to ``x`` following its labels."""
        mask = self.active.at(tr.grid, x.dtype if x.is_floating_point() else torch.float32)
        B, H, W = mask.shape[0], mask.shape[-2], mask.shape[-1]
        if "hw" in tr.labels:
            names, base = ["b", "hw"], mask.view(B, H * W)
        else:  # a positional dim of size 1 may have been dropped by a reshape
            names = ["b"] + [n for n, size in (("h", H), ("w", W)) if n in tr.labels or size != 1]
            base = mask.view(B, *[H if n == "h" else W for n in names[1:]])
        if any(n not in tr.labels for n in names):
            raise self.refuse("a reduction over positions", "on a tensor whose positions spark-det cannot follow")
        where = {label: d for d, label in enumerate(tr.labels) if label in names}
        order = sorted(names, key=lambda n: where[n])
        base = base.permute(*[names.index(n) for n in order])
        shape = [1] * x.dim()
        for n in order:
            shape[where[n]] = base.shape[order.index(n)]
        if x.shape[where["b"]] != B:
            raise self.refuse("a reduction over positions", f"on a batch of {x.shape[where['b']]} maps "
                              f"under a mask of {B}")
        return base.reshape(shape)

    def _over_positions(self, func: Any, name: str, x: torch.Tensor, tr: Track, dims: tuple[int, ...],
                        args: Sequence, kwargs: dict) -> Any:
        positional_dims = tuple(d for d, label in enumerate(tr.labels) if label in POSITIONAL)
        if name in _REFUSED_REDUCTIONS:
            why = _REFUSED_REDUCTIONS[name]
        elif "p" in tr.labels:
            why = "over positions in an arrangement spark-det cannot follow (batch or positions merged)"
        elif not set(positional_dims) <= set(dims):
            why = "over some but not all of the map's positional dimensions"
        elif "b" not in tr.labels:
            why = "over positions of maps whose batch dimension spark-det cannot follow"
        elif name in ("norm", "vector_norm", "normalize") and not _positive_order(bind(name, args, kwargs)):
            why = "(a norm of order <= 0 is decided by the smallest value, which a masked zero would be)"
        else:
            why = ""
        if why:
            raise self.refuse(f"'{name}' over positions", why)
        self._found(f"'{name}' over positions")
        if self.active is None:  # the audit: record only
            out = func(*args, **kwargs)
            if name in ("softmax", "log_softmax", "normalize"):
                self.tag(out, Track(tr.labels, tr.grid, name != "log_softmax"))
            return out
        mask = self._mask_for(x, tr)
        out = _visible_reduction(name, x, mask, positional_dims, dims, args, kwargs)
        if name in ("softmax", "log_softmax", "normalize"):
            self.tag(out, Track(tr.labels, tr.grid, name != "log_softmax"))
        return out


_REFUSED_REDUCTIONS = {
    **{n: "(an order statistic over positions)" for n in ("sort", "argsort", "msort", "topk", "kthvalue", "median",
                                                          "nanmedian", "quantile", "nanquantile", "mode")},
    **{n: "(a scan along positions)" for n in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    **{n: "(a position index)" for n in ("argmax", "argmin")},
    **{n: "(a product, count or logical reduction over positions)" for n in ("prod", "all", "any", "count_nonzero")},
}


# The arguments after the input of each reduction-like call, in order (torch's own signatures), and
# the default dim when none is given (None: all dims).
_SIGNATURES: dict[str, tuple[tuple[str, ...], Any]] = {
    **{n: (("dim", "keepdim"), None) for n in ("mean", "nanmean", "sum", "nansum", "amax", "amin", "max", "min",
                                              "logsumexp", "median", "nanmedian", "argmax", "argmin", "prod", "all",
                                              "any", "count_nonzero", "aminmax")},
    **{n: (("dim", "unbiased", "keepdim"), None) for n in ("var", "std", "var_mean", "std_mean")},
    **{n: (("dim", "_stacklevel", "dtype"), None) for n in ("softmax", "log_softmax")},
    **{n: (("dim",), None) for n in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")},
    **{n: (("dim", "descending"), -1) for n in ("sort", "argsort")},
    "msort": ((), 0), "mode": (("dim", "keepdim"), -1),
    "topk": (("k", "dim"), -1), "kthvalue": (("k", "dim", "keepdim"), -1),
    "quantile": (("q", "dim", "keepdim"), None), "nanquantile": (("q", "dim", "keepdim"), None),
    "norm": (("p", "dim", "keepdim"), None), "vector_norm": (("ord", "dim", "keepdim"), None),
    "normalize": (("p", "dim", "eps"), 1),
}


def _positive_order(bound: dict) -> bool:
    """Whether a norm's order p is > 0 (or 'fro'): then masked zeros add nothing to it."""
    p = bound.get("p", bound.get("ord", 2))
    return p is None or p == "fro" or (isinstance(p, (int, float)) and p > 0)


def bind(name: str, args: Sequence, kwargs: dict) -> dict:
    """``args[1:]`` and ``kwargs`` of a reduction-like call by parameter name (``dim`` always present)."""
    params, default = _SIGNATURES[name]
    bound: dict = {}
    rest = list(args[1:])
    if name in ("var", "std", "var_mean", "std_mean") and rest and isinstance(rest[0], bool):
        rest.insert(0, None)  # var(x, unbiased)
    if rest and params and params[0] == "dim" and isinstance(rest[0], torch.dtype):
        rest.insert(0, None)  # sum(x, dtype)
    for param, value in zip(params, rest):
        bound[param] = value
    bound.update(kwargs)
    bound.setdefault("dim", default)
    return bound


_A_TENSOR = object()  # stands for a tensor argument in the cache key


def _keeps_zero(name: str, args: Sequence) -> bool:
    """Whether the pointwise op maps zeros (its tensor inputs) to zero, its other arguments as given."""
    key = tuple(_A_TENSOR if isinstance(a, torch.Tensor) else a for a in args)
    try:
        return _keeps_zero_cached(name, key)
    except TypeError:  # an unhashable argument
        return _keeps_zero_cached.__wrapped__(name, key)


@functools.lru_cache(maxsize=1024)
def _keeps_zero_cached(name: str, key: tuple) -> bool:
    scalar_args = [torch.zeros((), dtype=torch.float64) if a is _A_TENSOR else a for a in key]
    op = getattr(torch, name, None) or getattr(torch.Tensor, name, None) or getattr(F, name, None)
    if op is None:
        return False
    try:
        value = op(*scalar_args)
    except Exception:  # noqa: BLE001 (an op we cannot evaluate on a scalar does not keep zeros for sure)
        return False
    return isinstance(value, torch.Tensor) and value.numel() == 1 and bool(value.double() == 0)


def _visible_reduction(name: str, x: torch.Tensor, mask: torch.Tensor, positional: tuple[int, ...],
                       dims: tuple[int, ...], args: Sequence, kwargs: dict) -> Any:
    """``name`` over ``dims`` (which include every positional dim) counting visible positions only."""
    bound = bind(name, args, kwargs)
    keepdim = bool(bound.get("keepdim", False))
    visible = mask.bool()
    if name in ("softmax", "log_softmax"):
        if len(dims) != 1:
            raise UnsupportedLayerError(f"{name} over several dimensions")
        logits = x if bound.get("dtype") is None else x.to(bound["dtype"])
        fn = torch.softmax if name == "softmax" else torch.log_softmax
        return fn(logits.masked_fill(~visible, float("-inf")), dims[0])
    if name in ("mean", "nanmean", "sum", "nansum"):
        x = x if bound.get("dtype") is None else x.to(bound["dtype"])
        weights = mask.to(x.dtype)
        total = (x * weights).sum(dims, keepdim=True) if name.endswith("sum") else visible_mean(x, weights, dims)
        return total if keepdim else total.squeeze(dims)
    if name in ("var", "std", "var_mean", "std_mean"):
        correction = bound.get("correction")
        if correction is None:
            correction = 1 if bound.get("unbiased", True) in (True, None) else 0
        mean, biased, count = visible_moments(x, mask.to(x.dtype), dims)
        # as torch: NaN where the visible positions are too few for the correction
        variance = (biased * (count / (count - correction)).to(biased.dtype)).to(x.dtype)
        spread = variance.sqrt() if name.startswith("std") else variance
        mean = mean.to(x.dtype)
        if not keepdim:
            spread, mean = spread.squeeze(dims), mean.squeeze(dims)
        return (spread, mean) if name.endswith("_mean") else spread
    if name == "aminmax":
        low = x.masked_fill(~visible, float("inf")).amin(dims, keepdim=keepdim)
        high = x.masked_fill(~visible, float("-inf")).amax(dims, keepdim=keepdim)
        return torch.return_types.aminmax((low, high))
    if name in ("amax", "amin", "max", "min"):
        largest = name in ("amax", "max")
        filled = x.masked_fill(~visible, float("-inf") if largest else float("inf"))
        if name in ("amax", "amin") or bound.get("dim") is None:
            return filled.amax(dims, keepdim=keepdim) if largest else filled.amin(dims, keepdim=keepdim)
        if len(dims) != 1:
            raise UnsupportedLayerError(f"{name} over several dimensions")
        return filled.max(dims[0], keepdim=keepdim) if largest else filled.min(dims[0], keepdim=keepdim)
    if name == "logsumexp":
        return x.masked_fill(~visible, float("-inf")).logsumexp(dims, keepdim=keepdim)
    if name in ("norm", "vector_norm", "normalize"):
        p = bound.get("p", bound.get("ord", 2))
        p = 2 if p in (None, "fro") else p
        zeroed = x * mask.to(x.dtype)
        if name == "normalize":
            norm = torch.linalg.vector_norm(zeroed, p, dims, keepdim=True)
            return zeroed / norm.clamp_min(bound.get("eps", 1e-12))
        return torch.linalg.vector_norm(zeroed, p, dims, keepdim=keepdim)
    raise UnsupportedLayerError(f"no visible-position version of {name}")


def _flat(args: Sequence, kwargs: dict) -> list:
    out: list = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# Trusted sub-modules: their code is spark-det's own sparse code, their output a masked map


def _innermost_position_mode() -> Optional[PositionMode]:
    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, PositionMode):
            return mode
    return None


def trust_pre_hook(module: nn.Module, inputs: Any) -> None:
    mode = _innermost_position_mode()
    if mode is not None:
        mode.trusted += 1


def trust_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    """Leaving a trusted sub-module: its output is a map, zero at masked positions (layout of its input)."""
    mode = _innermost_position_mode()
    if mode is None:
        return
    mode.trusted -= 1
    if mode.trusted or not isinstance(output, torch.Tensor):
        return
    source = next((mode.track_of(i) for i in inputs if mode.track_of(i) is not None), None)
    if source is None or output.dim() != len(source.labels):
        return
    channels_last = tuple(source.labels[1:3]) == ("h", "w")
    hw = (int(output.shape[1]), int(output.shape[2])) if channels_last else (int(output.shape[-2]),
                                                                              int(output.shape[-1]))
    if hw != (1, 1):
        mode.tag(output, Track(source.labels, hw, True))


class VisibleReductions(SparseLayer):
    """A module's own forward under :class:`PositionMode`: its reductions over positions taken
    over visible positions, everything it cannot do sparsely refused by name; an output map of the
    input's size is re-masked (a bias or a gate must not fill masked positions)."""

    sparse_name = ""

    @classmethod
    def adopt(cls, dense: nn.Module, active: ActiveMask, name: str = "") -> nn.Module:
        sparse = super().adopt(dense, active)
        sparse.sparse_name = name
        for child in sparse.modules():
            if child is not sparse and isinstance(child, SparseLayer) and not getattr(child, "_spark_trusted", False):
                child.register_forward_pre_hook(trust_pre_hook)
                child.register_forward_hook(trust_hook)
                child._spark_trusted = True
        return sparse

    # Run eagerly under torch.compile (a graph break before and after each such module): the mode
    # follows positions in Python dicts keyed by tensor identity and through module hooks, which
    # the compiler cannot trace; the rest of the model (ResNet, ConvNeXt: no such module) compiles.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mode = PositionMode(self.active, self.sparse_name, self)
        with mode:
            mode.tag_input_map(x)
            out = super().forward(x, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(x, torch.Tensor) and x.dim() == 4 \
                and out.shape[-2:] == x.shape[-2:] and out.shape[-2:] != (1, 1):
            out = out * self.active.like(out)
        return out


class Audit:
    """The construction audit: one dense forward under :class:`PositionMode` with the module stack
    known, recording which modules' own code reduces over positions, and how."""

    def __init__(self, model: nn.Module, trusted: Callable[[str, nn.Module], bool]) -> None:
        self.model, self.is_trusted = model, trusted
        self.modules = dict(model.named_modules())
        self.stack: list[str] = []
        self.reducers: dict[str, list[str]] = {}  # module -> convertible reductions found in its own code
        self.refusals: dict[str, list[str]] = {}  # module -> what cannot run sparsely

    def current(self) -> tuple[str, Optional[nn.Module]]:
        name = self.stack[-1] if self.stack else ""
        return name, self.modules.get(name)

    def record(self, op: str, convertible: bool, why: str) -> None:
        name, _ = self.current()
        (self.reducers if convertible else self.refusals).setdefault(name, []).append(f"{op} {why}".strip())

    def run(self, images: torch.Tensor, forward: Callable[[torch.Tensor], Any]) -> None:
        mode = PositionMode(None, audit=self)
        handles = []
        suspended: list[int] = []  # the trust counts that untrusted modules running inside trusted ones set aside
        for name, module in self.modules.items():
            trusted = self.is_trusted(name, module)

            def pre(m, inputs, name=name, trusted=trusted):
                self.stack.append(name)
                if trusted:
                    mode.trusted += 1
                    return
                # Trust covers a module's own code, not an unknown module placed inside it (a gate a
                # user put into a block the fast path knows): that one is read like any other, its
                # input map followed from where it enters.
                suspended.append(mode.trusted)
                if mode.trusted:
                    mode.trusted = 0
                    mode.tag_input_map(inputs[0] if inputs else None)

            def post(m, inputs, output, name=name, trusted=trusted):
                self.stack.pop()
                if not trusted:
                    mode.trusted = suspended.pop()
                else:
                    mode.trusted -= 1
                    if not mode.trusted and isinstance(output, torch.Tensor):
                        source = next((mode.track_of(i) for i in inputs if mode.track_of(i) is not None), None)
                        if source is not None and output.dim() == len(source.labels) and output.dim() == 4:
                            if tuple(source.labels[1:3]) == ("h", "w"):
                                hw = (int(output.shape[1]), int(output.shape[2]))
                            else:
                                hw = (int(output.shape[-2]), int(output.shape[-1]))
                            if hw != (1, 1):
                                mode.tag(output, Track(source.labels, hw, True))

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        try:
            with mode:
                mode.tag_input_map(images)
                forward(images)
        finally:
            for h in handles:
                h.remove()
