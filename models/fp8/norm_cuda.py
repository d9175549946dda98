"""ctypes binding of the fused RMSNorm -> FP8 quantization kernel, csrc/fp8_norm/rmsnorm_quant.cu.

Same contract as the Triton path of `models.fp8.quant.rmsnorm_quantize` (that module's docstring
has the layouts and why the norm is hard to fuse; the .cu header has how the kernel does it: a
group of CTAs per 128-row block, the block's tiles held in their shared memory, the rows' sums of
squares exchanged between them, x read from HBM once). quant.py calls `rmsnorm_quantize` here
when `available(device)` (an sm90 GPU and nvcc to build the library on first use) and
`fits(...)`, and otherwise runs Triton:

  * x bf16 with unit column stride, its base and row stride 16-byte aligned (TMA);
  * K % 8 == 0 (8-column groups are stored as 8-byte vectors) and at most 16 CTAs x the tiles
    one CTA's shared memory holds (7 on an H100: K <= 14336);
  * hp_out, if given, 16-byte aligned (float32 or bfloat16, quant._check_hp_out).
The weight may be bf16 or fp32 (anything else is converted to fp32 first).

Two launches, the same arithmetic (bitwise the same outputs for the same CTAs per row block):
a hardware thread-block cluster per row block, exchanging through distributed shared memory
(`spread=False`; `plan`), or a `spread` launch (`spread_plan`): one cooperative grid of every CTA
the GPU holds at once, consecutive CTAs forming a group that exchanges through L2. A cluster must
sit inside one GPC, so on an H100 only 15 clusters of 8 fit (120 of the 132 SMs) and 256 row
blocks take 18 rounds; spread groups of 8 use 128 SMs in 16 rounds, and the group size is free
(not only a power of two): `spread_plan` picks the one with the fewest tile-times in all.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_lib import aligned16

TILE = 128
MAX_CLUSTER = 16
"""The largest thread-block cluster sm90 allows (non-portable above 8)."""


def load_library(path) -> ctypes.CDLL:
    """The built library at `path`, with its C ABI declared."""
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.fp8moe_rmsnorm_quant.argtypes = [ptr, i64, ptr, i32, ctypes.c_float, i32, i32, i32, i32,
                                         ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32,
                                         i32, ptr, ptr, ctypes.c_char_p, i32]
    lib.fp8moe_rmsnorm_smem_bytes.argtypes = [i32]
    lib.fp8moe_rmsnorm_smem_bytes.restype = ctypes.c_size_t
    lib.fp8moe_rmsnorm_resident_clusters.argtypes = [i32, i32, ctypes.c_char_p, i32]
    lib.fp8moe_rmsnorm_spread_workspace_bytes.argtypes = [i32, i32]
    lib.fp8moe_rmsnorm_spread_workspace_bytes.restype = ctypes.c_size_t
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return load_library(cuda_lib.build_script("fp8_norm").ensure_built())


@functools.lru_cache(maxsize=None)
def unavailable_reason(index: int) -> str | None:
    """None when device `index` can run the kernel, else why not (cached per device)."""
    reason = cuda_lib.unavailable_reason(index, "fp8_norm", _library)
    if reason is not None:
        return reason
    if max_tiles(index) < 1:
        return "not even one 128 x 128 tile fits a CTA's shared memory"
    return None


def available(device: torch.device) -> bool:
    return device.type == "cuda" and unavailable_reason(device.index or 0) is None


@functools.lru_cache(maxsize=None)
def max_tiles(index: int) -> int:
    """Tiles (32 KB each, plus the kernel's scratch) one CTA's shared memory holds on device
    `index`: 7 on an H100."""
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    smem = _library().fp8moe_rmsnorm_smem_bytes
    tiles = 0
    while smem(tiles + 1) <= limit:
        tiles += 1
    return tiles


def plan(kb: int, most_tiles: int, cluster: int = 0) -> tuple[int, int] | None:
    """(CTAs per cluster, most tiles per CTA) covering kb column tiles, or None if none fits.

    cluster=0 picks the smallest power-of-two cluster whose CTAs hold the row block within
    `most_tiles` tiles each (fewest CTAs sharing a row block: K = 7168 -> 8 x 7, 4096 -> 8 x 4,
    2048 -> 4 x 4); a given cluster (a power of two up to 16) splits them as evenly as it can
    (the kernel gives CTA r tiles r * kb // cluster .. (r + 1) * kb // cluster - 1)."""
    if kb < 1 or most_tiles < 1:
        return None
    if not cluster:
        cluster = 1
        while cluster * most_tiles < kb:
            cluster *= 2
    if cluster > MAX_CLUSTER or cluster & (cluster - 1):
        return None
    tiles = -(-kb // cluster)
    return (cluster, tiles) if tiles <= most_tiles else None



EXCHANGE_TILES = 0.5
"""What one round's exchange costs in `spread_plan`'s model, in tile-times (quantizing one tile;
the .cu timeline had the exchange at 7% of a round of 7 tiles)."""


def spread_plan(kb: int, mb: int, most_tiles: int, resident: int,
                group: int = 0) -> tuple[int, int, int] | None:
    """(CTAs per group, most tiles per CTA, groups) of a spread launch covering kb column tiles
    and mb row blocks with at most `resident` CTAs, or None if none fits.

    group=0 picks the size (1..16) whose launch takes the fewest tile-times: rounds x (tiles a
    CTA + EXCHANGE_TILES), rounds = mb / groups rounded up; ties go to the smaller group (less L2
    traffic in the exchange). On an H100 (7 tiles a CTA, 132 CTAs): 32768 x 7168 -> 8 x 7 x 16
    (16 rounds, against 18 for the 15 hardware clusters of 8), 8192 x 4096 -> 8 x 4 x 16 (4
    rounds, against 5), 16384 x 2048 -> 4 x 4 x 33."""
    if kb < 1 or mb < 1 or most_tiles < 1:
        return None
    best = None
    for size in [group] if group else range(1, MAX_CLUSTER + 1):
        tiles = -(-kb // size)
        if not 1 <= size <= MAX_CLUSTER or tiles > most_tiles or size > resident:
            continue
        groups = min(resident // size, mb)
        cost = -(-mb // groups) * (tiles + EXCHANGE_TILES)
        if best is None or cost < best[0]:
            best = (cost, (size, tiles, groups))
    return None if best is None else best[1]


@functools.lru_cache(maxsize=None)
def resident_ctas(index: int, buffers: int) -> int:
    """CTAs of the kernel with `buffers` tile buffers device `index` holds at once (132 on an
    H100: one a SM), the most a spread launch may have."""
    with torch.cuda.device(index):
        err = ctypes.create_string_buffer(512)
        n = _library().fp8moe_rmsnorm_resident_clusters(0, buffers, err, 512)
    if n < 1:
        raise RuntimeError(f"fp8moe_rmsnorm_resident_clusters: {err.value.decode()}")
    return n


def _plan_for(x: torch.Tensor, cluster: int, spread: bool):
    """spread_plan or plan for x [M, K] on its device (None: the kernel cannot take it)."""
    return _cached_plan(x.device.index or 0, *x.shape, cluster, spread)


@functools.lru_cache(maxsize=256)  # a spread plan tries 16 sizes: tens of us in Python per call
def _cached_plan(index: int, M: int, K: int, cluster: int, spread: bool):
    kb = -(-K // TILE)
    if spread:
        return spread_plan(kb, -(-M // TILE), max_tiles(index),
                           resident_ctas(index, max_tiles(index)), cluster)
    return plan(kb, max_tiles(index), cluster)


def fits(x: torch.Tensor, hp_out: torch.Tensor | None, cluster: int = 0,
         spread: bool = False) -> bool:
    """Whether the kernel takes this input (see the module docstring); x is 2-D and validated."""
    M, K = x.shape
    return (x.dtype == torch.bfloat16 and (x.stride(1) == 1 or K == 1) and aligned16(x)
            and x.stride(0) % 8 == 0 and K % 8 == 0 and M > 0
            and (hp_out is None or aligned16(hp_out))
            and _plan_for(x, cluster, spread) is not None)


@functools.lru_cache(maxsize=None)
def _workspace_bytes(groups: int, group: int) -> int:
    return _library().fp8moe_rmsnorm_spread_workspace_bytes(groups, group)


def rmsnorm_quantize(x, weight, eps: float, pow2_scales: bool, colwise: bool, hp_out, rstd,
                     outputs, cluster: int = 0, spread: bool = False) -> None:
    """Run the kernel into `outputs` = (q, s, qt, st) (quant._alloc_outputs; qt and st unused
    unless colwise) and rstd; the caller checked `fits`."""
    (M, K), (q, s, qt, st) = x.shape, outputs
    if weight.dtype not in (torch.bfloat16, torch.float32):
        weight = weight.float()
    if not aligned16(weight):
        weight = weight.clone()
    buffers = max_tiles(x.device.index or 0)  # beyond the CTA's tiles: the next block's, early
    chosen = _plan_for(x, cluster, spread)
    cluster, groups, workspace = chosen[0], chosen[2] if spread else 0, None
    if spread:  # the exchange buffers come from torch's allocator: stream-ordered like the outputs
        workspace = torch.empty(_workspace_bytes(groups, cluster), dtype=torch.uint8,
                                device=x.device)
    stream = cuda_lib.current_stream(x.device)
    cuda_lib.call(_library().fp8moe_rmsnorm_quant,
                  x.data_ptr(), x.stride(0), weight.data_ptr(), int(weight.dtype == torch.bfloat16),
                  eps, M, K, int(pow2_scales), int(colwise), q.data_ptr(), s.data_ptr(),
                  qt.data_ptr(), st.data_ptr(), rstd.data_ptr(),
                  None if hp_out is None else hp_out.data_ptr(),
                  int(hp_out is not None and hp_out.dtype == torch.bfloat16),
                  qt.shape[1] if colwise else 0, cluster, buffers, groups,
                  None if workspace is None else workspace.data_ptr(), stream)
