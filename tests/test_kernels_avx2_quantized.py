"""The int8/int4 weight-only kernels at the AVX2 level (quantized_avx2.cpp) equal the AVX-512 VNNI ones
(quantized_vnni.cpp) bit for bit on the same packed weights, and the int8 kernel equals an integer reference in
PyTorch bit for bit too, on random and extreme inputs: the AVX2 kernel multiplies with vpmaddubsw, whose int16
pair sums saturate, and the extreme cases are the ones where a wrong scheme would clip.

Why bit for bit and not a tolerance: both kernels quantise the activations with the same float32 operations,
their integer dot products are exact, and the AVX2 kernel repeats the VNNI kernel's float32 steps after them in the
same order (quantized_avx2.cpp's header), so a quantised model gives the same numbers on every CPU it runs on.
Only the int4 and experts kernels' comparisons with PyTorch references, which sum in another order (and compute
SiLU with PyTorch's exp), use a tolerance.

Parametrised over the extension (test ids name it); a kernel this CPU cannot run is skipped."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import openseek.kernels as kernels

EXTENSIONS = {"quantized_vnni": "openseek", "quantized_avx2": "openseek_avx2"}  # extension: operator namespace
ROWS = [1, 3, 8, 16, 33]


def extension(name: str):
    module = getattr(kernels, name)()
    if module is None:
        pytest.skip(f"{name} cannot run on this CPU (or OPENSEEK_KERNELS=0)")
    return module


@pytest.fixture(params=list(EXTENSIONS))
def kernel(request):
    return extension(request.param)


@pytest.fixture
def both():
    """The AVX2 kernel and the VNNI kernel, to compare."""
    return extension("quantized_avx2"), extension("quantized_vnni")


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 in the kernels' layout [N/16, K/4, 16, 4], written in PyTorch (any int8, -128 included)."""
    N, K = q.shape
    return q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous()


def int8_weight(N: int, K: int, generator: torch.Generator, extreme: str | None = None, x: torch.Tensor = None):
    """(q [N, K] int8, packed, scales, rowsum). extreme: 'aligned' sets w = 127·sign(x[0]) (every product of row 0
    +127·127, each int16 pair of vpmaddubsw at 32258), 'opposed' its negative, 'min' w = -128 everywhere (for a
    positive x[0], pairs of -2·128·127 = -32512: a weight int8_pack never writes but an operator can be handed)."""
    if extreme is None:
        q = torch.randint(-127, 128, (N, K), generator=generator, dtype=torch.int8)
    else:
        sign = torch.where(x[0] >= 0, 1, -1).to(torch.int16)
        q16 = {"aligned": 127 * sign, "opposed": -127 * sign, "min": torch.full_like(sign, -128)}[extreme]
        q = q16.expand(N, K).to(torch.int8).contiguous()
    scales = torch.rand(N, generator=generator) * 0.02 + 1e-3
    return q, pack_int8(q), scales, q.sum(dim=1, dtype=torch.int32)


def quantised_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantisation in PyTorch's float32 arithmetic: (xq [M, K] int64, scale [M])."""
    x = x.float()
    absmax = x.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    inv = 1 / scale
    return torch.round(x * inv[:, None]).long(), scale


