"""The fused cross-entropy kernels (models/cross_entropy.py) against torch's fp32 cross-entropy.

On CPU the kernels run under the Triton interpreter (models.kernels switches it on without CUDA);
the `gpu` test repeats the comparison at the `small` model's size on the compiled kernels.
"""
import pytest
import torch
import torch.nn.functional as F

from models.cross_entropy import IGNORE, cross_entropy_sum


def _reference(logits, labels):
    """Summed loss and gradient of torch's cross-entropy on an fp32 copy of the logits."""
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _check(N, V, dtype, scale, device="cpu", ignored=(1,), seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen, device=device) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    labels[list(ignored)] = IGNORE
    loss = cross_entropy_sum(logits, labels)
    (grad,) = torch.autograd.grad(loss * 0.5, logits)
    ref_loss, ref_grad = _reference(logits, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    # fp32 softmax values that differ in the last bits (another exp and summation order), then one
    # rounding to the logits' dtype: at most one ulp of it apart (2^-7 relative in bf16)
    rtol = {torch.float32: 1e-4, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(grad.float(), 0.5 * ref_grad, rtol=rtol, atol=1e-6)
    assert torch.all(grad[list(ignored)] == 0)


@pytest.mark.parametrize("N,V,dtype,scale", [
    (6, 300, torch.float32, 3.0),        # vocabulary below one chunk, not a power of two
    (5, 5000, torch.bfloat16, 3.0),      # two chunks, the second ragged
    (4, 4096, torch.float32, 30.0),      # exactly one chunk; peaked softmax
    (3, 1000, torch.float32, 1e4),       # huge logits: the online max keeps exp finite
])
def test_fused_cross_entropy_matches_torch(N, V, dtype, scale):
    _check(N, V, dtype, scale)


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(3, 200).requires_grad_()
    labels = torch.full((3,), IGNORE)
    loss = cross_entropy_sum(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match=r"logits \[N, V\] and labels \[N\]"):
        cross_entropy_sum(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels int64"):
        cross_entropy_sum(torch.randn(2, 4), torch.zeros(2, dtype=torch.int32))


@pytest.mark.gpu
def test_gpu_fused_cross_entropy_small_model_size():
    """8192 tokens x the `small` model's 32768-token vocabulary, bf16 logits as the head makes them."""
    _check(8192, 32768, torch.bfloat16, 4.0, device="cuda", ignored=(0, 4000, 8191), seed=3)
