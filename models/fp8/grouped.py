"""Grouped block-scaled FP8 GEMMs for the routed experts (Triton), one kernel above each wrapper.

The routed experts multiply T token rows, sorted by expert (`counts_E` rows per expert), by that
expert's weight. Three GEMMs per projection, DeepSeek-V3's FP8 recipe (research/fp8.md 1.9):

    grouped_gemm    y[t] = a[t] . b[e(t)]^T     grouped along M (tokens)   Fprop and Dgrad
                    a [T, K] 1x128 scales, b [E, N, K] 128x128 scales, out [T, N] bf16/fp32
    grouped_wgrad   out[e] = a_e^T . b_e        grouped along K (tokens)   Wgrad
                    a [T, N], b [T, K], both 128x1 scales (per 128 tokens), out [E, N, K] fp32

Every K step is 128 wide, exactly one scale group, so each step's FP32 partial product is scaled
and added to an FP32 accumulator right away: DeepSeek's promotion every 128 elements of K
(`acc += dot(a, b) * sa * sb`, the tensor core never accumulates across scale groups).

Layout: the contiguous layout, padded in tile space rather than in memory. Each expert's rows
start a fresh BLOCK_M tile (so a tile multiplies by exactly one expert's weight, DeepGEMM's
contiguous layout), but the rows themselves stay packed: the last tile of an expert computes a
few rows past the expert's end (the next expert's rows through TMA, its own last row again with
pointer loads) and does not store them. So no padded copy of the
activations is ever made, any quantizer's plain [T, K] output feeds the kernel, and the tile
count is bounded by ceil(T / BLOCK_M) + E, known on the host. Each program finds its expert from
`counts_E` itself (a prefix sum over E values), so the router's counts stay on the GPU: no
device-to-host sync per layer, no host-side tile table.

Wgrad walks each expert's token range in 128-token steps aligned to the 128x1 scale groups of
the whole sorted tensor; a group that straddles two experts is read by both, each masking the
other's tokens out of its operand. Its scale is shared by both experts' tokens, which is exact
(the scale is part of the quantized operand), just as a 128x1 tile of sorted tokens mixes tokens
anyway. Operands are K-major (the reduction dimension has unit stride), what Hopper's FP8 tensor
cores read: Dgrad takes the transposed weight copy, Wgrad takes token-major operands (views
[T, N] of [N, T] storage, see `token_major`).

Kernel variants (TileConfig; scripts/bench_fp8_grouped.py sweeps them on the GPU and prints the
best per shape): BLOCK_M x BLOCK_N tiles with num_warps/num_stages; `tma` loads the FP8 operand
tiles through TMA descriptors instead of pointer loads (scales stay pointer loads: a few hundred
bytes per step); `persistent` runs one program per SM over exactly the real tiles (Fprop/Dgrad);
`k_groups=2` issues two 128-wide K groups per iteration as two independent MMAs, so one group's
promotion can overlap the other's MMA (Triton cannot warp-specialize that on Hopper the way
DeepGEMM does). A 256-wide tile is two 128-wide accumulators, each inside one weight block.
Defaults are the H100 sweep's winners (run 1, 16 tile configs at DeepSeek-V3 expert shapes):
Fprop/Dgrad 128x128 tiles, 8 warps, 4 stages, TMA (within 3% of two K groups per iteration, the
runner-up); Wgrad 64x128 tiles, 4 warps, 4 stages, TMA (10-20% ahead of 128x128). Both compile
for sm90 without register spills (tests/test_fp8_grouped.py).

Backends: on an sm90 GPU both wrappers run, by default, the hand-written CUDA kernels of
csrc/fp8_grouped (models/fp8/grouped_cuda.py: TMA producer warpgroup, two WGMMA consumer
warpgroups, persistent) where the operands fit them; `backend="triton"` or a TileConfig selects
the Triton kernels below, which are also the CPU path (interpreter) and the fallback.

Shape legend: T tokens (rows), E experts, N output columns, K reduction, BLOCK_* tile sizes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from models.triton_env import INTERPRET  # before triton: the interpreter on CPU-only machines
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor

from models.fp8 import grouped_cuda

E4M3 = torch.float8_e4m3fn
SCALE_BLOCK = 128
"""K step of every kernel: one 1x128 / 128x1 / 128x128 scale group, i.e. the promotion interval."""


@dataclass(frozen=True)
class TileConfig:
    """Launch configuration of a grouped kernel (BLOCK_K is always SCALE_BLOCK)."""

    block_m: int = 128
    block_n: int = 128
    """Fprop/Dgrad: 64, 128 or 256 (two 128-column accumulators); Wgrad: any power of two."""
    group_m: int = 8
    """Rows of tiles walked together so neighbouring programs share operand tiles in L2."""
    num_warps: int = 8
    num_stages: int = 4
    tma: bool = False
    """Load the FP8 operand tiles with TMA (tensor descriptors) instead of pointer loads."""
    persistent: bool = False
    """One program per SM walking the tiles (grouped_gemm only), instead of one per tile."""
    k_groups: int = 1
    """128-wide K groups per loop iteration (1 or 2): two independent MMAs let one group's
    promotion overlap the other's MMA. Falls back to 1 where the group count is odd."""


