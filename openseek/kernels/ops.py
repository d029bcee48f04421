"""The one kernel dispatch: every operator the model, the engine and the trainer call, and the one choice of what runs
it — our kernel for this CPU's instruction-set level, the operator a `torch.compile`d graph holds, or PyTorch.

Model code calls `ops.linear`, `ops.rms_norm`, `ops.rope`, `ops.int8_matmul`, ... unconditionally and reads as plain
PyTorch; each function here takes our kernel where it applies (the CPU, the dtypes and the autograd mode it was
written and measured for) and the written-out PyTorch arithmetic everywhere else, so the model gives the same
results on every machine, to the rounding each kernel's test states.

A level (`LEVELS`) is a set of CPU flags and the two extensions built for it: `dense` (float32/bf16 matmuls, decode
attention, MoE routing, the training pass's elementwise kernels) and `quantized` (int8/int4 weights). Both extensions
of a level have the same functions and register the same operators under the level's `torch.ops` namespace, so
this file calls whichever the level names. `OPENSEEK_KERNELS` picks the level: `auto` (default: the first of
`LEVELS` this CPU runs), a level's name, or `0` (PyTorch only). A level whose extension is not part of this build,
or does not build here, runs that family on PyTorch after one line on stderr (`kernels.build`). Tests run code at
another level this CPU can execute with `use_level`.

Three ways to call a kernel, chosen here and nowhere else:
- eager code calls the extension's pybind function (its call costs less than the operator's);
- under torch.compile, the operator `torch.ops.<namespace>.<name>`, whose shape-only "fake" version lets the graph
  hold it (registered by the extension's loader in kernels/__init__.py); the training pass's elementwise kernels
  have none, and a compiled graph fuses that arithmetic itself, so they run in eager code only;
- with autograd on, through an `autograd.Function` that calls the kernel's backward (training).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openseek import kernels


@dataclass(frozen=True)
class Level:
    flags: frozenset[str]  # every CPU flag its kernels need: a CPU lacking one cannot run the level
    dense: str  # extension (kernels.EXTENSIONS, loader kernels.<name>()) of the float kernels
    quantized: str  # extension of the int8/int4 weight kernels
    namespace: str  # torch.ops namespace both extensions register their operators under


# Best first: `auto` takes the first this CPU runs. A new level (NEON, AVX-512 without BF16) is one entry here and
# its extensions' sources, with their entries in kernels.EXTENSIONS (how each compiles).
LEVELS = {
    "avx512": Level(frozenset({"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}), "dense_avx512",
                    "quantized_vnni", "openseek"),
    "avx2": Level(frozenset({"avx2", "fma", "f16c"}), "dense_avx2", "quantized_avx2", "openseek_avx2"),
}
PYTORCH = "0"  # the level of no kernel of ours
AUTO = ("", "auto", "1", "on", "true")
OFF = ("0", "off", "none", "false")

# Rows up to which our matmul beats PyTorch's at decode's shapes, per weight dtype: measured for the AVX-512 kernel
# (benchmarks/RESULTS.md, round 4: ahead of oneDNN's bf16 up to 4 rows, level at 8; ahead of MKL's sgemm up to 16,
# 11 GB/s against 8 there).
KERNEL_ROWS = {torch.bfloat16: 4, torch.float32: 16}

FLOAT_TYPES = {torch.float32, torch.bfloat16}


# --- choosing the level -------------------------------------------------------------------------------------------

def missing_flags(level: str) -> set[str]:
    """The CPU flags `level` needs that this CPU lacks."""
    return set(LEVELS[level].flags - kernels.cpu_flags())


def executable_levels() -> list[str]:
    """The levels this CPU runs, best first (what tests run each kernel at); PyTorch's path is always there too."""
    return [name for name in LEVELS if not missing_flags(name)]


