"""The fast inference path: a U-Net prepared for serving, as one ``eps_fn(x_t, t) -> eps`` callable.

``InferenceOptions`` names the four switches and ``prepare(unet, options, device)`` applies them:

- ``precision``: ``fp32`` (plain), or ``bf16`` *autocast* (weights stay fp32; convolutions, linears and
  attention run in bfloat16, normalisations in fp32 where autocast says so). eps is always returned as fp32,
  so the sampler's update, the schedules and the chain state stay fp32 whatever the option.
- ``channels_last``: weights and inputs in NHWC memory layout (what cuDNN's and oneDNN's fast convolutions
  prefer); the values are the same, only the layout (and so the kernel) changes.
- ``compile``: ``torch.compile`` of the forward (``compile_mode``, default torch's default mode; dynamic batch).
- ``cuda_graphs``: CUDA only. The forward is captured once per *bucket* batch size (powers of two up to
  ``max_batch_size``) and replayed: a batch of n images is padded up to the next bucket (rows are independent,
  so the padding rows only cost compute) and eps of its n rows is returned. Batches above ``max_batch_size``
  run without a graph. A bucket is captured on its first use (or by ``warm_up``), and stays resident.

``default_options(device)`` is the fastest choice that is safe: see its docstring for what was measured.
The returned callable does not synchronise with the device (no ``.item()``, ``.cpu()`` or ``bool(tensor)``);
the caller decides when to read results back.

``pad_lone_image(eps_fn)`` makes a forward's rows independent of the batch on the CPU: oneDNN's convolutions give
row-identical results for every batch of 2 or more images but pick another kernel (last-bit differences) for a
batch of exactly 1, so a lone image is run as two rows. The service's engine uses it (``batch_invariant``);
``model.sampler.sample`` documents when a caller needs it.

This module knows the U-Net and torch, and the network's signature (``model.diffusion.EpsFn``); it does not know
the diffusion process, the sampler or the service.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Literal, cast

import torch

from model.diffusion import EpsFn
from model.unet import UNet

__all__ = ["PRECISIONS", "InferenceOptions", "Precision", "PreparedUNet", "buckets", "cpu_has_native_bf16",
           "default_options", "pad_lone_image", "prepare"]

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the U-Net for serving (see the module docstring for what each switch does)."""

    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    compile_mode: str | None = None  # None: torch's default; e.g. "max-autotune-no-cudagraphs"
    max_batch_size: int = 64  # the largest CUDA-graph bucket

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")

    def for_device(self, device: torch.device | str) -> InferenceOptions:
        """These options with what ``device`` cannot do switched off (CUDA graphs need CUDA)."""
        if self.cuda_graphs and torch.device(device).type != "cuda":
            log.warning("CUDA graphs need a CUDA device; running %s without them", device)
            return replace(self, cuda_graphs=False)
        return self

    def describe(self) -> str:
        """A short label, e.g. ``bf16+channels_last+compile``."""
        parts = [self.precision] + [name for name in ("channels_last", "compile", "cuda_graphs") if getattr(self, name)]
        return "+".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_options(device: torch.device | str, max_batch_size: int = 64) -> InferenceOptions:
    """The default for ``device``: the fastest measured choice whose images stay within a few uint8 levels of fp32.

    CUDA: bf16 autocast + channels_last (the standard fast path for convolutional nets on tensor cores).
    ``torch.compile`` and CUDA graphs stay opt-in until ``bench_gpu.py`` has measured them on a real GPU
    (compile costs minutes at start-up; graphs hold memory per bucket). CPU: bf16 autocast where the CPU has
    bf16 instructions (measured 1.6-1.7x faster at batch 16 on the CIFAR10 and digits U-Nets, no slower at
    batch 1; the trained demo's final images within 3 uint8 levels of fp32's after 1000 steps), else fp32;
    channels_last measured no faster on the CPU (benchmarks/README.md, "Fast inference path").
    """
    if torch.device(device).type == "cuda":
        return InferenceOptions(precision="bf16", channels_last=True, max_batch_size=max_batch_size)
    if cpu_has_native_bf16():
        return InferenceOptions(precision="bf16", max_batch_size=max_batch_size)
    return InferenceOptions(max_batch_size=max_batch_size)


