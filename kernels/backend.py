"""The one switch between the Triton kernels and their PyTorch references, and a lazy `triton.jit`.

Rule: Triton on CUDA tensors, the reference everywhere else. `FAMILIAL_KERNELS` overrides it:
  auto   (default) Triton when every tensor is on CUDA and Triton imports, else the reference;
  torch  always the reference (e.g. to bisect a numerical difference);
  triton always Triton: on CUDA, or on CPU under the Triton interpreter (`TRITON_INTERPRET=1`),
         otherwise an error rather than a silent fallback.

Why the kernels are jitted lazily: `triton.jit` decides between compiled and interpreted code when
it decorates a function. `LazyKernel` wraps the plain function and builds the jitted (and, on a
GPU, autotuned) kernel at first launch, once per (interpreter, autotune) mode, so the mode is read
when a kernel runs, not when `kernels` happens to be imported. Kernels do not call other
`@triton.jit` helpers of ours (those would be bound at import); each kernel is self-contained.
On a machine without CUDA, importing this module sets `TRITON_INTERPRET=1` (if unset) before
importing triton: there the interpreter is the only way a kernel can run, and triton fixes the mode
of its own `tl.*` functions at import.

Triton is optional: without it `tl` is a stub whose only job is to let kernel signatures
(`BLOCK: tl.constexpr`) be evaluated at import, and every public op runs its reference.

This file does not pick between Triton and SDPA for a shape; `kernels/dispatch.py` does, from
committed measurements.
"""
from __future__ import annotations

import functools
import os

import torch

# Triton jit-decorates its own language functions (tl.max, tl.sum, ...) when it is imported, compiled
# or interpreted according to TRITON_INTERPRET at that moment. Without a GPU only the interpreter can
# ever run a kernel, so on such a machine we turn it on before the first `import triton` (whoever
# imports triton earlier decides for the process; tests/kernels/conftest.py checks).
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

try:  # Triton is an optional dependency: the reference path must work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    HAS_TRITON = False

    class _TLStub:
        constexpr = None

    tl = _TLStub()

ENV = "FAMILIAL_KERNELS"
MODES = ("auto", "torch", "triton")
PDL_ENV = "FAMILIAL_PDL"


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: expected one of {MODES}")
    return m


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (read at each launch, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


OFF = ("0", "false", "no", "off")


def env_on(name: str, default: bool) -> bool:
    """A kernel switch from the environment: unset -> default; 0 / false / no / off -> False; else True."""
    v = os.environ.get(name)
    return default if v is None or not v.strip() else v.strip().lower() not in OFF


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors should run its Triton kernel (see the module docstring)."""
    m = mode()
    if m == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if m == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV}=triton but triton is not installed")
        if not (on_cuda or interpreting()):
            raise RuntimeError(f"{ENV}=triton needs CUDA tensors or TRITON_INTERPRET=1 (CPU interpreter)")
        return True
    return HAS_TRITON and on_cuda and not interpreting()


def autotune_enabled() -> bool:
    """`FAMILIAL_KERNELS_AUTOTUNE=0` launches every kernel with its default config (tests use it:
    autotuning each small test shape would compile every config for every specialisation)."""
    return env_on("FAMILIAL_KERNELS_AUTOTUNE", True)


class LazyKernel:
    """`triton.jit` (plus `triton.autotune` on a GPU) applied at first launch.

    configs: autotune configs used when compiling for a GPU (None: never autotuned).
    key:     autotune key (argument names).
    default: meta-parameters (block sizes, num_warps, num_stages) for a launch that is not
             autotuned; `interpret_default` replaces it under the interpreter, where multi-config
             autotuning cannot run and small blocks only cost Python loop iterations.
    A launch may pass `meta={...}` to pin a config (e.g. fp32 inputs that would not fit the
    shared memory of the 16-bit configs); that launch is never autotuned.
    """

    def __init__(self, fn, configs=None, key=(), default=None, interpret_default=None):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.default = dict(default or {})
        self.interpret_default = dict(interpret_default or self.default)
        self._built: dict[tuple[bool, bool], object] = {}

    def _kernel(self, interp: bool, tuned: bool):
        k = self._built.get((interp, tuned))
        if k is None:
            k = triton.jit(self.fn)
            if tuned:
                k = triton.autotune(configs=self.configs, key=self.key)(k)
            self._built[(interp, tuned)] = k
        return k

    def will_autotune(self, meta: dict | None = None) -> bool:
        return bool(self.configs) and meta is None and not interpreting() and autotune_enabled()

    def meta(self, meta: dict | None = None) -> dict:
        """The meta-parameters a launch that is not autotuned gets."""
        if meta is not None:
            return meta
        return self.interpret_default if interpreting() else self.default

    def best_config(self) -> str | None:
        """The autotuner's choice for the most recent launch (benchmarks record it), if any."""
        k = self._built.get((False, True))
        cfg = getattr(k, "best_config", None)
        return None if cfg is None else str(cfg)

    def __getitem__(self, grid):
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")

        def launch(*args, meta: dict | None = None, **kwargs):
            tuned = self.will_autotune(meta)
            k = self._kernel(interpreting(), tuned)
            if tuned:
                return k[grid](*args, **kwargs)
            return k[grid](*args, **{**self.meta(meta), **kwargs})

        return launch


def jit(configs=None, key=(), default=None, interpret_default=None):
    """Decorator: `@jit(...)` on a plain function gives a LazyKernel (see above)."""

    def deco(fn):
        return LazyKernel(fn, configs, key, default, interpret_default)

    return deco


def config(num_warps: int = 4, num_stages: int = 2, pre_hook=None, **meta):
    """A triton.Config, or None without triton (config lists are only read on a GPU)."""
    if not HAS_TRITON:
        return None
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pdl(t: torch.Tensor, kind: str = "matmul") -> dict:
    """Launch arguments for programmatic dependent launch (PDL) of a kernel on t's device: {"PDL": True,
    "launch_pdl": True} on Hopper or newer with compiled Triton, else {"PDL": False}. A kernel taking
    `PDL: tl.constexpr` then lets the next kernel in the stream launch as soon as all its own programs
    have started (`gdc_launch_dependents`), and waits for the previous kernel's writes (`gdc_wait`) before
    it reads anything an earlier kernel wrote; work that reads only weights may run before the wait.
    Inside a CUDA graph this overlaps each kernel's start-up with the previous one's tail: at batch-1
    decode a layer is a few short kernels, so the gaps are a large part of a step. Off unless asked:
    measured on the H200 (2026-12-03, `1b` shape, batch-1 final exit) it cost 3-7 % (901-933 tok/s
    with it, 947-962 without), so `FAMILIAL_PDL` is 0 by default; 1 turns it on for every kernel that
    supports it, or one kind (`matmul`: kernels/gemv.py; `attention`: rope_qkv and decode attention)."""
    want = os.environ.get(PDL_ENV, "0").strip().lower()
    on = (t.is_cuda and HAS_TRITON and not interpreting() and want not in OFF
          and want in ("1", "true", "yes", "on", kind)
          and _cuda_capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= 9)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def num_sms(device: torch.device | None = None) -> int:
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        return _cuda_sms(dev.index if dev is not None and dev.index is not None else torch.cuda.current_device())
    return 8  # interpreter: any small number; it only shapes the grid


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
