"""Token cross-entropy straight from bf16 logits: one Triton kernel forward, one backward.

The eager loss, `F.cross_entropy(logits.float(), labels)`, makes an fp32 copy of the logits,
a log-softmax of them (another fp32 tensor, kept for backward), and in backward an fp32
gradient that is then cast back to the logits' dtype: about ten bytes of HBM traffic per logit
each way and two fp32 [tokens, vocab] tensors alive at once. With the `small` model's 32768-token
vocabulary and 8192 tokens per micro-batch that is 1 GiB per tensor, for the main head and again
for each MTP depth.

Here each row (one token's logits) is one program:

    forward    reads the row once in BLOCK_V chunks with an online max / sum-of-exponentials
               (fp32), stores the row's loss lse - logit[label] and its log-sum-exp (4 bytes);
    backward   reads the row again and writes the gradient in the logits' dtype directly:
               d loss / d logit_v = (softmax_v - [v == label]) * upstream gradient.

Saved for backward: the logits themselves (bf16, which the head's output already is) and one
fp32 per row. Rows whose label is `IGNORE` (-100) contribute zero loss and zero gradient.
The reduction is a sum over rows; `models.transformer.cross_entropy` divides by the label count.
Numerics: fp32 throughout, exactly the eager formula up to the order of the vocabulary sum.

Dispatch follows `models.kernels.fused` (CUDA tensors, compiled Triton); on CPU the model keeps
the eager loss, and tests run these kernels through the Triton interpreter.
"""
from __future__ import annotations

import torch

from models import kernels  # imports models.triton_env first: the interpreter on CPU-only machines
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

IGNORE = -100
MAX_BLOCK_V = 4096
"""Vocabulary chunk per loop iteration: 4096 fp32 values over 8 warps are 16 per thread."""


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)


@triton.jit
def cross_entropy_forward_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, stride_row,
                                 V: tl.constexpr, BLOCK_V: tl.constexpr, IGNORE_INDEX: tl.constexpr):
    row = tl.program_id(0)
    logits_row = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits_row + start + cols, mask=start + cols < V, other=float("-inf"))
        x = x.to(tl.float32)
        new_max = tl.maximum(running_max, x)
        rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * rescale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    row_max = tl.max(running_max, 0)
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), 0))
    label = tl.load(labels_ptr + row)
    valid = label != IGNORE_INDEX
    target = tl.load(logits_row + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def cross_entropy_backward_kernel(logits_ptr, labels_ptr, lse_ptr, grad_loss_ptr, grad_ptr,
                                  stride_row, stride_grad, V: tl.constexpr, BLOCK_V: tl.constexpr,
                                  IGNORE_INDEX: tl.constexpr):
    row = tl.program_id(0)
    logits_row = logits_ptr + row.to(tl.int64) * stride_row
    grad_row = grad_ptr + row.to(tl.int64) * stride_grad
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    upstream = tl.where(label != IGNORE_INDEX, tl.load(grad_loss_ptr), 0.0)
    lse = tl.load(lse_ptr + row)
    for start in range(0, V, BLOCK_V):
        vocab = start + cols
        x = tl.load(logits_row + vocab, mask=vocab < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(vocab == label, 1.0, 0.0)) * upstream
        tl.store(grad_row + vocab, grad.to(grad_ptr.dtype.element_ty), mask=vocab < V)


class CrossEntropySum(torch.autograd.Function):
    """apply(logits_NV, labels_N) -> sum over rows of -log softmax(logits)[label] (fp32 scalar)."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        N, V = logits_NV.shape
        loss_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        lse_N = torch.empty_like(loss_N)
        if N:
            cross_entropy_forward_kernel[(N,)](
                logits_NV, labels_N, loss_N, lse_N, logits_NV.stride(0),
                V=V, BLOCK_V=_block_v(V), IGNORE_INDEX=IGNORE, num_warps=8)
        ctx.save_for_backward(logits_NV, labels_N, lse_N)
        return loss_N.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits_NV, labels_N, lse_N = ctx.saved_tensors
        N, V = logits_NV.shape
        grad_NV = torch.empty_like(logits_NV)
        if N:
            cross_entropy_backward_kernel[(N,)](
                logits_NV, labels_N, lse_N, grad_loss.float().reshape(1), grad_NV,
                logits_NV.stride(0), grad_NV.stride(0), V=V, BLOCK_V=_block_v(V),
                IGNORE_INDEX=IGNORE, num_warps=8)
        return grad_NV, None


def cross_entropy_sum(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of logits [N, V] (unit stride along V) against labels [N]."""
    if logits_NV.dim() != 2 or labels_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"cross_entropy_sum takes logits [N, V] and labels [N], got "
                         f"{tuple(logits_NV.shape)} and {tuple(labels_N.shape)}")
    if logits_NV.dtype not in kernels.FLOAT_DTYPES or labels_N.dtype != torch.int64:
        raise TypeError(f"logits must be a float tensor and labels int64, got {logits_NV.dtype} "
                        f"and {labels_N.dtype}")
    if logits_NV.stride(1) != 1:
        logits_NV = logits_NV.contiguous()
    return CrossEntropySum.apply(logits_NV, labels_N.contiguous())
