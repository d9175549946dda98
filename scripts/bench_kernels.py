"""Fused RMSNorm, SwiGLU, rotary, MLA query/key assembly and MoE-combine kernels
(models/kernels.py) against the model's eager code.

    python scripts/bench_kernels.py            # the `small` model's shapes, well under a minute

Each op runs forward + backward (torch.autograd.grad of the output, the way the model uses it) at
the sizes one H100 step of the `small` model has (4 x 4096 tokens; hidden 4096, q_lora 1024,
kv_lora 512 read as a strided slice, 16 experts of width 1536 with top-4 (65536 token copies),
32 heads with 128 rope dims read as the rope slice of the queries, the shared rope key likewise,
MLA's per-head queries, keys and values assembled from the projections (and DeepSeek-V3's, 128
heads with 64 rope dims), the MoE's combine of each token's 4 expert outputs; and DeepSeek-V3's
combine, 8 of width 7168).
The baseline is the model's own eager code path in the same run (models/layers.py with the
dispatch to the kernels switched off), so the ratio is what the fused path saves per call.

Columns: forward ms (no grad), forward + backward ms as the wall clock sees back-to-back calls
(host overhead included: Python, autograd, the launches), the same step's GPU kernel time from the
profiler (what the step costs once the GPU is the bottleneck), both speedups, GB/s of the fused
kernels: the bytes each op must move forward + backward (b bytes per element, N elements):
rms_norm 5Nb (x, y; x, dy, dx), swiglu 8Nb (a, b, y; a, b, dy, da, db), rope 4Nb (x, y; dy, dx),
mla 6(N+R) + 2N + 2V elements per token and head (q read and written, k written; dq read and
written, dk read; kv's no-position part read, dkv's written; dv read, written into dkv),
moe combine 3Nb + 2Mb for N = T K D expert-output elements and M = T D (y, out; dout, y, dy),
over the kernel time, set against a device-to-device copy (what HBM gives a pure stream); then
the MB autograd keeps for backward after one forward (distinct storages, inputs included).
Wall times: scripts/timing.py (median over batches of back-to-back calls between CUDA events);
kernel times: torch.profiler's CUDA kernel durations, summed per call.
"""
from __future__ import annotations

import os
import sys
import time

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
BUDGET_S = 50
"""Seconds after which the tuning sweep starts no new row (the bench should fit a minute)."""


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
        if kernels.fused(gate, "swiglu"):
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