DEFAULT_GEMM_CONFIG = TileConfig(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=4,
                                 tma=True)
DEFAULT_WGRAD_CONFIG = TileConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=4,
                                  tma=True)


def m_tiles_bound(rows: int, n_experts: int, block_m: int) -> int:
    """Most M tiles `rows` rows can need when each of `n_experts` experts starts a fresh tile."""
    return (rows + n_experts * (block_m - 1)) // block_m


def token_major(q_TN: torch.Tensor) -> torch.Tensor:
    """The same logical [T, N] tensor stored token-contiguous, the Wgrad operand layout: a view of
    [N, Tp] memory with the tokens zero-padded to Tp = ceil(T/128)*128 (what quantize_dual's
    transposed copy already is), so whole 128-token groups can always be read."""
    T, N = q_TN.shape
    storage = torch.zeros(N, triton.cdiv(T, SCALE_BLOCK) * SCALE_BLOCK, dtype=q_TN.dtype,
                          device=q_TN.device)
    storage[:, :T] = q_TN.t()
    return storage[:, :T].t()


# ---------------------------------------------------------------------------------------------
# Validation shared by the wrappers


def _check_runnable(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all operands must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the grouped FP8 GEMMs are Triton kernels: pass CUDA tensors, or set "
                           "TRITON_INTERPRET=1 before importing triton to run them on CPU (tests)")


def _check_fp8(q: torch.Tensor, name: str, dims: int) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != E4M3:
        raise TypeError(f"{name} must be a float8_e4m3fn tensor (quantize it with models.fp8), "
                        f"got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(q.shape)}")


def _check_scales(s: torch.Tensor, name: str, shape: tuple) -> None:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor of dequantization scales, "
                        f"got {getattr(s, 'dtype', type(s).__name__)}")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(s.shape)}")


def _check_counts(counts_E: torch.Tensor, n_experts: int, rows: int) -> None:
    """counts_E: E non-negative integers summing to the rows; checked without a host sync on GPU.

    The values are checked once per counts tensor, version and row count (the tensor remembers
    it): an experts layer passes one counts tensor to its seven grouped GEMMs, forward and
    backward, and each GPU check is several small launches."""
    if not isinstance(counts_E, torch.Tensor) or counts_E.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"counts_E must be an int32/int64 tensor, got "
                        f"{getattr(counts_E, 'dtype', type(counts_E).__name__)}")
    if counts_E.shape != (n_experts,):
        raise ValueError(f"counts_E must have shape ({n_experts},) (one count per expert), "
                         f"got {tuple(counts_E.shape)}")
    checked = (counts_E._version, rows)
    if getattr(counts_E, "_fp8_checked", None) == checked:
        return
    if counts_E.device.type == "cpu":
        if bool((counts_E < 0).any()) or int(counts_E.sum()) != rows:
            raise ValueError(f"counts_E must be non-negative and sum to the {rows} rows of the "
                             f"input, got {counts_E.tolist()} (sum {int(counts_E.sum())})")
    else:
        torch._assert_async((counts_E.sum() == rows) & (counts_E.min() >= 0),
                            "counts_E must be non-negative and sum to the input's rows")
    counts_E._fp8_checked = checked


