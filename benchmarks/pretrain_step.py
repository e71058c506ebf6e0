"""Throughput and peak memory of SparK pretraining: reference vs fast sparse execution, same run.

    python benchmarks/pretrain_step.py                                   # CPU defaults below
    python benchmarks/pretrain_step.py --device cuda --batch-size 64 --iters 20
    python benchmarks/pretrain_step.py --peer mmpretrain --models resnet50 convnext_small --parts step
    python benchmarks/pretrain_step.py --device cuda --parts step --dtypes bf16 --batch-size 128 --compile
    python benchmarks/pretrain_step.py --device cuda --models resnet50 --dtypes bf16 --largest-batch

With ``--peer mmpretrain`` (needs ``pip install -e .[bench]``), MMPretrain's SparK, built from its
own configs, is timed in the same round robin for the ``step`` part, and spark-det's models get its
decoder width (512) unless ``--decoder-width`` says otherwise (see benchmarks/mmpretrain_peer.py).

For each model and precision both implementations get the same weights, images and mask, and
are timed alternately (so drifting clocks or thermal state hit both alike):
* ``encoder``: the sparse encoder's forward + backward (a fixed random gradient on its 4 outputs);
* ``step``: a whole pretraining step, forward, backward and the LAMB optimizer step.
With ``--compile [MODEL ...]``, a copy of the fast model under ``torch.compile`` (``fast_compiled``) joins the
round robin for the step part; its first call, timed apart, is the compile time, and a compiler
error is recorded in the row instead of ending the run. ``--largest-batch`` times nothing: it
searches the largest batch whose whole step fits in memory (doubling, then bisection; CUDA's
out-of-memory error is the signal, ``--batch-limit`` bounds the search).

It prints images/s, the fast/reference ratio, peak memory (CUDA: max allocated; CPU: peak resident
set growth after malloc_trim, reset through /proc/self/clear_refs), the activations autograd saves
for backward (exact, device-independent) and the relative loss difference of the first step, and
can write everything as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from timm.optim import Lamb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_det.model.registry import SUPPORTED_MODELS, create_spark  # noqa: E402
from spark_det.train.optim import build_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmpretrain_peer  # noqa: E402

IMPLS = ("reference", "fast")
COMPILED = ("fast_compiled",)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_small", "convnext_base"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--parts", nargs="+", default=["encoder", "step"], choices=["encoder", "step"])
    p.add_argument("--iters", type=int, default=3, help="timed iterations per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--decoder-width", type=int, default=0,
                   help="spark-det's decoder width (0: the peer's with --peer, else the paper's 768)")
    p.add_argument("--peer", choices=["none", "mmpretrain"], default="none",
                   help="also time MMPretrain's SparK for the step part (skipped with a message if absent)")
    p.add_argument("--compile", nargs="*", metavar="MODEL",
                   help="also time the fast path under torch.compile (step part): for these models, all if none named")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (eager: graph capture only, a quick check on a CPU)")
    p.add_argument("--largest-batch", action="store_true",
                   help="instead of timing, find the largest batch whose step fits (per model, dtype, --impls)")
    p.add_argument("--impls", nargs="+", default=["fast"], choices=IMPLS, help="paths searched by --largest-batch")
    p.add_argument("--batch-limit", type=int, default=4096, help="--largest-batch searches up to this batch")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


class PeakMemory:
    """Peak memory growth of one measurement, in MiB (CUDA allocator, or the process's RSS on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            # Hand freed heap back to the OS first, or a measurement run after another reuses its
            # pages and shows no growth (glibc); then reset VmHWM to the current RSS (Linux).
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_status_kib("VmHWM") * 1024 - self.base) / 2**20


