// Device-side PTX wrappers the nvcc-built kernel libraries of csrc/ share (included by
// fp8_grouped/grouped.cu and fp8_norm/rmsnorm_quant.cu, digested with each library's sources
// like host_tma.cuh): shared-memory addresses, mbarriers, the cluster barrier, the TMA tile
// load, programmatic dependent launch and the launch attributes that turn it and clusters on. Each
// kernel keeps the wrappers only it uses (WGMMA, st.async, its own wait loops).
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>  // cudaLaunchAttribute

#include <cstdint>

namespace csrc_common {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// An mbarrier whose phase completes after `arrivals` arrivals (and the bytes they announce).
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals));
}

// One arrival that also announces `bytes` of asynchronous copies the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Every CTA of the cluster reaches this point (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// The TMA box at (inner, outer) of `map` into `dst`, completing `bar`'s transaction bytes.
__device__ __forceinline__ void tma_load_tile(void* dst, const CUtensorMap* map, uint64_t* bar,
                                              int inner, int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)),
      "r"(inner), "r"(outer) : "memory");
}

// Programmatic dependent launch (a launch with cudaLaunchAttributeProgrammaticStreamSerialization
// may start while the kernel before it in the stream still runs). Wait: returns once every grid
// this one depends on has completed and its memory operations are visible; before it a kernel
// must not touch global memory another kernel may write or read. Without the attribute, a no-op.
__device__ __forceinline__ void wait_for_prior_grids() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Lets the next kernel in the stream, if launched with the attribute, be scheduled on the SMs
// this grid leaves free (it still waits for this grid's completion in wait_for_prior_grids).
__device__ __forceinline__ void allow_dependent_grids() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// The launch attribute that lets a kernel start before the one ahead of it in the stream has
// finished (cudaLaunchKernelEx); the kernel must then call wait_for_prior_grids before it touches
// global memory.
inline cudaLaunchAttribute programmatic_serialization() {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}

// The launch attribute that groups a launch's CTAs into clusters of `size` along x
// (cudaLaunchKernelEx); a kernel launched with it may use the cluster's distributed shared memory
// and barriers.
inline cudaLaunchAttribute cluster_dimension(int size) {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = size;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return attr;
}

}  // namespace csrc_common