def _check_token_major(q: torch.Tensor, name: str, padded_rows: int) -> None:
    """Unit stride along T and memory for whole 128-token groups (T padded to `padded_rows`)."""
    rows, cols = q.shape
    needed = q.storage_offset() + (cols - 1) * q.stride(1) + padded_rows
    if (rows > 1 and q.stride(0) != 1) or (cols > 1 and q.stride(1) < padded_rows) \
            or (rows and q.untyped_storage().nbytes() < needed):
        raise ValueError(f"{name} must be token-major with its tokens padded to a multiple of "
                         f"128 (unit stride along T, row stride >= {padded_rows}); use "
                         "quantize_dual's transposed copy or models.fp8.grouped.token_major()")


def _e_pow2(n_experts: int) -> int:
    """Vector width of the per-program expert scan; >= 64 so most E share one compiled kernel."""
    return max(triton.next_power_of_2(n_experts), 64)


# ---------------------------------------------------------------------------------------------
# Grouped along M: Fprop and Dgrad


@triton.jit
def _tile_rows(counts_ptr, n_experts, tile, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Expert owning M tile `tile` and the row range [row0, row_end) it covers (expert E: none)."""
    e_idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e_idx, mask=e_idx < n_experts, other=0).to(tl.int32)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    row_end_E = tl.cumsum(counts, 0)
    expert = tl.sum((tile_end <= tile).to(tl.int32), 0)
    mine = e_idx == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row_end = tl.sum(tl.where(mine, row_end_E, 0), 0)
    row0 = row_end - tl.sum(tl.where(mine, counts, 0), 0) + (tile - first_tile) * BLOCK_M
    return expert, row0, row_end


@triton.jit
def _swizzle(pid, m_tiles, n_tiles, GROUP_M: tl.constexpr):
    """Program id -> (tile_m, tile_n), GROUP_M rows of tiles at a time (L2 reuse of both operands)."""
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def _load_a(a_ptr, a_ptrs, as_ptrs, row0, kb, stride_ask, BLOCK_K: tl.constexpr,
            USE_TMA: tl.constexpr):
    """Rows of K group `kb` and their 1x128 scales."""
    if USE_TMA:  # a_ptr is a descriptor of a [T, K]
        a = a_ptr.load([row0, kb * BLOCK_K])
    else:
        a = tl.load(a_ptrs + kb * BLOCK_K)
    return a, tl.load(as_ptrs + kb * stride_ask)


@triton.jit
def _load_b(b_ptr, b_ptrs, bs_ptr, b_row0, kb, stride_bsk, BLOCK_K: tl.constexpr,
            USE_TMA: tl.constexpr):
    """One <=128-column slice of b^T for K group `kb` and its (single) 128x128 block scale."""
    if USE_TMA:  # b_ptr is a descriptor of b [E*N, K]
        b = b_ptr.load([b_row0, kb * BLOCK_K]).T
    else:
        b = tl.load(b_ptrs + kb * BLOCK_K)
    return b, tl.load(bs_ptr + kb * stride_bsk)


@triton.jit
def _b_slice(b_ptr, bs_ptr, expert, col0, N, stride_be, stride_bn, stride_bse, stride_bsn,
             SUB_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """Pointers of the output columns [col0, col0 + SUB_N) of `expert`'s b (one weight block)."""
    rn = tl.minimum(col0 + tl.arange(0, SUB_N), N - 1).to(tl.int64)
    if USE_TMA:
        b_ptrs = b_ptr
    else:
        b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be + rn[None, :] * stride_bn
                  + tl.arange(0, BLOCK_K)[:, None])
    block = tl.minimum(col0, N - 1) // 128
    return b_ptrs, bs_ptr + expert * stride_bse + block * stride_bsn, expert * N + col0


