"""Weight-only quantisation as a module swap, made before any weight is read (gpt-fast's pattern).

`openseek.load(path, dtype=torch.bfloat16, quantize="int8" | "int4", group_size=32)` builds the model on the meta
device, swaps the chosen `nn.Linear`s for `Int8Linear` / `Int4Linear`, then reads each checkpoint tensor and
quantises it on the way in, one tensor at a time: a quantised model never holds a full-precision copy of itself.

- int8: per output channel, symmetric absmax (w ≈ q·scale, q in [-127, 127]); our int8 kernel
  (ops.int8_matmul: activations quantised per row inside it) where the kernel level has one, else
  `aten._weight_int8pack_mm`.
- int4: per group of `group_size` input columns, asymmetric (w ≈ q·scale + low, q in [0, 15]); our int4 kernel
  (activations quantised per row and group inside it) where the kernel level has one, else
  `aten._weight_int4pack_mm_for_cpu` (CPU only: the CUDA op wants another packing, not implemented here).
- MoE's routed experts (3-D stacks): int8 per output channel with either option (`GroupedInt8`: all experts of a
  layer in one kernel call; there is no grouped int4 kernel), where our int8 kernel runs.

PyTorch's kernels (the fallback) are fast only with bf16 activations (fp32 inputs take a much slower path), so the
layers cast their input to bf16 for them; ours take either. Every result goes back to the model's dtype. What stays
in `dtype`, and why:
- embeddings (untied): a lookup table, read one row per token, not streamed per step (a tied embedding and head
  become one int8 copy, the head's, whose rows the embedding dequantises on lookup);
- MLA's `kv_b_proj`: the absorbed decode folds its halves into the query and the output (it reads `.weight`);
- the router gate: routing decisions stay float32, as in DeepSeek's code;
- routed experts where our int8 kernel cannot run (none at this kernel level, or sizes not multiples of 16);
- a layer whose shape a kernel cannot take (int4: out_features % 16, in_features % group_size).
`quantize_modules` returns one line per such tensor group, which `load` prints.
"""

from __future__ import annotations

import torch
from torch import nn

from openseek.kernels import ops
from openseek.model.moe import Experts

QUANTIZE = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
KEPT_IN_DTYPE = ("kv_b_proj",)  # read as a matrix by MLA's absorbed decode


def check_options(quantize: str | None, group_size: int, device) -> str:
    """The quantisation mode, or a ValueError naming the option and what is supported."""
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)}")
    if quantize == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: int4 supports {', '.join(map(str, GROUP_SIZES))}")
    if quantize == "int4" and torch.device(device).type != "cpu":
        raise ValueError(f"quantize='int4' has a kernel on the CPU only (aten._weight_int4pack_mm_for_cpu); on "
                         f"{torch.device(device).type} use quantize='int8' or dtype=torch.bfloat16")
    return quantize