def mla_qk_case(B: int, S: int, H: int, N: int, R: int, V: int):
    """MLA.forward's query/key/value assembly from wq_b's queries [B, S, H, N+R], wkv_b's
    keys/values [B, S, H, N+V] and wkv_a's rope key (the slice after the 512-wide latent)."""
    from types import SimpleNamespace

    from models.attention import MLA
    q = _randn(B, S, H, N + R).requires_grad_()
    kv = _randn(B, S, H, N + V).requires_grad_()
    k_pe = _randn(B, S, 512 + R)[..., 512:].requires_grad_()
    angles = torch.rand(S, R // 2, device=DEVICE) * 100
    cos, sin = angles.cos(), angles.sin()
    dims = SimpleNamespace(nope_dim=N, rope_dim=R, v_dim=V, n_heads=H)

    def op(q_BSHK, kv_BSHX, k_pe_BSR):  # MLA.forward's dispatch
        if kernels.fused(q_BSHK, "mla_qk"):
            return kernels.mla_qk(q_BSHK, kv_BSHX, k_pe_BSR, cos, sin, N)
        return MLA._eager_qkv(dims, q_BSHK, kv_BSHX, k_pe_BSR, cos, sin)
    per_head = 6 * (N + R) + 2 * N + 2 * V  # the module docstring's count
    return op, (q, kv, k_pe), B * S * H * per_head * 2


def combine_case(T: int, K: int, D: int, experts: int):
    """The experts' outputs y [T K, D] in slot order of a random routing and fp32 gates [T, K]:
    models.moe.combine, as MoE runs it after the routed experts."""
    from models.moe import combine, sort_by_expert
    expert_TK = torch.rand(T, experts, device=DEVICE).topk(K, dim=1).indices
    slot_to_pick, pick_to_slot = sort_by_expert(expert_TK)
    y = _randn(T * K, D).requires_grad_()
    gate = torch.rand(T, K, device=DEVICE).requires_grad_()
    op = (lambda y_slots, gate_TK: combine(y_slots, gate_TK, slot_to_pick, pick_to_slot))
    return op, (y, gate), (3 * T * K * D + 2 * T * D) * 2


def _fwd_bwd(op, inputs):
    out = op(*inputs)
    dys = [torch.randn_like(t) for t in (out if isinstance(out, tuple) else (out,))]
    return lambda: torch.autograd.grad(op(*inputs), inputs, dys)


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


def kernel_ms(fn, reps: int = 10) -> float:
    """GPU time of the kernels one call of fn runs, summed from the profiler: host overhead and
    idle gaps between launches left out (what a step pays once the GPU, not Python, is the
    bottleneck, as it is with the GEMMs of a 16384-token batch around these ops)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    return device_us / reps / 1e3


def measure(op, inputs) -> dict:
    """Forward ms (no grad), forward + backward ms (wall and GPU kernels), MB saved for backward."""
    with torch.no_grad():
        fwd = time_ms(lambda: op(*inputs))
    step = _fwd_bwd(op, inputs)
    return dict(fwd=fwd, both=time_ms(step), kernels=kernel_ms(step), saved=saved_mb(op, inputs))


def bench(name: str, case, copy_gbs: float) -> None:
    op, inputs, nbytes = case
    ours = measure(op, inputs)
    with kernels.eager():
        eager = measure(op, inputs)
    gbs = nbytes / ours["kernels"] / 1e6
    cells = "".join(f"{ours[k]:>9.3f}{eager[k]:>8.3f}" for k in ("fwd", "both", "kernels"))
    print(f"{name:<34}{cells}{eager['both'] / ours['both']:>8.2f}x"
          f"{eager['kernels'] / ours['kernels']:>8.2f}x{gbs:>7.0f}{gbs / copy_gbs:>6.0%}"
          f"{ours['saved']:>7.0f}{eager['saved']:>7.0f}")
    record(BENCH, f"{name} fwd+bwd", ours["both"], "ms", "eager torch", eager["both"],
           higher_is_better=False)
    record(BENCH, f"{name} fwd+bwd GPU kernels", ours["kernels"], "ms", "eager torch",
           eager["kernels"], higher_is_better=False)
    if ours["saved"] != eager["saved"]:
        record(BENCH, f"{name} saved for bwd", ours["saved"], "MB", "eager torch",
               eager["saved"], higher_is_better=False)


def copy_bandwidth(n: int = 1 << 26) -> float:
    """GB/s of a device-to-device copy of n bf16 elements (bytes read + written)."""
    src = torch.empty(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    return 2 * n * src.element_size() / time_ms(lambda: dst.copy_(src)) / 1e6


def norm_launches(rows: int, D: int) -> dict:
    """The RMSNorm forward and backward launches alone (no autograd), bf16."""
    x, dy, w = _randn(rows, D), _randn(rows, D), torch.ones(D, device=DEVICE, dtype=DTYPE)
    rstd = kernels.rms_norm_forward(x, w, 1e-6)[1]
    return dict(fwd=lambda: kernels.rms_norm_forward(x, w, 1e-6),
                bwd=lambda: kernels.rms_norm_backward(x, w, rstd, dy))


def mla_launches(B: int, S: int, H: int, R: int) -> dict:
    """mla_qk's forward launches (queries, keys) and the keys' backward, no autograd."""
    q, kv, dk = _randn(B, S, H, 128 + R), _randn(B, S, H, 256), _randn(B, S, H, 128 + R)
    k_pe, dv = _randn(B, S, R), _randn(B, S, H, 128)
    angles = torch.rand(S, R // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    keys = k_pe[:, :, None].expand(-1, -1, H, -1)
    return dict(q=lambda: kernels.rope_concat(q[..., :128], q[..., 128:], cos, sin),
                k=lambda: kernels.rope_concat(kv[..., :128], keys, cos, sin),
                bwd=lambda: kernels.mla_keys_backward(dk, dv, cos, sin, 128, DTYPE))


def rope_launches(shape, full_last: int) -> dict:
    """One rotation of the rope slice (forward and backward are the same kernel)."""
    x = _randn(*shape[:-1], full_last)[..., full_last - shape[-1]:]
    angles = torch.rand(shape[1], shape[-1] // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    return dict(fwd=lambda: kernels.rope_rotate(x, cos, sin))


TUNING = [  # (case, launches, knob of models.kernels, values): printed only
    ("rms_norm 16384x4096", lambda: norm_launches(16384, 4096), "WARP_ELEMS",
     (256, 512, 1024, 2048)),
    ("rms_norm 16384x4096", lambda: norm_launches(16384, 4096), "NORM_BWD_PROGRAMS",
     (264, 528, 1056, 2112)),
    ("rms_norm 16384x1536", lambda: norm_launches(16384, 1536), "WARP_ELEMS",
     (256, 512, 1024, 2048)),
    ("rms_norm 16384x512", lambda: norm_launches(16384, 512), "WARP_ELEMS", (256, 512, 1024)),
    ("rms_norm 16384x512", lambda: norm_launches(16384, 512), "TILE_ELEMS", (2048, 4096, 8192)),
    ("rope q 4x4096x32x128", lambda: rope_launches((4, 4096, 32, 128), 256), "ROPE_TILE_ELEMS",
     (1024, 2048, 4096, 8192)),
    ("rope q 4x4096x32x128", lambda: rope_launches((4, 4096, 32, 128), 256), "WARP_ELEMS",
     (256, 512, 1024)),
    ("mla 4x4096x32", lambda: mla_launches(4, 4096, 32, 128), "ROPE_TILE_ELEMS",
     (2048, 4096, 8192)),
    ("mla 4x4096x32", lambda: mla_launches(4, 4096, 32, 128), "WARP_ELEMS", (256, 512, 1024)),
]


def tuning(deadline: float) -> None:
    """GPU kernel ms of each launch as one launch parameter moves (for choosing the defaults);
    no new row starts after `deadline` (time.monotonic())."""
    print("\n== tuning: GPU kernel ms per launch, per value of a parameter (* = default)")
    for name, make, knob, values in TUNING:
        if time.monotonic() > deadline:
            print(f"{name:<22}{knob:<18}skipped (time budget of the benchmark spent)")
            continue
        launches = make()
        default = getattr(kernels, knob)
        cells = []
        for value in values:
            setattr(kernels, knob, value)
            try:
                times = " ".join(f"{k} {kernel_ms(fn):.3f}" for k, fn in launches.items())
            finally:
                setattr(kernels, knob, default)
            cells.append(f"{value}{'*' if value == default else ''}: {times}")
        print(f"{name:<22}{knob:<18}" + " | ".join(cells))
        del launches
        torch.cuda.empty_cache()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    probe = torch.empty(1, device=DEVICE)
    assert all(kernels.fused(probe, k) for k in kernels.KERNELS), "kernels not dispatched on CUDA"
    deadline = time.monotonic() + BUDGET_S
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
        ("mla q,k,v 4x4096x32 (rope 128)", lambda: mla_qk_case(4, 4096, 32, 128, 128, 128)),
        ("mla q,k,v 1x4096x128 (DSv3)", lambda: mla_qk_case(1, 4096, 128, 128, 64, 128)),
        ("moe combine 16384x4x4096", lambda: combine_case(T, 4, 4096, 16)),
        ("moe combine 8192x8x7168 (DSv3)", lambda: combine_case(T // 2, 8, 7168, 256)),
    ]
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, bf16; ms per call (fused, then eager); GB/s of the "
          f"fused fwd+bwd kernels against a D2D copy's {copy_gbs:.0f} GB/s")
    print(f"{'op':<34}{'fwd':>9}{'eager':>8}{'fwd+bwd':>9}{'eager':>8}{'kernels':>9}{'eager':>8}"
          f"{'wall':>9}{'kernel':>8}{'GB/s':>7}{'copy':>6}{'saved':>7}{'eager':>7}")
    for name, make in cases:
        bench(name, make(), copy_gbs)
        torch.cuda.empty_cache()
    tuning(deadline)


if __name__ == "__main__":
    main()