def choose_level(value: str | None) -> str:
    """The level an `OPENSEEK_KERNELS` value selects on this CPU: a level's name, or PYTORCH. A level this CPU cannot
    run, or a value that names none, is a ValueError saying why and what would work."""
    value = (value or "").strip().lower()
    if value in AUTO:
        return next(iter(executable_levels()), PYTORCH)
    if value in OFF:
        return PYTORCH
    if value not in LEVELS:
        raise ValueError(f"{kernels.KERNELS_ENV}={value!r}: expected auto, {', '.join(LEVELS)} or 0 (PyTorch only)")
    missing = missing_flags(value)
    if missing:
        runs = ", ".join(executable_levels() + [PYTORCH])
        raise ValueError(f"{kernels.KERNELS_ENV}={value}: this CPU lacks {', '.join(sorted(missing))}, which the "
                         f"{value} kernels need; it runs {kernels.KERNELS_ENV}={runs}")
    return value


@functools.cache
def selected_level() -> str:
    """The level `OPENSEEK_KERNELS` selects, read once per process."""
    return choose_level(os.environ.get(kernels.KERNELS_ENV))


_forced: str | None = None  # use_level's, while one is in force


def current_level() -> str:
    """The level kernels are taken from now: `use_level`'s inside one, else `selected_level()`."""
    return _forced if _forced is not None else selected_level()


@contextlib.contextmanager
def use_level(level: str):
    """Run the enclosed code at `level` (any value OPENSEEK_KERNELS takes, checked as it is: a level this CPU cannot
    run is a ValueError): for tests, which run each kernel at every level the machine executes, in one process.
    Code that torch.compile traced keeps the level it was traced at."""
    global _forced
    before, _forced = _forced, choose_level(level)  # the same check, and the same message, as OPENSEEK_KERNELS
    try:
        yield
    finally:
        _forced = before


@functools.cache
def _extension(level: str, family: str):
    """The compiled extension of `family` at `level`, or None (one line on stderr says why, once)."""
    if level == PYTORCH:
        print(f"{family} kernels: {kernels.KERNELS_ENV}=0; using PyTorch's", file=sys.stderr)
        return None
    name = getattr(LEVELS[level], family)
    if name not in kernels.EXTENSIONS or not hasattr(kernels, name):
        print(f"{family} kernels at {level}: {name} is not part of this build; using PyTorch's", file=sys.stderr)
        return None
    return getattr(kernels, name)()


def extension(family: str):
    """`family`'s compiled extension at the level in force, or None: for calling a kernel's own functions (tests)."""
    return _extension(current_level(), family)


@torch.compiler.assume_constant_result  # torch.compile reads it once rather than tracing the build and its messages
def has(family: str) -> bool:
    """Whether the level in force has `family`'s kernels ("dense" or "quantized") on this machine: for the choices
    that shape a model around them (the layout of quantised weights, MoE's decode path)."""
    return extension(family) is not None


@torch.compiler.assume_constant_result
def _namespace() -> str:
    return LEVELS[current_level()].namespace


def _kernel(family: str):
    """`family`'s kernels at the level in force: the extension in eager code, its operators under torch.compile;
    None where the level has none."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops, _namespace()) if has(family) else None
    return extension(family)


def _eager_kernel(family: str):
    """`family`'s kernels in eager code; None under torch.compile, which fuses their arithmetic itself."""
    return None if torch.compiler.is_compiling() else extension(family)


def _required(family: str, op: str):
    """`family`'s kernels for an operator that only ours computes (its tensors are laid out for it)."""
    kernel = _kernel(family)
    if kernel is None:
        raise RuntimeError(f"{op}: the level in force ({kernels.KERNELS_ENV}={current_level()}) has no {family} "
                           f"kernels on this machine; these tensors were laid out for ours (made under a level "
                           f"that has them)")
    return kernel