class SavedActivations:
    """Bytes of the distinct tensors autograd saves for backward, parameters aside: the activation
    memory of a step, exact and the same on every device (what the allocator then adds is not)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.parameters:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_pair(name: str, device: torch.device, decoder_width: int = 768) -> dict[str, torch.nn.Module]:
    """Reference and fast SparK models with identical weights."""
    dp = SUPPORTED_MODELS.get(name, {}).get("drop_path_rate", 0.0)
    models = {impl: create_spark(name, sparse_impl=impl, drop_path_rate=dp, decoder_width=decoder_width).to(device)
              for impl in IMPLS}
    models["fast"].load_state_dict(models["reference"].state_dict())
    return models


def measure(fns: dict[str, Callable[[], object]], args, device,
            modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, float]]:
    """Time each function alternately; peak memory and saved activations from a separate call of each
    (not counted for compiled code, whose graphs save what the compiler chose)."""
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {impl: 0.0 for impl in fns}
    for _ in range(args.iters):
        for impl, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[impl] += time.perf_counter() - t0
    results = {}
    mem = PeakMemory(device)
    for impl, fn in fns.items():
        mem.start()
        if impl in COMPILED:
            fn()
            saved_mib = None
        else:
            with SavedActivations(modules[impl]) as saved:
                fn()
            saved_mib = saved.mib
        results[impl] = {"images_per_s": args.iters * args.batch_size / times[impl], "peak_mib": mem.peak_mib(),
                         "saved_activations_mib": saved_mib}
    return results


def encoder_step(encoder, images, visible, grads, precision) -> None:
    """Sparse encoder forward + backward with a fixed gradient on its outputs."""
    with autocast(images.device, precision):
        feats = encoder(images, visible)
    torch.autograd.backward([f.float() for f in feats], grads)
    encoder.zero_grad(set_to_none=True)


def train_step(model, optimizer, images, visible, precision) -> None:
    """A whole pretraining step: forward, backward, optimizer."""
    with autocast(images.device, precision):
        loss = model(images, visible)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_model(name: str, args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    peer, width = None, args.decoder_width or 768
    if args.peer == "mmpretrain":
        reason = mmpretrain_peer.unavailable_reason(name)
        if reason:
            print(f"# peer skipped for {name}: {reason}", flush=True)
        else:
            peer, peer_width = mmpretrain_peer.build_peer(name, device, args.input_size)
            width = args.decoder_width or peer_width
            peer_optimizer = Lamb(peer.parameters(), lr=1e-4, weight_decay=0.04, betas=(0.9, 0.95))
    models = build_pair(name, device, width)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
    visible = models["reference"].random_mask(images, g).to(device)
    with torch.no_grad():
        shapes = [f.shape for f in models["reference"].encoder(images, visible)]
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    optimizers = {impl: build_optimizer(m, "lamb", lr=1e-4, weight_decay=0.04, betas=(0.9, 0.95))
                  for impl, m in models.items()}
    rows = []
    for precision in args.dtypes:
        for part in args.parts:
            if part == "encoder":
                fns = {impl: functools.partial(encoder_step, m.encoder, images, visible, grads, precision)
                       for impl, m in models.items()}
            else:
                fns = {impl: functools.partial(train_step, m, optimizers[impl], images, visible, precision)
                       for impl, m in models.items()}
                if peer is not None:
                    fns["mmpretrain"] = functools.partial(mmpretrain_peer.peer_step, peer, peer_optimizer, images,
                                                          functools.partial(autocast, device, precision))
                if compiles(name, args):
                    compiled_fn, compile_note = compiled_step(models["fast"], images, visible, precision, args, device)
                    if compiled_fn is not None:
                        fns["fast_compiled"] = compiled_fn
            # Same weights at this point: the timed steps below update both models alike.
            with torch.no_grad(), autocast(device, precision):
                losses = {impl: m(images, visible).item() for impl, m in models.items()}
            res = measure(fns, args, device, {**models, "mmpretrain": peer})
            row = {"model": name, "dtype": precision, "part": part, "decoder_width": width,
                   **{f"{impl}_{k}": v for impl in res for k, v in res[impl].items()}}
            if compiles(name, args) and part == "step":
                row.update(compile_note)
                if "fast_compiled" in res:
                    row["compiled_over_fast"] = res["fast_compiled"]["images_per_s"] / res["fast"]["images_per_s"]
            row["speedup"] = res["fast"]["images_per_s"] / res["reference"]["images_per_s"]
            if "mmpretrain" in res:
                row["fast_over_mmpretrain"] = res["fast"]["images_per_s"] / res["mmpretrain"]["images_per_s"]
            row["loss_rel_diff"] = abs(losses["fast"] - losses["reference"]) / abs(losses["reference"])
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def compiles(name: str, args) -> bool:
    return args.compile is not None and (not args.compile or name in args.compile)


def compiled_step(fast: torch.nn.Module, images, visible, precision: str, args, device
                  ) -> tuple[Optional[Callable[[], None]], dict]:
    """A training step of a compiled copy of ``fast`` (same weights, its own optimizer), and how its
    compilation went: ``compile_s`` (the first call, which compiles forward and backward) or
    ``compile_error`` (the error's first line; the run goes on without it)."""
    model = copy.deepcopy(fast)
    optimizer = build_optimizer(model, "lamb", lr=1e-4, weight_decay=0.04, betas=(0.9, 0.95))
    compiled = torch.compile(model, backend=args.compile_backend)
    step = functools.partial(train_step, compiled, optimizer, images, visible, precision)
    try:
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
    except Exception as exc:  # any compiler failure: recorded in the results, the other paths still timed
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"# torch.compile failed for {type(fast.encoder.model).__name__}: {message}", flush=True)
        return None, {"compile_backend": args.compile_backend, "compile_error": f"{type(exc).__name__}: {message}"}
    return step, {"compile_backend": args.compile_backend, "compile_s": time.perf_counter() - started}