class Int8Linear(nn.Module):
    """y = x·(q·scale)ᵀ + b with q int8 [out, in] and one scale per output channel.

    With our int8 kernel (`packed`: the level has one) the weight is stored for it, [out/16, in/4, 16, 4], with float32
    scales and the row sums the kernel needs, and activations are quantised per row to int8 inside the kernel (as
    llama.cpp's Q8_0 dot products do). Otherwise it stays [out, in] for PyTorch's kernel, which multiplies bf16
    activations by the dequantised weight and takes its scales in bf16: a copy of `scales` (float32 on both paths,
    so that a layer quantises the same weight to the same numbers on every CPU) rounded once at load."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, kernels: bool = True):
        """kernels: whether the layer runs where our int8 kernel can (the CPU; False for a CUDA model)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed = kernels and ops.has("quantized") and out_features % 16 == 0 and in_features % 4 == 0
        if self.packed:
            shape = (out_features // 16, in_features // 4, 16, 4)
            self.register_buffer("rowsum", torch.empty(out_features, dtype=torch.int32))
        else:
            shape = (out_features, in_features)
            self.register_buffer("bf16_scales", torch.empty(out_features, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("weight", torch.empty(shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor) -> None:
        w = w.float().contiguous()
        if self.packed and self.in_features % 16 == 0:  # the same arithmetic, in one pass, packed
            ops.int8_pack(w, self.weight, self.scales, self.rowsum)
            return
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales.copy_(scales)
        if not self.packed:
            self.weight.copy_(q)
            self.bf16_scales.copy_(scales)
            return
        N, K = q.shape
        self.weight.copy_(q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3))
        self.rowsum.copy_(q.sum(dim=1, dtype=torch.int32))

    def quantized(self) -> torch.Tensor:
        """q as [out, in] int8, whichever layout holds it."""
        if not self.packed:
            return self.weight
        return self.weight.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        return self.quantized().float() * self.scales.float()[:, None]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the dequantised weight ([*ids.shape, in] in `dtype`): a tied embedding's lookup."""
        if not self.packed:
            q = self.weight[ids]
        else:
            q = self.weight[ids // 16, :, ids % 16, :].reshape(*ids.shape, self.in_features)
        return q.to(dtype) * self.scales[ids, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            # x [..., in] as it is (a reshape costs as much as a small projection's matmul here)
            y = ops.int8_matmul(x.contiguous(), self.weight, self.scales, self.rowsum)
        else:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.bf16_scales).view(*x.shape[:-1], -1)
        y = y if y.dtype is x.dtype else y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """The input embedding of a model whose head is tied to it, read from the head's int8 weight: one quantised
    copy serves both, and each looked-up row is dequantised (per-row scales are exactly the head's per-channel
    ones)."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = head, dtype

    @property
    def weight(self) -> torch.Tensor:  # what `Model.tie_weights` hands to the head: the head's own buffer
        return self.head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(ids, self.dtype)


class Int4Linear(nn.Module):
    """y = x·Wᵀ + b with W stored as 4-bit values in groups of `group_size` input columns, W ≈ q·scale + low with
    q in [0, 15] and a bf16 scale and low per group and output row.

    With our int4 kernel (`packed`: the level has one) the weight is one uint8 buffer of records, [out/16,
    in/group, group·8 + 64]: a group's 4-bit values for 16 output rows, then their scales and lows (the kernel's
    comment has the byte layout), and activations are quantised per row and group to int8 inside the kernel (as
    llama.cpp's Q4_0 dot products do). Otherwise the weight is in the layout of `aten._weight_int4pack_mm_for_cpu`,
    which multiplies bf16 activations by the dequantised weight, with `scales_and_zeros` [in/group, out, 2] beside
    it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.packed = ops.has("quantized")
        if self.packed:
            shape = (out_features // 16, in_features // group_size, group_size * 8 + 64)
            self.register_buffer("weight", torch.empty(shape, dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales_and_zeros",
                                 torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @staticmethod
    def fits(in_features: int, out_features: int, group_size: int) -> bool:
        return out_features % 16 == 0 and in_features % group_size == 0

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor) -> None:
        N, K, G = self.out_features, self.in_features, self.group_size
        groups = w.float().view(N, K // G, G)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        # q is rounded against the bf16 scale and low that are stored, so q·scale + low is the nearest level
        scales = ((high - low) / 15).clamp(min=1e-8).bfloat16()
        low = low.bfloat16()
        q = torch.round((groups - low.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
        if not self.packed:
            self.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(N, K).int(), 1))
            # PyTorch's kernel computes (q − 8)·scale + zero: zero = low + 8·scale
            zeros = low.float() + 8 * scales.float()
            self.scales_and_zeros.copy_(torch.stack((scales.float(), zeros), dim=-1).transpose(0, 1))
            return
        # [N/16, 16, K/G, G/8, 2, 4] -> [N/16, K/G, G/8, 16, 4, 2]: per chunk of 8 columns, row i's bytes 4i..4i+3
        # hold columns j (low nibble) and 4 + j (high nibble)
        chunks = q.view(N // 16, 16, K // G, G // 8, 2, 4).permute(0, 2, 3, 1, 5, 4)
        nibbles = (chunks[..., 0] | (chunks[..., 1] << 4)).reshape(N // 16, K // G, G * 8)
        params = torch.stack((scales, low), dim=-1).view(N // 16, 16, K // G, 2).permute(0, 2, 3, 1)
        params = params.contiguous().view(torch.uint8).reshape(N // 16, K // G, 64)
        self.weight.copy_(torch.cat((nibbles, params), dim=-1))

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the kernel multiplies by, q·scale + low (for tests)."""
        N, K, G = self.out_features, self.in_features, self.group_size
        if not self.packed:  # PyTorch's packing is its own: q is read back through its kernel on the identity
            eye = torch.eye(K, dtype=torch.bfloat16, device=self.weight.device)
            rounded = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, G,
                                                                 self.scales_and_zeros).float().T  # [N, K]
            scales, zeros = (t.float().T.repeat_interleave(G, dim=1) for t in self.scales_and_zeros.unbind(-1))
            q = torch.round((rounded - zeros) / scales + 8).clamp(0, 15)
            return (q - 8) * scales + zeros
        nibbles = self.weight[..., :G * 8].reshape(N // 16, K // G, G // 8, 16, 4)
        q = torch.stack((nibbles & 15, nibbles >> 4), dim=-1)  # [N/16, K/G, G/8, 16, 4, 2]
        q = q.permute(0, 3, 1, 2, 5, 4).reshape(N, K // G, G).float()
        params = self.weight[..., G * 8:].contiguous().view(torch.bfloat16).view(N // 16, K // G, 2, 16)
        scales, low = params.permute(0, 3, 1, 2).reshape(N, K // G, 2).float().unbind(-1)
        return (q * scales[..., None] + low[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.packed:
            y = ops.int4_matmul(flat.contiguous(), self.weight)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.weight, self.group_size,
                                                           self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class GroupedInt8(nn.Module):
    """A stack of int8 weights, one per routed expert: [E, out, in] as E `Int8Linear` weights side by side (each
    expert's rows packed for our int8 kernel, per-output-channel scales), multiplied by `grouped_int8_matmul` in one
    call for all experts. It takes the place of an `Experts` weight parameter (`gate_up_proj`, `down_proj`), which
    `moe.grouped_matmul` then hands it to."""

    def __init__(self, experts: int, out_features: int, in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(experts, out_features // 16, in_features // 4, 16, 4,
                                                   dtype=torch.int8))
        self.register_buffer("scales", torch.empty(experts, out_features, dtype=torch.float32))
        self.register_buffer("rowsum", torch.empty(experts, out_features, dtype=torch.int32))

    @staticmethod
    def fits(in_features: int, out_features: int, rows: int) -> bool:
        """Whether the kernel takes the shape: whole blocks of 16 outputs (also within the checkpoint's row slices:
        gate and up of an expert arrive as two tensors) and of 16 inputs (`int8_pack`)."""
        return ops.has("quantized") and out_features % 16 == 0 and rows % 16 == 0 and in_features % 16 == 0

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor) -> None:
        """All experts at once, w [E, out, in]."""
        for expert, rows in enumerate(w):
            self.load_expert(expert, None, rows)

    @torch.no_grad()
    def load_expert(self, expert: int, rows: tuple[int, int] | None, w: torch.Tensor) -> None:
        """Expert `expert`'s output rows `rows` (all when None) from w [rows, in], quantised and packed in place."""
        start, end = rows or (0, self.out_features)
        ops.int8_pack(w.float().contiguous(), self.weight[expert, start // 16 : end // 16],
                      self.scales[expert, start:end], self.rowsum[expert, start:end])

    def dequantized(self) -> torch.Tensor:
        """[E, out, in] float32, q·scale (for tests)."""
        E, N, K = self.weight.shape[0], self.out_features, self.in_features
        q = self.weight.permute(0, 1, 3, 2, 4).reshape(E, N, K)
        return q.float() * self.scales[..., None]

    def experts(self, x: torch.Tensor, token: torch.Tensor, ends: torch.Tensor, weights: torch.Tensor,
                down: GroupedInt8) -> torch.Tensor:
        """The experts' weighted SwiGLU sum [N, H] over x [N, H], this stack being their gate/up and `down` their
        down projection, for `Router.dispatch`'s pairs: one kernel call (inference on the CPU)."""
        return ops.int8_experts(x.contiguous(), token, ends, weights, self.weight, self.scales, self.rowsum,
                                down.weight, down.scales, down.rowsum)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x [M, in] sorted by expert, ends [E] cumulative row counts -> [M, out] in x's dtype."""
        return ops.grouped_int8_matmul(x.contiguous(), self.weight, self.scales, self.rowsum, ends).to(x.dtype)


def quantize_modules(model: nn.Module, quantize: str, group_size: int = 32,
                     device="cpu") -> tuple[dict[str, nn.Module], list[str]]:
    """Swap the model's eligible `nn.Linear`s (on the meta device, before loading onto `device`) for quantised ones:
    laid out for our kernels on the CPU, for PyTorch's (`aten._weight_int8pack_mm`, which has a CUDA kernel) on a
    GPU.

    Returns ({weight name: quantised module}, lines saying what stays in the model's dtype and why)."""
    if quantize == "none":
        return {}, []
    kernels = torch.device(device).type == "cpu"
    tied = model.lm_head.weight is model.embed_tokens.weight
    swapped, kept = {}, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in KEPT_IN_DTYPE or (name == "lm_head" and tied):
            continue
        K, N = module.in_features, module.out_features
        if quantize == "int4" and not Int4Linear.fits(K, N, group_size):
            kept.append(f"{name} [{N}, {K}] stays in {module.weight.dtype}: int4 needs out_features % 16 == 0 and "
                        f"in_features % {group_size} == 0")
            continue
        dtype, bias = module.weight.dtype, module.bias is not None
        with torch.device("meta"):
            new = (Int8Linear(K, N, bias, dtype, kernels) if quantize == "int8"
                   else Int4Linear(K, N, bias, dtype, group_size))
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, new)
        swapped[f"{name}.weight"] = new
    if tied:  # the head streams every step: one int8 copy serves it and the embedding lookups
        dtype = model.embed_tokens.weight.dtype
        with torch.device("meta"):
            model.lm_head = Int8Linear(model.cfg.hidden_size, model.cfg.vocab_size, False, dtype, kernels)
            model.embed_tokens = Int8Embedding(model.lm_head, dtype)
        swapped["embed_tokens.weight"] = swapped["lm_head.weight"] = model.lm_head
        kept.append("the tied embedding and lm_head are int8 (per row), one copy for both" +
                    (" (the head stays int8 with int4, as llama.cpp's Q4_0 keeps its output layer at Q8_0)"
                     if quantize == "int4" else ""))
    else:
        kept.append("embeddings stay in the model's dtype: a lookup table, read one row a token")
    if any(leaf in n for n, _ in model.named_modules() for leaf in KEPT_IN_DTYPE):
        kept.append("MLA kv_b_proj stays in the model's dtype: the absorbed decode folds its halves into the query "
                    "and the output")
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    for name, module in experts:
        E, two_i, H = module.gate_up_proj.shape
        if not (kernels and GroupedInt8.fits(H, two_i, two_i // 2) and GroupedInt8.fits(two_i // 2, H, H)):
            kept.append(f"{name} [{E}, {two_i}, {H}] stays in {module.gate_up_proj.dtype}: the grouped int8 kernel "
                        f"needs our int8 kernel (ops.has('quantized'), CPU only) and sizes that are multiples of 16")
            continue
        for leaf in ("gate_up_proj", "down_proj"):
            E, N, K = getattr(module, leaf).shape
            delattr(module, leaf)
            with torch.device("meta"):
                setattr(module, leaf, GroupedInt8(E, N, K))
            swapped[f"{name}.{leaf}"] = getattr(module, leaf)
    if experts:
        kept.append("routed experts are int8 per channel (the grouped kernel has no int4 form)" if quantize == "int4"
                    else "router gates stay float32 (routing decisions)")
    return swapped, kept


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step streams (a tied embedding counts once, as the lm_head; the embedding table
    itself is read one row a token and not counted when untied)."""
    seen, total = set(), 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or "rotary" in name or (name == "embed_tokens.weight" and not _tied(model)):
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def _tied(model) -> bool:
    return model.lm_head.weight is model.embed_tokens.weight


# Projections that read the same input, fused: {fused module: its parts, in order}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
         "q_kv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}


def fuse_projections(model: nn.Module) -> None:
    """Make q/k/v, gate/up and MLA's two down-projections one `Int8Linear` each: the parts' packed rows, scales, row
    sums and biases stacked (on the meta device for a sampling view, whose `refresh_view` (train/rollout.py) then fills
    them; on a loaded model, the loaded buffers, with no re-quantisation).

    Each output row has its own scale and the activations are quantised per row whatever the width, so the fused
    matmul's outputs are bitwise the separate ones' (a test checks the logits); a decode step makes one kernel call
    where it made two or three, each quantising the activations once, over wider weights (a call's framework time
    is more than a small projection's matmul)."""
    for module in list(model.modules()):
        for fused, parts in FUSED.items():
            linears = [getattr(module, part, None) for part in parts]
            if getattr(module, fused, False) is not None or not all(
                    isinstance(linear, Int8Linear) and linear.packed for linear in linears):
                continue
            bias = linears[0].bias
            with torch.device("meta"):
                new = Int8Linear(linears[0].in_features, sum(l.out_features for l in linears), bias is not None,
                                 bias.dtype if bias is not None else torch.float32)
            for buffer in ("weight", "scales", "rowsum"):  # whole blocks of 16 rows each (the kernel's packing)
                setattr(new, buffer, torch.cat([getattr(linear, buffer) for linear in linears]))
            if bias is not None:
                new.bias = nn.Parameter(torch.cat([linear.bias for linear in linears]), requires_grad=False)
            setattr(module, fused, new)
            for part in parts:
                delattr(module, part)


def fold_shared_experts(model: nn.Module) -> None:
    """In a loaded int8 model, make each MoE layer's shared expert one more expert of its int8 stacks, one that every
    token uses with weight 1 (`Experts.always_on`), when it has a routed expert's shape (DeepSeek-V3: one shared
    expert as wide as a routed one): its fused gate/up and down rows are already packed as a stacked expert's are,
    so this stacks them, with no re-quantisation. A decode step then runs all of a layer's experts in two kernel
    calls instead of four, and sums the shared expert's output with the routed ones' in float32 (SGLang folds
    DeepSeek's shared expert into the routed ones in the same way)."""
    for moe in (m for m in model.modules() if isinstance(getattr(m, "experts", None), Experts)):
        experts, shared = moe.experts, moe.shared_experts
        if shared is None or not isinstance(experts.gate_up_proj, GroupedInt8):
            continue
        gate_up, down = shared.gate_up_proj, shared.down_proj
        if not (isinstance(gate_up, Int8Linear) and isinstance(down, Int8Linear) and gate_up.packed
                and down.packed and gate_up.bias is None and down.bias is None
                and gate_up.out_features == experts.gate_up_proj.out_features
                and down.out_features == experts.down_proj.out_features):
            continue
        for stack, linear in ((experts.gate_up_proj, gate_up), (experts.down_proj, down)):
            for buffer in ("weight", "scales", "rowsum"):
                setattr(stack, buffer, torch.cat((getattr(stack, buffer), getattr(linear, buffer)[None])))
        experts.always_on += 1
        moe.shared_experts = None