def buckets(max_batch_size: int) -> list[int]:
    """CUDA-graph batch sizes: powers of two below ``max_batch_size``, and ``max_batch_size`` itself."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return [*out, max_batch_size]


class _Graphs:
    """Per-bucket CUDA graphs of ``fn`` over static input/output buffers, sharing one memory pool.

    Buckets are replayed one at a time from one thread, and every result is copied out before the next
    replay, so sharing the pool between buckets is safe.
    """

    def __init__(self, fn: EpsFn, shape: tuple[int, ...], device: torch.device, sizes: Sequence[int]):
        self.fn, self.shape, self.device, self.sizes = fn, shape, device, sorted(sizes)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def capture(self, b: int) -> None:
        x = torch.zeros(b, *self.shape, device=self.device)
        t = torch.zeros(b, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, cuDNN/compile autotuning)
            for _ in range(3):
                self.fn(x, t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # other threads may use CUDA
            out = self.fn(x, t)
        self.graphs[b] = (graph, x, t, out)
        log.info("captured a CUDA graph for batch %d", b)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = self.bucket(n)
        if b is None:  # larger than every bucket: run without a graph
            return self.fn(x, t)
        if b not in self.graphs:
            self.capture(b)
        graph, x_s, t_s, out = self.graphs[b]
        x_s[:n].copy_(x)
        t_s[:n].copy_(t)
        graph.replay()
        return out[:n].clone()  # the next replay overwrites ``out``


class PreparedUNet:
    """``eps = prepared(x_t, t)``: the U-Net run with ``options``; eps is fp32, contiguous, shape of ``x_t``."""

    def __init__(self, unet: UNet, options: InferenceOptions, device: torch.device | str):
        self.device = torch.device(device)
        self.options = options.for_device(self.device)
        self.unet = unet.to(self.device).eval()
        cfg = unet.config
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if self.options.channels_last:
            self.unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # untyped overload
        fn: EpsFn = self._forward
        if self.options.compile:
            _raise_recompile_limit()
            fn = cast(EpsFn, torch.compile(self._forward, mode=self.options.compile_mode))
        self._graphs = None
        if self.options.cuda_graphs:
            self._graphs = _Graphs(fn, self.shape, self.device, buckets(self.options.max_batch_size))
            fn = self._graphs
        self._fn = fn

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.options.precision == "bf16":
            # The weight-cast cache must be off inside a CUDA graph capture (cast weights would leak out of it).
            with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.options.cuda_graphs):
                eps = self.unet(x, t)
        else:
            eps = self.unet(x, t)
        return eps.float().contiguous()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._fn(x, t)

    def warm_up(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Run (and with CUDA graphs, capture) each batch size once; default: every bucket, else 1 and 2."""
        if batch_sizes is None:
            batch_sizes = buckets(self.options.max_batch_size) if self._graphs is not None else (1, 2)
        for b in sorted(set(batch_sizes), reverse=True):  # the largest first: the graph pool then fits the rest
            x = torch.zeros(b, *self.shape, device=self.device)
            self(x, torch.zeros(b, dtype=torch.long, device=self.device))


def pad_lone_image(eps_fn: EpsFn) -> EpsFn:
    """``eps_fn`` with a batch of one image run as two identical rows (eps of the first returned), so the image's
    eps does not depend on whether it was alone (module docstring); other batches pass through unchanged."""

    def padded(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.shape[0] == 1:
            return eps_fn(x_t.expand(2, *x_t.shape[1:]), t.expand(2))[:1]
        return eps_fn(x_t, t)

    return padded


def _raise_recompile_limit(limit: int = 64) -> None:
    """Let compile keep a graph per bucket size without falling back to eager (torch's default limit is 8)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def prepare(unet: UNet, options: InferenceOptions | None = None, device: torch.device | str | None = None
            ) -> PreparedUNet:
    """The U-Net ready to serve: eval mode, on ``device`` (default: where its weights are), ``options`` applied.

    Cache the time embeddings (``unet.cache_time_embeddings(T)``) before or after; both work.
    """
    dev = torch.device(device) if device is not None else next(unet.parameters()).device
    return PreparedUNet(unet, options or default_options(dev), dev)
