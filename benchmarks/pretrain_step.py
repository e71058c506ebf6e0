"""Throughput and peak memory of SparK pretraining: reference vs fast sparse execution, same run.

    python benchmarks/pretrain_step.py                                   # CPU defaults below
    python benchmarks/pretrain_step.py --device cuda --batch-size 64 --iters 20
    python benchmarks/pretrain_step.py --peer mmpretrain --models resnet50 convnext_small --parts step
    python benchmarks/pretrain_step.py --compile --models resnet50 convnext_small   # eager vs torch.compile

With ``--peer mmpretrain`` (needs ``pip install -e .[bench]``), MMPretrain's SparK, built from its
own configs, is timed in the same round robin for the ``step`` part, and spark-det's models get its
decoder width (512) unless ``--decoder-width`` says otherwise (see benchmarks/mmpretrain_peer.py).

For each model and precision both implementations get the same weights, images and mask, and
are timed alternately (so drifting clocks or thermal state hit both alike):
* ``encoder``: the sparse encoder's forward + backward (a fixed random gradient on its 4 outputs);
* ``step``: a whole pretraining step, forward, backward and the LAMB optimizer step.
It prints images/s, the fast/reference ratio, peak memory (CUDA: max allocated; CPU: peak resident
set growth after malloc_trim, reset through /proc/self/clear_refs), the activations autograd saves
for backward (exact, device-independent) and the relative loss difference of the first step, and
can write everything as JSON.

With ``--compile [BACKEND]`` the pair is the fast path eager and the same model through
``torch.compile`` (inductor unless a backend is named; what ``compile=true`` trains), whole
steps only: the first step of each is timed on its own (for the compiled one: tracing and code
generation of forward and backward, per precision), then both are timed alternately as above.
Saved activations are not counted there (saved-tensor hooks change what the compiler traces).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import timm
import torch
from timm.optim import Lamb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_det.model.registry import SUPPORTED_MODELS, create_spark  # noqa: E402
from spark_det.train.optim import build_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmpretrain_peer  # noqa: E402

IMPLS = ("reference", "fast")


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
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="time the fast path eager vs torch.compile'd (default backend inductor), whole steps")
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
            modules: dict[str, torch.nn.Module], count_saved: bool = True) -> dict[str, dict[str, float]]:
    """Time each function alternately; peak memory and saved activations from a separate call of each."""
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
        with SavedActivations(modules[impl]) if count_saved else contextlib.nullcontext() as saved:
            fn()
        results[impl] = {"images_per_s": args.iters * args.batch_size / times[impl], "peak_mib": mem.peak_mib()}
        if count_saved:
            results[impl]["saved_activations_mib"] = saved.mib
    return results


def encoder_step(encoder, images, visible, grads, precision) -> None:
    """Sparse encoder forward + backward with a fixed gradient on its outputs."""
    with autocast(images.device, precision):
        feats = encoder(images, visible)
    torch.autograd.backward([f.float() for f in feats], grads)
    encoder.zero_grad(set_to_none=True)


def train_step(model, optimizer, images, visible, precision, per_image=None) -> torch.Tensor:
    """A whole pretraining step: forward, backward, optimizer; returns the loss."""
    with autocast(images.device, precision):
        loss = model(images, visible, per_image=per_image)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


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
            # Same weights at this point: the timed steps below update both models alike.
            with torch.no_grad(), autocast(device, precision):
                losses = {impl: m(images, visible).item() for impl, m in models.items()}
            res = measure(fns, args, device, {**models, "mmpretrain": peer})
            row = {"model": name, "dtype": precision, "part": part, "decoder_width": width,
                   **{f"{impl}_{k}": v for impl in res for k, v in res[impl].items()}}
            row["speedup"] = res["fast"]["images_per_s"] / res["reference"]["images_per_s"]
            if "mmpretrain" in res:
                row["fast_over_mmpretrain"] = res["fast"]["images_per_s"] / res["mmpretrain"]["images_per_s"]
            row["loss_rel_diff"] = abs(losses["fast"] - losses["reference"]) / abs(losses["reference"])
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def run_compiled(name: str, args, device: torch.device) -> list[dict]:
    """The fast path's whole step, eager vs compiled (the same weights, images and mask)."""
    torch.manual_seed(0)
    dp = SUPPORTED_MODELS.get(name, {}).get("drop_path_rate", 0.0)
    width = args.decoder_width or 768
    eager = create_spark(name, drop_path_rate=dp, decoder_width=width).to(device)
    twin = create_spark(name, drop_path_rate=dp, decoder_width=width).to(device)
    twin.load_state_dict(eager.state_dict())
    models = {"eager": eager, "compiled": twin}
    calls = {"eager": eager, "compiled": torch.compile(twin, backend=args.compile)}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
    visible = eager.random_mask(images, g).to(device)
    per_image = eager.visible_per_image(images)
    optimizers = {k: build_optimizer(m, "lamb", lr=1e-4, weight_decay=0.04, betas=(0.9, 0.95))
                  for k, m in models.items()}
    rows = []
    for precision in args.dtypes:
        fns = {k: functools.partial(train_step, calls[k], optimizers[k], images, visible, precision, per_image)
               for k in models}
        first, losses = {}, {}
        for k, fn in fns.items():  # compiled: the training graph (forward and backward) is built here
            _sync(device)
            t0 = time.perf_counter()
            losses[k] = fn().item()  # the weights are still equal (both models step alike from here on)
            _sync(device)
            first[k] = time.perf_counter() - t0
        res = measure(fns, args, device, models, count_saved=False)
        row = {"model": name, "dtype": precision, "part": "step", "decoder_width": width, "backend": args.compile,
               **{f"{k}_{m}": v for k in res for m, v in res[k].items()},
               **{f"{k}_first_step_s": v for k, v in first.items()}}
        row["speedup"] = res["compiled"]["images_per_s"] / res["eager"]["images_per_s"]
        row["loss_rel_diff"] = abs(losses["compiled"] - losses["eager"]) / abs(losses["eager"])
        rows.append(row)
        print(f"| {name} | {precision} | {row['eager_images_per_s']:.2f} | {row['compiled_images_per_s']:.2f} | "
              f"**{row['speedup']:.2f}x** | {first['compiled']:.0f} s ({first['eager']:.1f} s eager) | "
              f"{row['eager_peak_mib']:.0f} | {row['compiled_peak_mib']:.0f} | {row['loss_rel_diff']:.1e} |",
              flush=True)
    return rows


def _format_row(r: dict) -> str:
    extra = (f"  saved activations reference {r['reference_saved_activations_mib']:.0f} MiB, "
             f"fast {r['fast_saved_activations_mib']:.0f} MiB; loss rel diff {r['loss_rel_diff']:.1e}")
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
    if args.compile:
        env["compile_backend"] = args.compile
        print("| model | dtype | eager img/s | compiled img/s | speedup | first step (compile) | eager peak MiB | "
              "compiled peak MiB | loss rel diff |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print("| model | dtype | measured | reference img/s | fast img/s | speedup | reference peak MiB | "
              "fast peak MiB |")
        print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        rows += run_compiled(name, args, device) if args.compile else run_model(name, args, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