# --- matmuls ------------------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), on our matmul where it wins: inference (no autograd), float32 or bf16 weights and
    activations of one dtype on the CPU, up to KERNEL_ROWS rows.

    Decode multiplies a few rows of activations by every weight, so it should stream the weights at the memory
    bandwidth. PyTorch's kernels do not at those shapes; ours (nn.Linear's layout, float32 accumulation) come much
    closer (benchmarks/RESULTS.md, "Round 4 — Batch-1 decode against the memory roofline"). Everything else —
    training, prefill, GPUs — is F.linear. In float32 its sums run in another order than MKL's (both exact to float32
    rounding), so logits differ in the last bits."""
    rows = KERNEL_ROWS.get(w.dtype, 0)
    if (x.dtype is w.dtype and x.numel() <= rows * w.shape[1] and x.device.type == "cpu"
            and not torch.is_grad_enabled() and w.is_contiguous() and (kernel := _kernel("dense")) is not None):
        matmul = kernel.linear_bf16 if w.dtype is torch.bfloat16 else kernel.linear_fp32
        y = matmul(x.reshape(-1, w.shape[1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [N, in] sorted by group, w [G, out, in] (each group's weight in nn.Linear's layout, one dtype with x), ends
    [G] cumulative row counts -> [N, out].

    One grouped GEMM (F.grouped_mm) when the layout allows it (16-byte aligned rows). Decode's few rows go to our
    kernel instead (one call for all groups, skipping empty ones), or where it cannot run, group by group through
    `linear`: CPU's grouped GEMM multiplies every group, empty or not, with a small-M sgemm (most of a deepseek_v3
    decode step at 8 rows; benchmarks/RESULTS.md, round 4), while our kernel streams each used expert's weight once."""
    aligned = all((s * x.element_size()) % 16 == 0 for s in (x.shape[1], w.shape[1]))
    few_rows = x.shape[0] <= w.shape[0] * KERNEL_ROWS.get(w.dtype, 0)  # per group, on average
    decoding = few_rows and not torch.is_grad_enabled() and x.device.type == "cpu"
    if aligned and x.dtype == w.dtype and not decoding:
        return F.grouped_mm(x, w.transpose(1, 2), offs=ends.to(torch.int32))
    if decoding and x.dtype == w.dtype and w.is_contiguous() and (kernel := _kernel("dense")) is not None:
        grouped = kernel.grouped_linear_bf16 if w.dtype is torch.bfloat16 else kernel.grouped_linear_fp32
        return grouped(x.contiguous(), w, ends)
    starts = torch.cat((ends.new_zeros(1), ends[:-1])).tolist()
    return torch.cat([linear(x[s:e], w[g]) for g, (s, e) in enumerate(zip(starts, ends.tolist())) if e > s])


# --- normalisation, activation, rotary embedding ------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: normalise in float32, cast back, then scale — the order transformers uses, so bf16 results agree.
    On the CPU (float32 or bf16, x and weight of one dtype, eager) our kernel does it with the same rounding in one
    pass over each row, forward and backward; without autograd it is called directly (autograd.Function's
    bookkeeping costs more than the kernel at a decode step's sizes, and a step has one per norm)."""
    if (x.device.type == "cpu" and x.dtype is weight.dtype and x.dtype in FLOAT_TYPES
            and (kernel := _eager_kernel("dense")) is not None):
        if torch.is_grad_enabled():
            return _RMSNorm.apply(kernel, x, weight, eps)
        return kernel.rms_norm(x.contiguous(), weight, eps)[0]
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = kernel.rms_norm(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.kernel = kernel
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = ctx.kernel.rms_norm_backward(grad.reshape(rows.shape).contiguous(), rows, weight.contiguous(), rstd)
        return None, dx.view(grad.shape), dw.to(weight.dtype) if ctx.needs_input_grad[2] else None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up. On the CPU (float32 or bf16, one dtype, eager) our kernel does it in one pass, forward and
    backward, with PyTorch's rounding of silu's result; written out, the two ops and their backwards were three
    passes each."""
    if (gate.device.type == "cpu" and gate.dtype is up.dtype and gate.dtype in FLOAT_TYPES
            and (kernel := _eager_kernel("dense")) is not None):
        if torch.is_grad_enabled():
            return _SwiGLU.apply(kernel, gate.contiguous(), up.contiguous())
        return kernel.swiglu(gate.contiguous(), up.contiguous())  # no autograd bookkeeping in decode
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, gate, up):
        ctx.save_for_backward(gate, up)
        ctx.kernel = kernel
        return kernel.swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return None, *ctx.kernel.swiglu_backward(grad.contiguous(), gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the rotary cos, sin [B, 1, T, D/2]. Interleaved input pairs (2i, 2i+1) (DeepSeek's
    layout) come out as [evens | odds]; otherwise the two halves rotate against each other (Qwen2/Llama).

    On the CPU in float32/bf16, eager, our kernel does it, forward and backward, either layout: one pass with
    PyTorch's roundings instead of six ops, strided slices and a cat."""
    if (x.device.type == "cpu" and {x.dtype, cos.dtype, sin.dtype} <= FLOAT_TYPES and cos.dtype is sin.dtype
            and x.stride(-1) == 1 and (kernel := _eager_kernel("dense")) is not None):
        if torch.is_grad_enabled():
            return _Rope.apply(kernel, x, cos, sin, interleaved)
        # decode: no autograd
        return kernel.rope(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), False, interleaved)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.kernel, ctx.x_dtype, ctx.interleaved = kernel, x.dtype, interleaved
        return kernel.rope(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), False, interleaved)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad_x = ctx.kernel.rope(grad.contiguous(), cos, sin, ctx.x_dtype, True, ctx.interleaved)
        return None, grad_x, None, None, None