def largest_batch(fits: Callable[[int], bool], start: int, limit: int, granularity: int
                  ) -> tuple[int, Optional[int]]:
    """(largest batch <= ``limit`` with ``fits(batch)``, smallest failing batch seen or None): doubling
    from ``start`` until a batch fails, then bisection down to ``granularity`` (below ``start`` if it
    fails: (0, first failing) when nothing does)."""
    good, bad, batch = 0, None, max(1, min(start, limit))
    while bad is None and good < limit:
        if fits(batch):
            good, batch = batch, min(2 * batch, limit)
        else:
            bad = batch
    while bad is not None and bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity or (good + bad) // 2
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def step_fits(model, optimizer, precision: str, args, device: torch.device, probes: list[dict], batch: int) -> bool:
    """Whether one whole step at ``batch`` fits in the device's memory (recorded in ``probes``)."""
    images = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
    visible = model.random_mask(images.cpu(), torch.Generator().manual_seed(0)).to(device)
    mem = PeakMemory(device)
    mem.start()
    try:
        train_step(model, optimizer, images, visible, precision)
        _sync(device)
        probes.append({"batch": batch, "fits": True, "peak_mib": round(mem.peak_mib())})
        return True
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        probes.append({"batch": batch, "fits": False})
        return False
    finally:
        del images, visible
        if device.type == "cuda":
            torch.cuda.empty_cache()


def search_largest_batches(name: str, args, device: torch.device) -> list[dict]:
    """The largest fitting step batch of ``name`` for each dtype and path in ``args.impls``."""
    torch.manual_seed(0)
    models = build_pair(name, device, args.decoder_width or 768)
    rows = []
    for impl in args.impls:
        optimizer = build_optimizer(models[impl], "lamb", lr=1e-4, weight_decay=0.04, betas=(0.9, 0.95))
        for precision in args.dtypes:
            probes: list[dict] = []
            fits = functools.partial(step_fits, models[impl], optimizer, precision, args, device, probes)
            good, bad = largest_batch(fits, args.batch_size, args.batch_limit, max(1, args.batch_size // 4))
            rows.append({"model": name, "dtype": precision, "impl": impl, "input_size": args.input_size,
                         "largest_batch": good, "smallest_failing_batch": bad, "batch_limit": args.batch_limit,
                         "probes": probes})
            print(f"| {name} | {precision} | {impl} | largest batch {good} | first failing {bad} | "
                  f"{len(probes)} probes |", flush=True)
    return rows


def _format_row(r: dict) -> str:
    extra = (f"  saved activations reference {r['reference_saved_activations_mib']:.0f} MiB, "
             f"fast {r['fast_saved_activations_mib']:.0f} MiB; loss rel diff {r['loss_rel_diff']:.1e}")
    if "compiled_over_fast" in r:
        extra += (f"  fast+compile {r['fast_compiled_images_per_s']:.2f} img/s, {r['fast_compiled_peak_mib']:.0f} MiB, "
                  f"compiled in {r['compile_s']:.0f} s: compiled/fast **{r['compiled_over_fast']:.2f}x**")
    elif "compile_error" in r:
        extra += f"  fast+compile failed: {r['compile_error']}"
    if "fast_over_mmpretrain" in r:
        extra += (f"  mmpretrain {r['mmpretrain_images_per_s']:.2f} img/s, {r['mmpretrain_peak_mib']:.0f} MiB, "
                  f"saved activations {r['mmpretrain_saved_activations_mib']:.0f} MiB: "
                  f"fast/mmpretrain **{r['fast_over_mmpretrain']:.2f}x** (decoder width {r['decoder_width']})")
    return (f"| {r['model']} | {r['dtype']} | {r['part']} | {r['reference_images_per_s']:.2f} | "
            f"{r['fast_images_per_s']:.2f} | **{r['speedup']:.2f}x** | {r['reference_peak_mib']:.0f} | "
            f"{r['fast_peak_mib']:.0f} |{extra}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "batch_size": args.batch_size, "input_size": args.input_size, "iters": args.iters}
    env["timm"] = timm.__version__
    if args.peer == "mmpretrain" and mmpretrain_peer.unavailable_reason(args.models[0]) is None:
        import mmpretrain

        env["mmpretrain"] = mmpretrain.__version__
    print("# " + json.dumps(env))
    if args.largest_batch:
        rows = [row for name in args.models for row in search_largest_batches(name, args, device)]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"env": env, "largest_batch": rows}, indent=1))
        return
    print("| model | dtype | measured | reference img/s | fast img/s | speedup | reference peak MiB | fast peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        rows += run_model(name, args, device)
        if args.json:  # after every model, so that a run stopped part-way keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"env": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