def int8_reference(x, q, scales, rowsum) -> torch.Tensor:
    """The int8 kernels' result, exactly: the integer dot products Σ xq·q (int64), then the VNNI kernel's float32
    epilogue, ((float(Σ (xq+128)·q) − float(128·Σq)) · scale) · x_scale."""
    xq, sx = quantised_rows(x)
    dot = xq @ q.long().T
    offset = 128 * rowsum.long()
    y = ((dot + offset).float() - offset.float()) * scales * sx[:, None]
    return y.to(torch.bfloat16) if x.dtype is torch.bfloat16 else y


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("N, K", [(96, 256), (112, 100), (16, 4864)])  # 7 blocks; K not a multiple of 16 or 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_kernel_equals_its_integer_reference_bit_for_bit(kernel, rows, N, K, dtype):
    g = torch.Generator().manual_seed(rows * 7 + N)
    x = (torch.randn(rows, K, generator=g) * torch.rand(rows, 1, generator=g) * 3).to(dtype)
    x[-1, : K // 2] = 0  # a row's zeros (and with one row, half of it)
    q, packed, scales, rowsum = int8_weight(N, K, g)
    got = kernel.int8_matmul(x, packed, scales, rowsum)
    assert got.dtype == dtype and got.shape == (rows, N)
    torch.testing.assert_close(got, int8_reference(x, q, scales, rowsum), rtol=0, atol=0)


@pytest.mark.parametrize("extreme", ["aligned", "opposed", "min"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_no_int16_saturates_at_the_extremes(kernel, extreme, rows):
    """Activations at ±absmax (quantised to ±127) against weights of magnitude 127 or 128 whose signs make every
    product of row 0 the same sign: each int16 pair sum of vpmaddubsw at its bound (±32258, or -32512 with -128);
    the VNNI kernel's own scheme (u8 activations + 128) would reach 64770 and clip here. The other rows are
    random, so the same weights meet mixed signs too. Exact against the integer reference."""
    K, N = 512, 32
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, K, generator=g)
    x[0] = torch.where(torch.rand(K, generator=g) < 0.5, -2.5, 2.5)  # every value at ±absmax
    if extreme == "min":
        x[0] = 2.5
    q, packed, scales, rowsum = int8_weight(N, K, g, extreme, x)
    got = kernel.int8_matmul(x, packed, scales, rowsum)
    want = int8_reference(x, q, scales, rowsum)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    bound = {"aligned": 127 * 127, "opposed": -127 * 127, "min": -128 * 127}[extreme] * K
    assert (quantised_rows(x)[0][0] @ q.long().T == bound).all()  # the case is the extreme one it claims to be


@pytest.mark.parametrize("rows", ROWS)
def test_the_avx2_int8_kernel_equals_the_vnni_kernel_bit_for_bit(both, rows):
    """Same packed weights in, the same bits out, in float32, bfloat16 and float16 activations (and any leading
    shape: x [..., K])."""
    avx2, vnni = both
    g = torch.Generator().manual_seed(rows)
    _, packed, scales, rowsum = int8_weight(80, 96, g)
    x = torch.randn(rows, 96, generator=g)
    for xs in (x, x.bfloat16(), x.half(), x.view(1, rows, 96)):
        assert torch.equal(avx2.int8_matmul(xs, packed, scales, rowsum), vnni.int8_matmul(xs, packed, scales, rowsum))


def test_int8_pack_is_the_same_on_both_kernels_and_in_pytorch(both):
    """int8_pack's packed weight, scales and row sums equal the other kernel's and Int8Linear's PyTorch
    arithmetic (round to nearest even against the float32 scale, within ±127), bit for bit."""
    N, K = 48, 80
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row: scale 1e-12
    w[5, 7] = 40.0  # one large weight: the others of its row round to few levels
    results = []
    for module in both:
        packed, scales, rowsum = torch.empty(N // 16, K // 4, 16, 4, dtype=torch.int8), torch.empty(N), \
            torch.empty(N, dtype=torch.int32)
        module.int8_pack(w, packed, scales, rowsum)
        results.append((packed, scales, rowsum))
    want_scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / want_scales[:, None]).clamp(-127, 127).to(torch.int8)
    for got in results:
        assert torch.equal(got[0], pack_int8(q)) and torch.equal(got[1], want_scales)
        assert torch.equal(got[2], q.sum(dim=1, dtype=torch.int32))


def int4_layer(module, N: int, K: int, G: int, w: torch.Tensor):
    """An Int4Linear [N, K] packed in the kernels' layout (the same at every level), holding w."""
    from openseek import quantize
    from openseek.kernels import ops

    level = "avx2" if module is kernels.quantized_avx2() else "avx512"
    with ops.use_level(level):
        layer = quantize.Int4Linear(K, N, False, torch.float32, G)
    layer.load_weight(w)
    return layer


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("G", [32, 64, 128, 8, 40])  # quantize.py's group sizes; and what the layout also allows
def test_the_avx2_int4_kernel_equals_the_vnni_kernel_bit_for_bit(both, rows, G):
    avx2, vnni = both
    g = torch.Generator().manual_seed(rows * 131 + G)
    K = 4 * G if G != 40 else 200
    layer = int4_layer(avx2, 112, K, G, torch.randn(112, K, generator=g))
    x = torch.randn(rows, K, generator=g)
    for xs in (x, x.bfloat16()):
        assert torch.equal(avx2.int4_matmul(xs, layer.weight), vnni.int4_matmul(xs, layer.weight))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("extreme", [False, True])
def test_the_int4_kernel_equals_its_dequantised_reference(kernel, rows, G, extreme):
    """Against x̂ · Wᵀ in float64 (x̂ the activations quantised per row and group, W = q·scale + low), on random
    inputs and extreme ones: q = 15 everywhere but each group's first column (q = 0 there, so that the group has two
    levels), activations ±127 everywhere but that column (0): each int16 of the AVX2 kernel's sums over 32 columns
    (16 products of 15·127) meets its bound, ±30480. Tolerance: the kernel sums the groups' float32 results in
    order, a float64 reference does not round; relative 1e-5 of the largest output covers K / G float32 roundings."""
    N, K = 48, 4 * G
    g = torch.Generator().manual_seed(rows + G)
    w, x = torch.randn(N, K, generator=g), torch.randn(rows, K, generator=g)
    if extreme:
        first = torch.arange(K) % G == 0
        w = torch.where(first, -1.0, 1.0).expand(N, K)
        x = torch.where(first, 0.0, torch.where(torch.arange(rows)[:, None] % 2 == 0, 3.0, -3.0)).expand(rows, K)
        x = x.contiguous()
    layer = int4_layer(kernel, N, K, G, w)
    blocks = x.view(rows, K // G, G)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    x_hat = (torch.round(blocks * (1 / step)) * step).view(rows, K)
    want = x_hat.double() @ layer.dequantized().double().T
    got = kernel.int4_matmul(x, layer.weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def grouped_weights(E: int, N: int, K: int, g: torch.Generator):
    q = torch.randint(-127, 128, (E, N, K), generator=g, dtype=torch.int8)
    packed = torch.stack([pack_int8(q[e]) for e in range(E)])
    return q, packed, torch.rand(E, N, generator=g) * 0.02 + 1e-3, q.sum(dim=2, dtype=torch.int32)


@pytest.mark.parametrize("counts", [[2, 0, 11, 1], [1, 1, 1, 1], [0, 33, 0, 3]])
def test_the_grouped_int8_kernel_is_each_group_s_own_int8_product(kernel, counts):
    """Rows of each group times that group's weight, exactly the integer reference (idle groups, one-row groups,
    groups of more rows than one pass)."""
    g = torch.Generator().manual_seed(sum(counts))
    q, packed, scales, rowsum = grouped_weights(4, 48, 64, g)
    ends = torch.tensor(counts).cumsum(0)
    x = torch.randn(int(ends[-1]), 64, generator=g)
    got = kernel.grouped_int8_matmul(x, packed, scales, rowsum, ends)
    for e, (s, t) in enumerate(zip((ends - torch.tensor(counts)).tolist(), ends.tolist())):
        if t > s:
            torch.testing.assert_close(got[s:t], int8_reference(x[s:t], q[e], scales[e], rowsum[e]), rtol=0, atol=0)


def test_the_grouped_and_experts_kernels_equal_the_vnni_ones_bit_for_bit(both):
    """grouped_int8_matmul and the whole experts kernel (gate/up, SwiGLU with the kernels' own e^x, down, the
    weighted sum) give the VNNI kernels' bits, in float32 and bfloat16."""
    avx2, vnni = both
    g = torch.Generator().manual_seed(0)
    E, H, I, N = 5, 64, 32, 11
    _, gu, gu_scales, gu_rowsum = grouped_weights(E, 2 * I, H, g)
    _, dn, dn_scales, dn_rowsum = grouped_weights(E, H, I, g)
    token = torch.tensor([0, 3, 7, 1, 2, 4, 5, 6, 8, 9, 10, 0, 5])  # sorted by expert: counts 3, 0, 9, 1, 0
    ends = torch.tensor([3, 3, 12, 13, 13])
    weights = torch.rand(13, generator=g)
    x = torch.randn(N, H, generator=g) * 4  # gate values far into SiLU's tails too
    for xs in (x, x.bfloat16()):
        args = (xs, token, ends, weights, gu, gu_scales, gu_rowsum, dn, dn_scales, dn_rowsum)
        assert torch.equal(avx2.int8_experts(*args), vnni.int8_experts(*args))
        gathered = xs.index_select(0, token)
        assert torch.equal(avx2.grouped_int8_matmul(gathered, gu, gu_scales, gu_rowsum, ends),
                           vnni.grouped_int8_matmul(gathered, gu, gu_scales, gu_rowsum, ends))


def test_the_experts_kernel_equals_its_parts(kernel):
    """int8_experts = Σ weight · down(silu(gate) · up) with the same kernel's grouped matmuls for the projections and
    PyTorch's SiLU and weighted sum: close, not equal (PyTorch's e^x and summation order are its own; relative 1e-5
    here, but one SwiGLU value rounding differently can move a down-projection's int8 activation by one step, so
    2e-3 of the output's scale)."""
    g = torch.Generator().manual_seed(1)
    E, H, I, N = 3, 48, 32, 5
    _, gu, gu_scales, gu_rowsum = grouped_weights(E, 2 * I, H, g)
    _, dn, dn_scales, dn_rowsum = grouped_weights(E, H, I, g)
    token = torch.tensor([0, 2, 4, 1, 3, 0, 1, 2])
    ends = torch.tensor([3, 3, 8])
    weights, x = torch.rand(8, generator=g), torch.randn(N, H, generator=g)
    got = kernel.int8_experts(x, token, ends, weights, gu, gu_scales, gu_rowsum, dn, dn_scales, dn_rowsum)
    gate, up = kernel.grouped_int8_matmul(x[token], gu, gu_scales, gu_rowsum, ends).chunk(2, dim=-1)
    out = kernel.grouped_int8_matmul((torch.nn.functional.silu(gate) * up).contiguous(), dn, dn_scales, dn_rowsum,
                                     ends)
    want = torch.zeros(N, H).index_add_(0, token, out * weights[:, None])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_the_operators_have_shapes_for_torch_compile(name):
    """Each operator of the extension's namespace has a fake (shape-only) version: what a torch.compile'd decode
    step traces."""
    extension(name)
    ops = getattr(torch.ops, EXTENSIONS[name])
    with FakeTensorMode():
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        y = ops.int8_matmul(x, torch.empty(2, 16, 16, 4, dtype=torch.int8), torch.empty(32),
                            torch.empty(32, dtype=torch.int32))
        assert y.shape == (2, 3, 32) and y.dtype is torch.bfloat16
        y = ops.int4_matmul(torch.empty(3, 64), torch.empty(2, 2, 32 * 8 + 64, dtype=torch.uint8))
        assert y.shape == (3, 32) and y.dtype is torch.float32
        y = ops.grouped_int8_matmul(torch.empty(3, 64), torch.empty(2, 2, 16, 16, 4, dtype=torch.int8),
                                    torch.empty(2, 32), torch.empty(2, 32, dtype=torch.int32),
                                    torch.empty(2, dtype=torch.long))
        assert y.shape == (3, 32)


@pytest.mark.parametrize("bad, message", [
    ("K not a multiple of 4", "x [..., K]: K = 66 must be a multiple of 4"),
    ("int4 group mismatch", "packed weight does not match x: [2, 2, 320] for K = 96"),
    ("int4 int8 weight", "packed must be a contiguous [N/16, K/G, G*8 + 64] uint8 tensor"),
    ("grouped packed short", "packed weight does not match x and scales"),
    ("grouped ends dtype", "ends must be [G] int64 (cumulative row counts)"),
    ("experts token", "token 5 out of range for 5"),
    ("pack shape", "packed, scales, rowsum do not match w"),
])
def test_bad_inputs_are_refused_with_the_tensor_named(kernel, bad, message):
    """Beyond the checks both kernels share in test_kernels.py: each function refuses what would read or write
    outside its buffers, naming what does not match (the same message on both kernels)."""
    g = torch.Generator().manual_seed(0)
    _, packed, scales, rowsum = int8_weight(32, 64, g)
    _, gp, gs, gr = grouped_weights(2, 32, 64, g)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        if bad == "K not a multiple of 4":
            kernel.int8_matmul(torch.randn(2, 66), packed, scales, rowsum)
        elif bad == "int4 group mismatch":
            kernel.int4_matmul(torch.randn(2, 96), torch.zeros(2, 2, 320, dtype=torch.uint8))
        elif bad == "int4 int8 weight":
            kernel.int4_matmul(torch.randn(2, 64), torch.zeros(2, 2, 320, dtype=torch.int8))
        elif bad == "grouped packed short":
            kernel.grouped_int8_matmul(torch.randn(2, 64), gp[:1].contiguous(), gs, gr, torch.tensor([1, 2]))
        elif bad == "grouped ends dtype":
            kernel.grouped_int8_matmul(torch.randn(2, 64), gp, gs, gr, torch.tensor([1, 2], dtype=torch.int32))
        elif bad == "experts token":
            _, dp, ds, dr = grouped_weights(2, 64, 16, g)
            kernel.int8_experts(torch.randn(5, 64), torch.tensor([0, 5]), torch.tensor([1, 2]), torch.rand(2), gp,
                                gs, gr, dp, ds, dr)
        else:
            kernel.int8_pack(torch.randn(32, 64), packed[:1], scales, rowsum)


def test_the_avx2_kernel_is_avx2_code_and_offers_every_function_of_the_vnni_one(both):
    """Built for x86-64-v3, not this machine (an AVX-512 machine must test true AVX2 code), with the VNNI
    extension's whole interface; no AMX at this level."""
    avx2, vnni = both
    public = {name for name in dir(vnni) if not name.startswith("_")}
    assert public <= set(dir(avx2))
    assert avx2.use_amx(True) is False
    assert "-march=x86-64-v3" in kernels.EXTENSIONS["quantized_avx2"].flags
    assert "-march=native" not in kernels.EXTENSIONS["quantized_avx2"].flags