# --- attention ----------------------------------------------------------------------------------------------------

def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · scores) over the last dimension where `mask` [B or 1, 1, T, S] allows, in float32 arithmetic,
    returned in the scores' dtype [B, H, T, S].

    On the CPU (float32 or bf16, eager) our kernel does it in one pass over each row, forward and backward, keeping
    two floats a row for the backward instead of a float32 copy of the probabilities; written out (cast, scale,
    mask, softmax, cast back) it was a seventh of a GRPO update and a quarter of its reference pass
    (benchmarks/RESULTS.md, round 10). Elsewhere — and under torch.compile, which fuses the ops itself — the same
    arithmetic in PyTorch ops (a row the mask allows nowhere gives NaN there, 0 in the kernel)."""
    if (scores.device.type == "cpu" and scores.dtype in FLOAT_TYPES
            and (kernel := _eager_kernel("dense")) is not None):
        if torch.is_grad_enabled():
            return _MaskedSoftmax.apply(kernel, scores.contiguous(), mask.contiguous(), scale)
        return kernel.masked_softmax(scores.contiguous(), mask.contiguous(), scale)[0]
    probs = (scores.float() * scale).masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return probs.to(scores.dtype)


class _MaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, scores, mask, scale):
        probs, stats = kernel.masked_softmax(scores, mask, scale)
        ctx.save_for_backward(scores, mask, stats)
        ctx.kernel, ctx.scale = kernel, scale
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        scores, mask, stats = ctx.saved_tensors
        grad = ctx.kernel.masked_softmax_backward(grad_probs.contiguous(), scores, mask, stats, ctx.scale)
        return None, grad, None, None


def attend_grouped(q, k, v, mask, scale, dtype=torch.float32):
    """Attention of q [B, H, T, D] over k, v [B, KV, S, D] under mask [B, 1, T, S], written out: the query heads
    that share a key head stacked as rows of one matmul. The matmuls run in `dtype` and the softmax
    (`masked_softmax`) in float32; decode's arithmetic is float32 whatever the cache holds (a bf16 cache is read,
    not kept, in float32).

    For a few queries against a cache this beats F.scaled_dot_product_attention on the CPU (benchmarks/RESULTS.md,
    round 6), and unlike SDPA's CPU kernel, which splits the keys among threads when there is one
    query, its result does not depend on the thread count: a seed gives the same samples on 1 or 2 threads.
    """
    B, H, T, D = q.shape
    kv_heads, group = k.shape[1], H // k.shape[1]
    grouped = q.to(dtype).reshape(B, kv_heads, group * T, D)
    scores = torch.matmul(grouped, k.to(dtype).transpose(-1, -2)).view(B, H, T, -1)
    probs = masked_softmax(scores, mask, scale)
    out = torch.matmul(probs.view(B, kv_heads, group * T, -1), v.to(dtype))
    return out.view(B, H, T, v.shape[-1]).to(q.dtype)


def attend_cache(q, k, v, mask, scale):
    """Decode's attention of q [B, H, T, D] over the cached k, v [B, KV, S, D] under mask [B, 1, T, S]: [B, T, H·D].

    On the CPU (inference, float32 or bf16, D a multiple of 16) our kernel does it in one pass per row and key head,
    in float32 arithmetic as `attend_grouped` does; written out in PyTorch it was a third of a 16-row int8 decode
    step (benchmarks/RESULTS.md, round 9). Elsewhere, `attend_grouped`."""
    B, H, T, D = q.shape
    if (q.device.type == "cpu" and D % 16 == 0 and not torch.is_grad_enabled()
            and (kernel := _kernel("dense")) is not None and {q.dtype, k.dtype} <= FLOAT_TYPES):
        return kernel.attend_cache(q, k, v, mask, scale)
    return attend_grouped(q, k, v, mask, scale).transpose(1, 2).reshape(B, T, -1)


def attend_latent(q_nope, q_pe, kv, mask, weight, scale):
    """MLA's absorbed decode: attention over the cached [latent | rope key] kv [B, 1, S, r + rope] without expanding
    it to heads, for q_nope [B, H, T, nope], q_pe [B, H, T, rope] (rotated), mask [B, 1, T or 1, S] and kv_b_proj's
    weight [H·(nope + v), r] -> [B, T, H·v] in q_nope's dtype.

    With the weight viewed per head as [W_UK | W_UV], q_nope·k_nope = (q_nope W_UK)·latent and
    P·v = (P·latent) W_UVᵀ, so all heads share one key [latent | k_pe] and one value (the latent): multi-query
    attention in the latent space. The arithmetic is float32 whatever the weights and cache hold: CPU's bf16 batched
    matmuls at these shapes are slower as well as less exact (benchmarks/RESULTS.md, round 4). On the CPU in
    inference (r and rope multiples of 16), our kernel does all of it in one call, one pass over the cache per row
    (written out, it was a large share of a deepseek_v3 decode step; round 12)."""
    B, H, T, nope = q_nope.shape
    rope_dim = q_pe.shape[-1]
    rank = kv.shape[-1] - rope_dim
    if (q_nope.device.type == "cpu" and not torch.is_grad_enabled() and (kernel := _kernel("dense")) is not None
            and weight.dtype is q_nope.dtype and {q_nope.dtype, kv.dtype} <= FLOAT_TYPES
            and rank % 16 == 0 and rope_dim % 16 == 0):
        return kernel.attend_latent(q_nope, q_pe.float(), kv, mask, weight.contiguous(), scale)
    v_dim = weight.shape[0] // H - nope
    w = weight.float().view(H, nope + v_dim, rank)
    heads_first = q_nope.float().transpose(0, 1).reshape(H, B * T, nope)
    q_latent = torch.bmm(heads_first, w[:, :nope]).view(H, B, T, -1).transpose(0, 1)  # [B, H, T, r]
    q = torch.cat((q_latent, q_pe.float()), dim=-1).reshape(B, H * T, -1)
    kv = kv.squeeze(1).float()  # [B, S, r + rope]
    scores = torch.bmm(q, kv.transpose(1, 2)).view(B, H, T, -1) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = torch.bmm(probs.view(B, H * T, -1), kv[..., :rank])  # [B, H*T, r]
    out = out.view(B, H, T, -1).transpose(0, 1).reshape(H, B * T, -1)
    out = torch.bmm(out, w[:, nope:].transpose(1, 2))  # [H, B*T, v]
    return out.view(H, B, T, v_dim).permute(1, 2, 0, 3).reshape(B, T, H * v_dim).to(q_nope.dtype)


def store_latent(kv_a, weight, eps, cos, sin, interleaved, cache, rows, slots) -> bool:
    """MLA decode: normalise (RMSNorm `weight`, `eps`) and rotate the new tokens' latent and rope key straight from
    kv_a [B, T, r + rope] into `cache` at `rows`, `slots`, in one call of our kernel (CPU, eager, inference, one
    float dtype for kv_a, weight and cache); False, with nothing stored, where it does not apply."""
    if not (kv_a.device.type == "cpu" and not torch.is_grad_enabled()
            and kv_a.dtype is weight.dtype is cache.dtype and kv_a.dtype in FLOAT_TYPES
            and cos.dtype in FLOAT_TYPES and cos.stride(-1) == 1
            and (kernel := _eager_kernel("dense")) is not None):
        return False
    kernel.store_latent(kv_a, weight, eps, cos, sin, interleaved, cache, rows, slots)
    return True


# --- mixture of experts (decode) ----------------------------------------------------------------------------------

def route_experts(x, weight, bias, top_k, n_group, topk_group, normalise, scaling, always_on):
    """MoE decode's router (sigmoid scores, the selection bias, group-limited top-k) and the sort of the chosen
    (token, expert) pairs by expert, in one call: (token, ends, weight float32). Our kernel only (`has("dense")`):
    written out, the router and the sort are Router.forward and Experts.forward."""
    return _required("dense", "route_experts").route_experts(x.contiguous(), weight, bias, top_k, n_group,
                                                             topk_group, normalise, scaling, always_on)


def combine_experts(out, token, weight, rows):
    """The experts' outputs out [pairs, H], weighted by `weight` and summed into their tokens: [rows, H] float32.
    Our kernel only, beside route_experts."""
    return _required("dense", "combine_experts").combine_experts(out.contiguous(), token, weight, rows)


# --- quantised weights: our kernels only; the layers keep PyTorch's layout where the level has none ---------------

def int8_pack(w, packed, scales, rowsum) -> None:
    """Quantise w [N, K] float32 per output channel into the int8 kernels' packed layout, in place."""
    _required("quantized", "int8_pack").int8_pack(w, packed, scales, rowsum)


