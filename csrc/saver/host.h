// Pinned host shadows for CPU backups.
//
// cudaMallocHost pins at about 2 GiB/s on an H100 host (8 GiB took 3.8-4.5 s, research/saver.md
// 5.1), and torch_memory_saver pays that inside every pause. A shadow here is an anonymous mmap
// advised onto transparent huge pages, first-touched by several threads, then registered with the
// driver (cuMemHostRegister): 8 GiB in about 0.5 s. It is made once, at the first pause that needs
// it, and kept for the life of its chunk, so later pauses copy at link speed.
#pragma once

#include <cstddef>

#include "driver.h"

namespace saver {

struct HostBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;  // mapped and registered size (a multiple of the page size)
};

// Maps, touches and registers `bytes` of host memory; on failure nothing stays mapped.
Status pin_host(size_t bytes, HostBuffer* out);

// Unregisters and unmaps; a no-op on an empty buffer.
Status unpin_host(HostBuffer* buffer);

}  // namespace saver
