"""models/triton_launch.CachedLauncher: the same launch as the JIT's, with the JIT's per-call work
skipped once a variant is known. CPU: the specialization key and the interpreter's pass-through;
GPU: direct launches bitwise equal to JIT launches, new variants for new specializations, and
the JIT path whenever a launch hook is installed."""
import pytest
import torch

from models import triton_launch
from models.triton_launch import CachedLauncher, specialization_key
import triton  # noqa: E402  (after models.triton_launch: it picks the interpreter on CPU)
import triton.language as tl  # noqa: E402


@triton.jit
def axpb_kernel(x_ptr, y_ptr, n, a, B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, x * a + B, mask=mask)


def test_key_follows_what_triton_specializes_on():
    buf = torch.zeros(64, dtype=torch.bfloat16)
    aligned, shifted = buf[:8], buf[1:9]  # 2 bytes off a 16-byte boundary
    assert specialization_key([aligned]) != specialization_key([shifted])
    assert specialization_key([aligned]) == specialization_key([buf[8:16]])
    assert specialization_key([aligned]) != specialization_key([aligned.float()])
    ints = [1, 2, 16, 17, 32, 2 ** 31, 2 ** 63]
    keys = [specialization_key([v]) for v in ints]
    assert keys[0] != keys[1], "1 is folded into the kernel"
    assert keys[1] == keys[3] != keys[2] == keys[4], "only divisibility by 16 matters"
    assert len({keys[4], keys[5], keys[6]}) == 3, "int32, int64, uint64"
    assert specialization_key([True]) != specialization_key([1])
    assert specialization_key([0.5]) == specialization_key([2.0])
    assert specialization_key([object()]) is None


def _jit_reference(x, a, b):
    y = torch.empty_like(x)
    axpb_kernel[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), a, B=b, BLOCK=128)
    return y


def _cached(launcher, x, a, b):
    y = torch.empty_like(x)
    launcher[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), a, B=b, BLOCK=128)
    return y


def test_interpreter_passes_through():
    if triton_launch.ENABLED:
        pytest.skip("compiled Triton: the GPU test covers the direct launches")
    launcher = CachedLauncher(axpb_kernel)
    x = torch.randn(300)
    for _ in range(2):
        torch.testing.assert_close(_cached(launcher, x, 3.0, 1), x * 3.0 + 1)
    assert launcher.direct_launches == 0


@pytest.mark.gpu
def test_gpu_direct_launch_matches_jit():
    if not triton_launch.ENABLED:
        pytest.skip(f"Triton {triton.__version__}: the launcher follows Triton "
                    f"{'.'.join(triton_launch.CHECKED_TRITON)} only and passes through")
    launcher = CachedLauncher(axpb_kernel)
    base = torch.randn(5000, device="cuda")
    cases = [(base[:4096], 1.5, 2), (base[1:4001], -0.25, 3), (base[:1], 2.0, 2),
             (base[16:4112], 1.5, 2)]  # the last reuses the first's variant
    for x, a, b in cases:
        for _ in range(2):  # the first call of a variant compiles through the JIT
            torch.testing.assert_close(_cached(launcher, x, a, b), _jit_reference(x, a, b),
                                       rtol=0, atol=0)
    assert launcher.direct_launches == 5
    assert len(launcher._variants) == 3


@pytest.mark.gpu
def test_gpu_hook_takes_the_jit_path():
    if not triton_launch.ENABLED:
        pytest.skip("the launcher passes through on this Triton")
    launcher = CachedLauncher(axpb_kernel)
    x = torch.randn(1000, device="cuda")
    _cached(launcher, x, 1.0, 0)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        torch.testing.assert_close(_cached(launcher, x, 1.0, 0), x + 0)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert launcher.direct_launches == 0 and len(seen) == 1
    _cached(launcher, x, 1.0, 0)
    assert launcher.direct_launches == 1


@pytest.mark.gpu
def test_gpu_quantizers_launch_directly(monkeypatch):
    """The FP8 quantizer's direct launch gives bitwise the outputs of its JIT launch (which
    tests/test_fp8_quant.py checks against the reference)."""
    if not triton_launch.ENABLED:
        pytest.skip("the launcher passes through on this Triton")
    from models.fp8 import quant
    x = torch.randn(1000, 2048, device="cuda", dtype=torch.bfloat16)
    quant.quantize_dual(x)  # the variant, kept (or already known)
    monkeypatch.setattr(triton_launch, "ENABLED", False)
    through_jit = quant.quantize_dual(x)
    monkeypatch.setattr(triton_launch, "ENABLED", True)
    before = quant._launch_quant_tile.direct_launches
    direct = quant.quantize_dual(x)
    assert quant._launch_quant_tile.direct_launches == before + 1
    for a, b in zip(through_jit, direct):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b)