def int8_matmul(x, packed, scales, rowsum):
    """x [..., K] by int8 weights packed [N/16, K/4, 16, 4] with per-channel `scales` and row sums: [..., N]."""
    return _required("quantized", "int8_matmul").int8_matmul(x, packed, scales, rowsum)


def int4_matmul(x, packed):
    """x [M, K] by int4 weights in the int4 kernel's records: [M, N]."""
    return _required("quantized", "int4_matmul").int4_matmul(x, packed)


def grouped_int8_matmul(x, packed, scales, rowsum, ends):
    """x [M, K] sorted by expert times each expert's packed int8 weight, ends [E] cumulative row counts: [M, N]."""
    return _required("quantized", "grouped_int8_matmul").grouped_int8_matmul(x, packed, scales, rowsum, ends)


def int8_experts(x, token, ends, weight, *stacks):
    """MoE decode's experts over int8 stacks in one call: gather, gate/up, SwiGLU, down, weighted sum: [N, H]."""
    return _required("quantized", "int8_experts").int8_experts(x, token, ends, weight, *stacks)


# --- the head's log-probs (training) ------------------------------------------------------------------------------

def token_logprobs_on_kernel(logits: torch.Tensor) -> bool:
    """Whether `token_logprobs` of these logits runs on our kernel (CPU, float32 or bf16, eager)."""
    return (logits.device.type == "cpu" and logits.dtype in FLOAT_TYPES
            and _eager_kernel("dense") is not None)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, V], targets [N] in [0, V) -> (log softmax(logits / temperature) at each target, float32 or wider;
    each row's entropy, detached, or None without `entropy`): what the pretraining loss and GRPO's objective share.

    On the CPU (float32 or bf16 logits, eager) our kernel reads each row of logits once forward and once backward,
    in float32 arithmetic, and keeps only the logits for the backward; written out (a float32 copy, log-softmax,
    exp, entropy, gather, and their backwards, a zero-filled gradient) it was an eighth of a GRPO update at the
    benchmark's 2,048 tokens × 8,192 (benchmarks/RESULTS.md, round 10) and a twentieth of the demo's pretraining
    step. Elsewhere the same arithmetic in PyTorch ops."""
    if token_logprobs_on_kernel(logits):
        logp, per_token_entropy = _TokenLogprobs.apply(_kernel("dense"), logits.contiguous(), targets.contiguous(),
                                                       temperature, entropy)
        return logp, per_token_entropy if entropy else None
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    logp_all = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    per_token_entropy = None
    if entropy:
        with torch.no_grad():
            per_token_entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), per_token_entropy


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, logits, targets, temperature, entropy):
        logp, per_token_entropy, stats = kernel.token_logprobs(logits, targets, temperature, entropy)
        ctx.save_for_backward(logits, targets, stats)
        ctx.kernel, ctx.temperature = kernel, temperature
        ctx.mark_non_differentiable(per_token_entropy)
        return logp, per_token_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, stats = ctx.saved_tensors
        grad = ctx.kernel.token_logprobs_backward(grad_logp.float().contiguous(), logits, targets, stats,
                                                  ctx.temperature)
        return None, grad, None, None, None
