"""``compile=true``: the training forward and backward through ``torch.compile``.

What is compiled: the call path of training only, ``torch.compile(model)`` around the module the
engine calls (SparK, or its DDP wrapper: DDP's own optimizer splits the graph at its gradient
buckets). The wrapper is kept apart from ``Pretrainer.spark``, so checkpoints, exports, the leak
audit (a deep copy of ``spark.encoder``) and the reconstruction grid (``spark`` in eval mode) use
the eager module: their parameter names never change, and nothing outside the training step
adds a graph or a recompilation.

Why the whole SparK forward fits in one graph:

* the number of visible patches per image is fixed by the mask ratio, and the engine says so
  (``per_image``), so :class:`~spark_det.sparse.masking.ActiveMask` computes every row index
  with a static shape (:func:`~spark_det.sparse.masking.select_static`) instead of boolean
  indexing, whose output shape depends on the mask's values (a graph break at every resolution);
* the scoped mask holder (a ``contextmanager`` pushing onto a list, a dict cache per forward) is
  plain Python that dynamo traces: it runs at trace time and leaves only tensor operations;
* the fast path's question "does this activation keep 0 at 0?" (a ``.item()``) is answered once
  while tracing (``torch.compiler.assume_constant_result``); visible counts use ``index_add``
  rather than ``bincount`` (whose output length depends on the values).

Graph breaks, counted with ``torch._dynamo.explain`` (tests/train/test_compile.py): none for
ResNet and ConvNeXt on the fast path (the tests check ResNet-18 and ConvNeXt-atto). Under DDP,
DDP's own forward is not traced (its hooks run eagerly, dynamo compiles the module it wraps), and
DDP's optimizer splits the graph at gradient buckets: breaks by design, not ours. The one source of
breaks in the model is
:class:`~spark_det.sparse.reductions.VisibleReductions` (modules whose own code pools over
positions, e.g. ECA or global-context attention): its ``PositionMode`` follows positions in Python
dicts keyed by tensor identity and through module hooks, which dynamo cannot trace, so its
forward is ``torch.compiler.disable``-d and runs eagerly: one break per such module call, the
layers between them still compiled.

Recompilation: graphs are specialised on shapes, the mask ratio's count and the module's
training flag; the loader drops incomplete batches, so every step has the same shapes and none
recompiles, across epochs, resumes and evaluation (tests count ``torch._dynamo.utils.counters``).

Needs torch >= :data:`MIN_TORCH` (checked with this version; torch 2.4's dynamo fails on the
mask holder's cache), and for the inductor backend on CPU a C++ compiler.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from ..errors import ConfigError

MIN_TORCH = "2.14"  # the oldest torch compile=true was checked on


def compile_backend(setting: Union[bool, str]) -> str | None:
    """The torch.compile backend a ``compile`` setting asks for (None: eager), or ConfigError."""
    if setting is False:
        return None
    backend = "inductor" if setting is True else setting
    if torch.__version__ < MIN_TORCH:
        raise ConfigError(f"compile={setting} needs torch >= {MIN_TORCH}, this is torch {torch.__version__}; "
                          "set compile=false or upgrade torch")
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"compile={setting!r}: not a torch.compile backend; known: {', '.join(sorted(known))}")
    return backend


def compile_for_training(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model)``: a wrapper calling ``model``'s forward compiled; ``model`` itself,
    its parameter names and its state dict are unchanged."""
    return torch.compile(model, backend=backend)
