"""Per-token log-probs of target tokens from a model's logits: what the pretraining loss and GRPO's objective share.

On the CPU (float32 or bf16 logits, eager) our kernel (kernels/dense_avx512.cpp) reads each row of logits once forward
and once backward, in float32 arithmetic, and keeps only the logits for the backward; written out (a float32 copy,
log-softmax, exp, entropy, gather, and their backwards, a zero-filled gradient) it was an eighth of a GRPO update at
the benchmark's 2,048 tokens × 8,192 (benchmarks/RESULTS.md, round 10) and a twentieth of the demo's pretraining
step. Elsewhere the same arithmetic in PyTorch ops."""

from __future__ import annotations

import torch

from openseek.kernels import dense_avx512
from openseek.model.linear import has_kernel


def on_kernel(logits: torch.Tensor) -> bool:
    """Whether `target_logprobs` of these logits runs on our kernel."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and has_kernel())


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, V], targets [N] in [0, V) -> (log softmax(logits / temperature) at each target, float32 or wider;
    each row's entropy, detached, or None without `entropy`)."""
    if on_kernel(logits):
        logp, per_token_entropy = _TokenLogprobs.apply(logits.contiguous(), targets.contiguous(), temperature, entropy)
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
    def forward(ctx, logits, targets, temperature, entropy):
        logp, per_token_entropy, stats = dense_avx512().token_logprobs(logits, targets, temperature, entropy)
        ctx.save_for_backward(logits, targets, stats)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(per_token_entropy)
        return logp, per_token_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, stats = ctx.saved_tensors
        grad = dense_avx512().token_logprobs_backward(grad_logp.float().contiguous(), logits, targets, stats,
                                                      ctx.temperature)
        return grad, None, None, None