@triton.jit
def _gemm_tile(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, expert, row0, row_end, tile_n, N, K,
               stride_am, stride_asm, stride_ask, stride_be, stride_bn,
               stride_bse, stride_bsn, stride_bsk, stride_cm,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               USE_TMA: tl.constexpr, K_GROUPS: tl.constexpr):
    """One BLOCK_M x BLOCK_N output tile of `expert`: rows [row0, row_end) are stored.

    The tile is one or two column slices of at most 128 (a 256-wide tile is two accumulators,
    each inside one weight block, so every promotion is a per-row scale; one 128x256 tile
    would otherwise need a second register tile for its scales). K_GROUPS = 2 issues two
    128-wide K groups per iteration: independent MMAs, so a promotion can overlap an MMA."""
    SUB_N: tl.constexpr = 128 if BLOCK_N > 128 else BLOCK_N
    rm = row0 + tl.arange(0, BLOCK_M)
    rm_load = tl.minimum(rm, row_end - 1).to(tl.int64)
    if USE_TMA:
        a_ptrs = a_ptr
    else:
        a_ptrs = a_ptr + rm_load[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :]
    as_ptrs = as_ptr + rm_load * stride_asm
    col0 = tile_n * BLOCK_N
    bstr = (stride_be, stride_bn, stride_bse, stride_bsn)
    b0_ptrs, bs0_ptr, b0_row = _b_slice(b_ptr, bs_ptr, expert, col0, N, *bstr, SUB_N, BLOCK_K,
                                        USE_TMA)
    acc0 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    if BLOCK_N > 128:
        b1_ptrs, bs1_ptr, b1_row = _b_slice(b_ptr, bs_ptr, expert, col0 + 128, N, *bstr, SUB_N,
                                            BLOCK_K, USE_TMA)
        acc1 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)

    for kb in range(0, K // BLOCK_K, K_GROUPS):
        a, sa = _load_a(a_ptr, a_ptrs, as_ptrs, row0, kb, stride_ask, BLOCK_K, USE_TMA)
        b, sb = _load_b(b_ptr, b0_ptrs, bs0_ptr, b0_row, kb, stride_bsk, BLOCK_K, USE_TMA)
        if K_GROUPS == 2:
            a2, sa2 = _load_a(a_ptr, a_ptrs, as_ptrs, row0, kb + 1, stride_ask, BLOCK_K, USE_TMA)
            b2, sb2 = _load_b(b_ptr, b0_ptrs, bs0_ptr, b0_row, kb + 1, stride_bsk, BLOCK_K,
                              USE_TMA)
            acc0 += tl.dot(a, b) * (sa * sb)[:, None] + tl.dot(a2, b2) * (sa2 * sb2)[:, None]
        else:
            acc0 += tl.dot(a, b) * (sa * sb)[:, None]
        if BLOCK_N > 128:
            b, sb = _load_b(b_ptr, b1_ptrs, bs1_ptr, b1_row, kb, stride_bsk, BLOCK_K, USE_TMA)
            if K_GROUPS == 2:
                b2, sb2 = _load_b(b_ptr, b1_ptrs, bs1_ptr, b1_row, kb + 1, stride_bsk, BLOCK_K,
                                  USE_TMA)
                acc1 += tl.dot(a, b) * (sa * sb)[:, None] + tl.dot(a2, b2) * (sa2 * sb2)[:, None]
            else:
                acc1 += tl.dot(a, b) * (sa * sb)[:, None]

    _store_tile(acc0, c_ptr, rm, row_end, col0, N, stride_cm, SUB_N)
    if BLOCK_N > 128:
        _store_tile(acc1, c_ptr, rm, row_end, col0 + 128, N, stride_cm, SUB_N)


@triton.jit
def _store_tile(acc, c_ptr, rm, row_end, col0, N, stride_cm, SUB_N: tl.constexpr):
    rn = col0 + tl.arange(0, SUB_N)
    mask = (rm < row_end)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _m_tiles(counts_ptr, n_experts, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """M tiles the experts need, each starting a fresh tile."""
    e_idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e_idx, mask=e_idx < n_experts, other=0).to(tl.int32)
    return tl.sum((counts + BLOCK_M - 1) // BLOCK_M, 0)


@triton.jit
def grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, counts_ptr,
                        rows, N, K, n_experts, m_tiles_bound,
                        stride_am, stride_asm, stride_ask,
                        stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk, stride_cm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, E_POW2: tl.constexpr, USE_TMA: tl.constexpr,
                        K_GROUPS: tl.constexpr, NUM_SMS: tl.constexpr):
    n_tiles = tl.cdiv(N, BLOCK_N)
    strides = (stride_am, stride_asm, stride_ask, stride_be, stride_bn,
               stride_bse, stride_bsn, stride_bsk, stride_cm)
    if NUM_SMS == 0:  # one tile per program over the host's bound; tiles past the real count exit
        tile_m, tile_n = _swizzle(tl.program_id(0), m_tiles_bound, n_tiles, GROUP_M)
        expert, row0, row_end = _tile_rows(counts_ptr, n_experts, tile_m, BLOCK_M, E_POW2)
        if expert >= n_experts:
            return
        _gemm_tile(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, expert, row0,
                   tl.minimum(row_end, rows), tile_n, N, K, *strides,
                   BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, K_GROUPS)
    else:  # persistent: NUM_SMS programs walk exactly the real tiles (count read on the GPU)
        m_tiles = _m_tiles(counts_ptr, n_experts, BLOCK_M, E_POW2)
        for tile in tl.range(tl.program_id(0), m_tiles * n_tiles, NUM_SMS, flatten=True):
            tile_m, tile_n = _swizzle(tile, m_tiles, n_tiles, GROUP_M)
            expert, row0, row_end = _tile_rows(counts_ptr, n_experts, tile_m, BLOCK_M, E_POW2)
            _gemm_tile(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, expert, row0,
                       tl.minimum(row_end, rows), tile_n, N, K, *strides,
                       BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, K_GROUPS)


BACKENDS = ("auto", "cuda", "triton")
WGRAD_OUT_DTYPES = (torch.float32, torch.bfloat16)


def _use_cuda(backend: str, device: torch.device, config, fits) -> bool:
    """Whether this call runs the CUDA kernels (csrc/fp8_grouped): `auto` takes them on an sm90
    GPU when the operands fit them and no Triton TileConfig was asked for; `cuda` insists."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and config is not None):
        return False
    if backend == "auto":
        return grouped_cuda.available(device) and fits()
    reason = ("CPU tensors" if device.type != "cuda"
              else grouped_cuda.unavailable_reason(device.index or 0))
    if reason:
        raise RuntimeError(f"backend='cuda' cannot run here ({reason}); use backend='triton'")
    if not fits():
        raise ValueError("backend='cuda' needs 16-byte aligned operands and row strides, at "
                         "most 1024 experts, and for Wgrad 128 x 256 output tiles (K a multiple "
                         "of 256) and unit-stride scales along N/K; use backend='triton' or "
                         ".contiguous() operands")
    return True


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides and a unit last stride."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(st % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def _k_groups(cfg: TileConfig, groups: int) -> int:
    if cfg.k_groups not in (1, 2):
        raise ValueError(f"TileConfig.k_groups must be 1 or 2, got {cfg.k_groups}")
    return cfg.k_groups if groups % cfg.k_groups == 0 else 1


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the persistent loop really loops
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemm_operands(a_q, b_q, cfg: TileConfig):
    """What the kernel's a/b arguments are: the tensors, or TMA descriptors of them."""
    if not cfg.tma:
        return a_q, b_q
    E, N, K = b_q.shape
    a_desc = TensorDescriptor(a_q, list(a_q.shape), list(a_q.stride()),
                              [cfg.block_m, SCALE_BLOCK])
    b_flat = b_q.reshape(E * N, K)
    b_desc = TensorDescriptor(b_flat, list(b_flat.shape), list(b_flat.stride()),
                              [min(cfg.block_n, 128), SCALE_BLOCK])
    return a_desc, b_desc


def grouped_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                 counts_E: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                 config: TileConfig | None = None, backend: str = "auto") -> torch.Tensor:
    """out[t] = deq(a)[t] . deq(b[e(t)])^T for rows sorted by expert (Fprop; Dgrad with b = W^T).

    a_q [T, K] e4m3 K-major, a_s [T, K/128] fp32 (any strides; MN-major reads fastest),
    b_q [E, N, K] e4m3 K-major, b_s [E, N/128, K/128] fp32, counts_E [E] int: rows per expert.
    K and N must be multiples of 128. Returns [T, N] in out_dtype (bf16 or fp32).
    backend: `auto` (the CUDA kernels on sm90 where they fit, else Triton), `cuda`, `triton`.
    """
    cfg = config or DEFAULT_GEMM_CONFIG
    _check_fp8(a_q, "a_q", 2)
    _check_fp8(b_q, "b_q", 3)
    (rows, K), (E, N, Kb) = a_q.shape, b_q.shape
    if K != Kb:
        raise ValueError(f"a_q [T, K] and b_q [E, N, K] must share K, got {tuple(a_q.shape)} "
                         f"and {tuple(b_q.shape)}")
    if K % SCALE_BLOCK or N % SCALE_BLOCK:
        raise ValueError(f"K={K} and N={N} must be multiples of {SCALE_BLOCK} (one scale per "
                         f"128x128 weight block); pad the weight dimensions")
    if a_q.stride(1) != 1 or b_q.stride(2) != 1:
        raise ValueError("a_q and b_q must be K-major (unit stride along K, what FP8 tensor "
                         "cores read); call .contiguous() (for Dgrad pass the transposed "
                         "weight copy, not a .transpose() view)")
    _check_scales(a_s, "a_s", (rows, K // SCALE_BLOCK))
    _check_scales(b_s, "b_s", (E, N // SCALE_BLOCK, K // SCALE_BLOCK))
    _check_counts(counts_E, E, rows)
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")
    _check_runnable(a_q, a_s, b_q, b_s, counts_E)

    out = torch.empty(rows, N, dtype=out_dtype, device=a_q.device)
    m_tiles = m_tiles_bound(rows, E, cfg.block_m)
    if rows == 0 or m_tiles == 0:
        return out
    if _use_cuda(backend, a_q.device, config, lambda: grouped_cuda.fits_gemm(a_q, b_q)):
        return grouped_cuda.gemm(a_q, a_s, b_q, b_s, counts_E, out, m_tiles)
    if cfg.block_n not in (64, 128, 256):
        raise ValueError(f"TileConfig.block_n must be 64, 128 or 256 for grouped_gemm, got "
                         f"{cfg.block_n}")
    if cfg.tma and not _tma_ok(a_q, b_q):
        cfg = dataclasses.replace(cfg, tma=False)
    n_tiles = triton.cdiv(N, cfg.block_n)
    num_sms = _num_sms(a_q.device) if cfg.persistent else 0
    grid = (min(num_sms, m_tiles * n_tiles) if num_sms else m_tiles * n_tiles,)
    a_arg, b_arg = _gemm_operands(a_q, b_q, cfg)
    grouped_gemm_kernel[grid](
        a_arg, a_s, b_arg, b_s, out, counts_E, rows, N, K, E, m_tiles,
        a_q.stride(0), a_s.stride(0), a_s.stride(1),
        b_q.stride(0), b_q.stride(1), b_s.stride(0), b_s.stride(1), b_s.stride(2), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=SCALE_BLOCK, GROUP_M=cfg.group_m,
        E_POW2=_e_pow2(E), USE_TMA=cfg.tma, K_GROUPS=_k_groups(cfg, K // SCALE_BLOCK),
        NUM_SMS=num_sms, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


# ---------------------------------------------------------------------------------------------
# Grouped along K: Wgrad


@triton.jit
def _expert_tokens(counts_ptr, n_experts, expert, E_POW2: tl.constexpr):
    """Token range [start, end) of `expert` in the sorted rows."""
    e_idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e_idx, mask=e_idx < n_experts, other=0).to(tl.int32)
    end = tl.sum(tl.where(e_idx == expert, tl.cumsum(counts, 0), 0), 0)
    start = end - tl.sum(tl.where(e_idx == expert, counts, 0), 0)
    return start, end


@triton.jit
def _wgrad_group(a_ptr, as_ptr, b_ptr, bs_ptr, group, m0, n0, rm_load, rn_load, start, end,
                 stride_an, stride_asg, stride_asn, stride_bk, stride_bsg, stride_bsk,
                 EDGE: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """Operand tiles of one 128-token group and the scale promoting their product.
    EDGE: the group holds other experts' tokens too; zero them in a."""
    tok = group * BLOCK_K + tl.arange(0, BLOCK_K)
    if USE_TMA:  # a_ptr, b_ptr are descriptors of the [N, T] and [K, T] token-major storage
        a = a_ptr.load([m0, group * BLOCK_K])
        b = b_ptr.load([n0, group * BLOCK_K]).T
    else:
        a = tl.load(a_ptr + rm_load[:, None] * stride_an + tok[None, :])
        b = tl.load(b_ptr + tok[:, None] + rn_load[None, :] * stride_bk)
    if EDGE:
        a = tl.where(((tok >= start) & (tok < end))[None, :], a, tl.zeros_like(a))
    sa = tl.load(as_ptr + group * stride_asg + rm_load * stride_asn)
    sb = tl.load(bs_ptr + group * stride_bsg + rn_load * stride_bsk)
    return a, b, sa, sb


@triton.jit
def grouped_wgrad_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, counts_ptr,
                         rows, N, K, n_experts,
                         stride_an, stride_asg, stride_asn, stride_bk, stride_bsg, stride_bsk,
                         stride_oe, stride_on,
                         ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, E_POW2: tl.constexpr, USE_TMA: tl.constexpr,
                         K_GROUPS: tl.constexpr):
    m_tiles = tl.cdiv(N, BLOCK_M)
    n_tiles = tl.cdiv(K, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (m_tiles * n_tiles)
    tile_m, tile_n = _swizzle(pid % (m_tiles * n_tiles), m_tiles, n_tiles, GROUP_M)
    start, end = _expert_tokens(counts_ptr, n_experts, expert, E_POW2)
    start, end = tl.minimum(start, rows), tl.minimum(end, rows)

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_load = tl.minimum(rm, N - 1).to(tl.int64)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_load = tl.minimum(rn, K - 1).to(tl.int64)
    args = (a_ptr, as_ptr, b_ptr, bs_ptr)
    tile = (tile_m * BLOCK_M, tile_n * BLOCK_N, rm_load, rn_load, start, end)
    strides = (stride_an, stride_asg, stride_asn, stride_bk, stride_bsg, stride_bsk)

    # groups wholly inside [start, end) stream unmasked (K_GROUPS at a time: independent MMAs);
    # the (at most two) groups the expert shares with a neighbour are loaded whole and masked
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    full_lo, full_hi = (start + BLOCK_K - 1) // BLOCK_K, end // BLOCK_K
    n_full = tl.maximum(full_hi - full_lo, 0)
    for group in range(full_lo, full_lo + n_full // K_GROUPS * K_GROUPS, K_GROUPS):
        a, b, sa, sb = _wgrad_group(*args, group, *tile, *strides, False, BLOCK_K, USE_TMA)
        if K_GROUPS == 2:
            a1, b1, sa1, sb1 = _wgrad_group(*args, group + 1, *tile, *strides, False, BLOCK_K,
                                            USE_TMA)
            acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :] \
                + (tl.dot(a1, b1) * sa1[:, None]) * sb1[None, :]
        else:
            acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :]
    if K_GROUPS == 2:
        if n_full % 2 == 1:
            a, b, sa, sb = _wgrad_group(*args, full_hi - 1, *tile, *strides, False, BLOCK_K,
                                        USE_TMA)
            acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :]
    first, last = start // BLOCK_K, (end - 1) // BLOCK_K
    if (end > start) & (start % BLOCK_K != 0):
        a, b, sa, sb = _wgrad_group(*args, first, *tile, *strides, True, BLOCK_K, USE_TMA)
        acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :]
    if (end > start) & (end % BLOCK_K != 0) & ((last > first) | (start % BLOCK_K == 0)):
        a, b, sa, sb = _wgrad_group(*args, last, *tile, *strides, True, BLOCK_K, USE_TMA)
        acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :]

    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + rm.to(tl.int64)[:, None] * stride_on
                + rn[None, :])
    mask = (rm < N)[:, None] & (rn < K)[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _wgrad_operands(a_q, b_q, cfg: TileConfig):
    """The kernel's a/b arguments: the token-major tensors, or TMA descriptors of their storage."""
    if not (cfg.tma and _tma_ok(a_q.t(), b_q.t())):
        return a_q, b_q
    descs = []
    for q, block in ((a_q, cfg.block_m), (b_q, cfg.block_n)):
        storage = q.t()  # [N, T] with unit stride along T
        descs.append(TensorDescriptor(storage, list(storage.shape), list(storage.stride()),
                                      [block, SCALE_BLOCK]))
    return descs


def grouped_wgrad(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                  counts_E: torch.Tensor, out: torch.Tensor | None = None,
                  config: TileConfig | None = None, backend: str = "auto",
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[e] (+)= deq(a)[rows of e]^T . deq(b)[rows of e]: per-expert weight gradients, fp32.

    a_q [T, N] and b_q [T, K] e4m3, token-major (unit stride along T: see `token_major`), with
    128x1 scales a_s [ceil(T/128), N], b_s [ceil(T/128), K] fp32 (groups of 128 sorted rows);
    counts_E [E] int. For dW = dy^T x: a = dy, b = x. Returns [E, N, K] in out_dtype (fp32, or
    bf16 for bf16 parameters: rounded once from the fp32 accumulator, no fp32 copy made); when
    `out` is given (fp32 or bf16 [E, N, K], e.g. a main-grad buffer) the result is added into it
    (in fp32 arithmetic) and it is returned.
    backend: as for grouped_gemm.
    """
    cfg = config or DEFAULT_WGRAD_CONFIG
    _check_fp8(a_q, "a_q", 2)
    _check_fp8(b_q, "b_q", 2)
    (rows, N), (rows_b, K) = a_q.shape, b_q.shape
    if rows != rows_b:
        raise ValueError(f"a_q [T, N] and b_q [T, K] must have the same rows T, got "
                         f"{tuple(a_q.shape)} and {tuple(b_q.shape)}")
    groups = triton.cdiv(rows, SCALE_BLOCK)
    _check_token_major(a_q, "a_q", groups * SCALE_BLOCK)
    _check_token_major(b_q, "b_q", groups * SCALE_BLOCK)
    _check_scales(a_s, "a_s", (groups, N))
    _check_scales(b_s, "b_s", (groups, K))
    E = counts_E.shape[0] if isinstance(counts_E, torch.Tensor) and counts_E.dim() == 1 else -1
    _check_counts(counts_E, E, rows)
    if out is None:
        if out_dtype not in WGRAD_OUT_DTYPES:
            raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
        out = torch.empty(E, N, K, dtype=out_dtype, device=a_q.device)
        accumulate = False
    else:
        if out.dtype not in WGRAD_OUT_DTYPES or tuple(out.shape) != (E, N, K) \
                or out.stride(2) != 1:
            raise ValueError(f"out must be a float32 or bfloat16 [{E}, {N}, {K}] tensor with unit "
                             f"stride along K, got {out.dtype} {tuple(out.shape)}")
        accumulate = True
    _check_runnable(a_q, a_s, b_q, b_s, counts_E, out)
    if E == 0:
        return out
    if rows and _use_cuda(backend, a_q.device, config,
                          lambda: grouped_cuda.fits_wgrad(a_q, a_s, b_q, b_s, E)):
        return grouped_cuda.wgrad(a_q, a_s, b_q, b_s, counts_E, out, accumulate)
    grid = (E * triton.cdiv(N, cfg.block_m) * triton.cdiv(K, cfg.block_n),)
    a_arg, b_arg = _wgrad_operands(a_q, b_q, cfg) if rows else (a_q, b_q)
    grouped_wgrad_kernel[grid](
        a_arg, a_s, b_arg, b_s, out, counts_E, rows, N, K, E,
        a_q.stride(1), a_s.stride(0), a_s.stride(1), b_q.stride(1), b_s.stride(0), b_s.stride(1),
        out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=SCALE_BLOCK,
        GROUP_M=cfg.group_m, E_POW2=_e_pow2(E), USE_TMA=not isinstance(a_arg, torch.Tensor),
        K_GROUPS=_k_groups(cfg, 2),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
