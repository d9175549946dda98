"""ctypes binding of the fused RMSNorm -> FP8 quantization kernel, csrc/fp8_norm/rmsnorm_quant.cu.

Same contract as the Triton path of `models.fp8.quant.rmsnorm_quantize` (that module's docstring
has the layouts and why the norm is hard to fuse; the .cu header has how the kernel does it: one
thread-block cluster per 128-row block, the block's tiles held in shared memory, the rows' sums of
squares exchanged through distributed shared memory, x read from HBM once). quant.py calls
`rmsnorm_quantize` here when `available(device)` (an sm90 GPU and nvcc to build the library on
first use) and `fits(...)`, and otherwise runs Triton:

  * x bf16 with unit column stride, its base and row stride 16-byte aligned (TMA);
  * K % 8 == 0 (8-column groups are stored as 8-byte vectors) and at most 16 CTAs x the tiles
    one CTA's shared memory holds (7 on an H100: K <= 14336);
  * hp_out, if given, 16-byte aligned (float32 or bfloat16, quant._check_hp_out).
The weight may be bf16 or fp32 (anything else is converted to fp32 first).
"""
from __future__ import annotations

import ctypes
import functools
import threading

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
                                         ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, ptr,
                                         ptr, ctypes.c_char_p, i32]
    lib.fp8moe_rmsnorm_smem_bytes.argtypes = [i32]
    lib.fp8moe_rmsnorm_smem_bytes.restype = ctypes.c_size_t
    lib.fp8moe_rmsnorm_resident_clusters.argtypes = [i32, i32, ctypes.c_char_p, i32]
    lib.fp8moe_rmsnorm_claims_slot.argtypes = [i32, ctypes.POINTER(ptr), ctypes.c_char_p, i32]
    lib.resets_claims = bool(lib.fp8moe_rmsnorm_resets_claims())
    lib.claim_slots = lib.fp8moe_rmsnorm_claim_slots()
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



def fits(x: torch.Tensor, hp_out: torch.Tensor | None, cluster: int = 0) -> bool:
    """Whether the kernel takes this input (see the module docstring); x is 2-D and validated."""
    M, K = x.shape
    return (x.dtype == torch.bfloat16 and (x.stride(1) == 1 or K == 1) and aligned16(x)
            and x.stride(0) % 8 == 0 and K % 8 == 0 and M > 0
            and (hp_out is None or aligned16(hp_out))
            and plan(-(-K // TILE), max_tiles(x.device.index or 0), cluster) is not None)


def rmsnorm_quantize(x, weight, eps: float, pow2_scales: bool, colwise: bool, hp_out, rstd,
                     outputs, cluster: int = 0) -> None:
    """Run the kernel into `outputs` = (q, s, qt, st) (quant._alloc_outputs; qt and st unused
    unless colwise) and rstd; the caller checked `fits`."""
    (M, K), (q, s, qt, st) = x.shape, outputs
    if weight.dtype not in (torch.bfloat16, torch.float32):
        weight = weight.float()
    if not aligned16(weight):
        weight = weight.clone()
    buffers = max_tiles(x.device.index or 0)  # beyond the CTA's tiles: the next block's, early
    cluster = plan(-(-K // TILE), buffers, cluster)[0]
    stream = cuda_lib.current_stream(x.device)
    claims, claims_tensor = claims_counter(x.device, stream)  # the tensor lives past the launch
    cuda_lib.call(_library().fp8moe_rmsnorm_quant,
                  x.data_ptr(), x.stride(0), weight.data_ptr(), int(weight.dtype == torch.bfloat16),
                  eps, M, K, int(pow2_scales), int(colwise), q.data_ptr(), s.data_ptr(),
                  qt.data_ptr(), st.data_ptr(), rstd.data_ptr(),
                  None if hp_out is None else hp_out.data_ptr(),
                  int(hp_out is not None and hp_out.dtype == torch.bfloat16),
                  qt.shape[1] if colwise else 0, cluster, buffers, claims, stream)
    del claims_tensor


_STREAM_CLAIMS: dict[tuple[int, int], int] = {}
"""(device index, raw stream) -> the device address of that stream's ticket counter."""
_SLOT_LOCK = threading.Lock()
"""Held while a stream is given a slot, so that two threads never give two streams one slot."""


def claims_counter(device: torch.device, stream: int) -> tuple[int, torch.Tensor | None]:
    """(device address, the tensor holding it if any) of the zeroed int a launch on `stream`
    hands its leftover row blocks out from (the .cu's RowBlocks).

    Where the library's launches leave it zeroed again (NORM_RESET_CLAIMS), every launch of a
    stream takes the same one, a slot of the library's own device memory: launches on one stream
    run one after another (each one's first access to it waits for the previous one's end), so
    no two use it at once, and no allocator (nor a memory-saver region, trainer/saver.py) hands
    it out. During CUDA graph capture, with a library that does not reset it, or past the
    library's slots (64 streams a device), each launch gets its own, zeroed in stream order (a
    fill node in a graph), so that no launch on another stream or replay of a graph shares it."""
    lib = _library()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, stream)
    if lib.resets_claims and not torch.cuda.is_current_stream_capturing():
        address = _STREAM_CLAIMS.get(key)
        if address is not None:
            return address, None
        with _SLOT_LOCK:
            if key not in _STREAM_CLAIMS:
                slots_taken = sum(1 for d, _ in _STREAM_CLAIMS if d == index)
                if slots_taken < lib.claim_slots:
                    _STREAM_CLAIMS[key] = _slot_address(lib, index, slots_taken)
            address = _STREAM_CLAIMS.get(key)
        if address is not None:
            return address, None
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    return counter.data_ptr(), counter


def _slot_address(lib, index: int, slot: int) -> int:
    """Device `index`'s address of the library's ticket counter `slot`."""
    address = ctypes.c_void_p()
    with torch.cuda.device(index):
        cuda_lib.call(lib.fp8moe_rmsnorm_claims_slot, slot, ctypes.byref(address))
    return address.value
