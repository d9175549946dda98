"""Fused RMSNorm, SwiGLU and rotary kernels (models/kernels.py) against the model's eager code.

    python scripts/bench_kernels.py            # the `small` model's shapes, well under a minute

Each op runs forward + backward (torch.autograd.grad of the output, the way the model uses it) at
the sizes one H100 step of the `small` model has (4 x 4096 tokens; hidden 4096, q_lora 1024,
kv_lora 512 read as a strided slice, 16 experts of width 1536 with top-4 (65536 token copies),
32 heads with 128 rope dims read as the rope slice of the queries, the shared rope key likewise).
The baseline is the model's own eager code path in the same run (models/layers.py with the
dispatch to the kernels switched off), so the ratio is what the fused path saves per call.

GB/s counts the bytes each fused op must move forward + backward (b bytes per element, N elements):
rms_norm 5Nb (x, y; x, dy, dx), swiglu 8Nb (a, b, y; a, b, dy, da, db), rope 4Nb (x, y; dy, dx),
set against a device-to-device copy (what HBM gives a pure stream). "saved MB" is what autograd
keeps for backward after one forward (distinct storages, inputs included), fused against eager.
Timing: scripts/timing.py (median over batches of back-to-back calls between CUDA events).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summary import record  # noqa: E402
from timing import time_ms  # noqa: E402

from models import kernels  # noqa: E402
from models.layers import RMSNorm, apply_rope  # noqa: E402

BENCH = "kernels"
DEVICE = "cuda"
DTYPE = torch.bfloat16


@contextlib.contextmanager
def eager_path():
    """The model's eager torch code: the dispatch to the kernels switched off."""
    fused = kernels.fused
    kernels.fused = lambda x: False
    try:
        yield
    finally:
        kernels.fused = fused


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


def norm_case(rows: int, D: int, row_stride: int):
    """x [rows, D] (a column slice when row_stride > D, like MLA's latent), the norm's weight."""
    norm = RMSNorm(D).to(DEVICE, DTYPE)
    x = _randn(rows, row_stride)[:, :D].requires_grad_()
    return (lambda t: norm(t)), (x,), 5 * rows * D * 2


def swiglu_case(rows: int, F: int):
    a, b = _randn(rows, F).requires_grad_(), _randn(rows, F).requires_grad_()

    def op(gate, up):  # MLP.forward between its projections
        if kernels.fused(gate):
            return kernels.swiglu(gate, up)
        return torch.nn.functional.silu(gate) * up
    return op, (a, b), 8 * rows * F * 2


