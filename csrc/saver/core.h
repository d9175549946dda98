// The saver's state and its three operations: allocate in a tag, free, and move tags between the
// active and paused states.
//
// Memory layout. Every (tag, device) owns a few large *chunks*; a chunk is one reserved virtual
// range backed by one physical allocation (one cuMemCreate handle, one cuMemMap). The segments
// that PyTorch's caching allocator (or a hooked cudaMalloc) asks for are carved out of chunks by a
// first-fit free list. Pausing costs one unmap and one release per chunk, not per tensor: 16 GiB
// of 2 MiB tensors is about 20 chunks here against ~800 mappings in torch_memory_saver. A tag's
// chunks grow geometrically (each new chunk as large as the tag so far, capped at `chunk_bytes`,
// 1 GiB by default), so small tags stay small and large tags have few chunks; a request larger
// than the cap gets a chunk of exactly its (granularity-rounded) size.
//
// Pause and resume. `transition` pauses some tags and resumes others in one pass, which lets the
// device-to-host backup of the tags being paused and the host-to-device restore of the tags being
// resumed run at the same time on two copy streams (full duplex on PCIe). Pausing first waits once
// for the device to go idle (kernels on any stream, NCCL's included, may still read the memory),
// copies live bytes into each chunk's pinned shadow in 64 MiB pieces, and unmaps each chunk as soon
// as its copies finish. Resuming maps fresh memory at the same addresses; when the device is full
// it first finishes unmapping chunks being paused in the same call. A resume that still runs out of
// memory unmaps what it mapped, leaves the tag paused with its backup intact, and says how many
// bytes were missing. Freeing a segment waits only for the stream that allocated it (PyTorch's
// allocator has already waited for the others); a raw cudaFree keeps cudaFree's own semantics.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "driver.h"

namespace saver {

struct Stats {
  uint64_t released_bytes = 0;   // physical bytes returned to the driver by pausing
  uint64_t restored_bytes = 0;   // physical bytes mapped again by resuming
  uint64_t to_host_bytes = 0;    // bytes copied into backups
  uint64_t to_device_bytes = 0;  // bytes copied back from backups
  double pin_seconds = 0;        // time spent creating pinned shadows (first backup of a chunk)
};

// Creates the tag, or checks that an existing one was opened with the same backup setting.
Status open_tag(const std::string& name, bool cpu_backup);

// The tag that allocations on this thread go to; nullptr clears it.
Status set_thread_tag(const char* name);
bool has_thread_tag();

// Carves `size` bytes for the current thread's tag on `device`. `stream` is the stream PyTorch
// allocated on; `sync_device_on_free` marks raw cudaMalloc memory whose users are unknown.
Status allocate(size_t size, int device, CUstream stream, bool sync_device_on_free, void** out);

// Frees a pointer returned by `allocate`; sets *found to false (and does nothing) for others.
Status release(void* ptr, bool* found);

// Pauses `pause` and resumes `resume` (tag names). `all_active` / `all_paused` select every tag in
// that state instead. A tag may not appear on both sides.
Status transition(const std::vector<std::string>& pause, bool all_active,
                  const std::vector<std::string>& resume, bool all_paused, Stats* stats);

// Largest chunk a tag grows by (rounded up to the allocation granularity when used).
Status set_chunk_bytes(size_t bytes);

// Per-tag accounting as a JSON object (see trainer/saver.py for the keys).
std::string report_json();

}  // namespace saver