def rope_case(shape, full_last: int):
    """x the rope slice [..., -R:] of a wider tensor, cos/sin tables of the sequence."""
    S, R = shape[1], shape[-1]
    x = _randn(*shape[:-1], full_last)[..., full_last - R:].requires_grad_()
    angles = torch.rand(S, R // 2, device=DEVICE) * 100
    cos, sin = angles.cos(), angles.sin()
    return (lambda t: apply_rope(t, cos, sin)), (x,), 4 * x.numel() * 2


def _fwd_bwd(op, inputs):
    dy = torch.randn_like(op(*inputs))
    return lambda: torch.autograd.grad(op(*inputs), inputs, dy)


def saved_mb(op, inputs) -> float:
    """MB of the distinct storages autograd saves for backward in one forward (inputs included:
    the ones saved stay alive until backward, whatever else holds them)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(*inputs)
    return sum(storages.values()) / 2 ** 20


def bench(name: str, case, copy_gbs: float) -> None:
    op, inputs, nbytes = case
    saved_fused = saved_mb(op, inputs)
    with torch.no_grad():
        fwd_fused = time_ms(lambda: op(*inputs))
    bwd_fused = time_ms(_fwd_bwd(op, inputs))
    with eager_path():
        with torch.no_grad():
            fwd_eager = time_ms(lambda: op(*inputs))
        bwd_eager = time_ms(_fwd_bwd(op, inputs))
        saved_eager = saved_mb(op, inputs)
    gbs = nbytes / bwd_fused / 1e6
    print(f"{name:<34}{fwd_fused:>8.3f}{fwd_eager:>8.3f}{bwd_fused:>9.3f}{bwd_eager:>9.3f}"
          f"{bwd_eager / bwd_fused:>8.2f}x{gbs:>8.0f}{gbs / copy_gbs:>8.0%}"
          f"{saved_fused:>8.0f}{saved_eager:>8.0f}")
    record(BENCH, f"{name} fwd+bwd", bwd_fused, "ms", "eager torch", bwd_eager,
           higher_is_better=False)
    record(BENCH, f"{name} saved for bwd", saved_fused, "MB", "eager torch", saved_eager,
           higher_is_better=False)


def copy_bandwidth(n: int = 1 << 26) -> float:
    """GB/s of a device-to-device copy of n bf16 elements (bytes read + written)."""
    src = torch.empty(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    return 2 * n * src.element_size() / time_ms(lambda: dst.copy_(src)) / 1e6


TUNING = [  # (case, knob of models.kernels, values): printed only, the defaults are marked
    ("rms_norm 16384x4096", lambda: norm_case(16384, 4096, 4096), "NORM_BWD_PROGRAMS",
     (256, 512, 1024)),
    ("rms_norm 16384x4096", lambda: norm_case(16384, 4096, 4096), "WARP_ELEMS", (256, 512, 1024)),
    ("rms_norm 16384x512", lambda: norm_case(16384, 512, 512), "TILE_ELEMS", (2048, 4096, 8192)),
    ("swiglu 65536x1536", lambda: swiglu_case(65536, 1536), "ELEM_BLOCK", (1024, 2048, 4096)),
    ("swiglu 65536x1536", lambda: swiglu_case(65536, 1536), "ELEM_WARPS", (4, 8, 16)),
    ("rope q 4x4096x32x128", lambda: rope_case((4, 4096, 32, 128), 256), "TILE_ELEMS",
     (2048, 4096, 8192)),
]


def tuning() -> None:
    """Fused forward + backward ms as one launch parameter moves (for choosing the defaults)."""
    print("\n== tuning: fused fwd+bwd ms per value of a launch parameter (* = default)")
    for name, make, knob, values in TUNING:
        op, inputs, _ = make()
        default = getattr(kernels, knob)
        cells = []
        for value in values:
            setattr(kernels, knob, value)
            try:
                cells.append(f"{value}{'*' if value == default else ''}: "
                             f"{time_ms(_fwd_bwd(op, inputs)):.3f}")
            finally:
                setattr(kernels, knob, default)
        print(f"{name:<24}{knob:<19}" + "   ".join(cells))
        del op, inputs
        torch.cuda.empty_cache()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    assert kernels.fused(torch.empty(1, device=DEVICE)), "the kernels are not dispatched on CUDA"
    torch.manual_seed(0)
    T = 4 * 4096
    cases = [
        ("rms_norm 16384x4096 (hidden)", lambda: norm_case(T, 4096, 4096)),
        ("rms_norm 16384x1536", lambda: norm_case(T, 1536, 1536)),
        ("rms_norm 16384x1024 (q_lora)", lambda: norm_case(T, 1024, 1024)),
        ("rms_norm 16384x512 (kv_lora slice)", lambda: norm_case(T, 512, 512 + 128)),
        ("swiglu 65536x1536 (routed)", lambda: swiglu_case(4 * T, 1536)),
        ("swiglu 16384x1536 (shared)", lambda: swiglu_case(T, 1536)),
        ("rope q 4x4096x32x128 (slice)", lambda: rope_case((4, 4096, 32, 128), 256)),
        ("rope k 4x4096x128 (slice)", lambda: rope_case((4, 4096, 128), 512 + 128)),
    ]
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, bf16; ms per call; fwd+bwd GB/s of the fused op, "
          f"against a D2D copy's {copy_gbs:.0f} GB/s")
    print(f"{'op':<34}{'fwd':>8}{'eager':>8}{'fwd+bwd':>9}{'eager':>9}{'speedup':>9}{'GB/s':>8}"
          f"{'of copy':>8}{'saved MB':>8}{'eager':>8}")
    for name, make in cases:
        bench(name, make(), copy_gbs)
        torch.cuda.empty_cache()
    tuning()


if __name__ == "__main__":
    main()
