#include "host.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace saver {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kTouchSlice = size_t(64) << 20;  // bytes each touching thread takes at a time

// Writes one byte per page so the kernel backs the range now, with several threads: a single
// thread faulting in gigabytes is the slow part of pinning.
void touch_pages(char* base, size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads = std::min<size_t>({8, hw, (bytes + kTouchSlice - 1) / kTouchSlice});
  auto work = [=](size_t first) {
    for (size_t start = first * kTouchSlice; start < bytes; start += threads * kTouchSlice) {
      const size_t end = std::min(bytes, start + kTouchSlice);
      for (size_t off = start; off < end; off += page) base[off] = 0;
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

}  // namespace

Status pin_host(size_t bytes, HostBuffer* out) {
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {
    return make_status(kOutOfMemory, "mmap of a " + std::to_string(size) +
                                         "-byte host backup failed at " __FILE__ ":" +
                                         std::to_string(__LINE__) + ": " + std::strerror(errno));
  }
  madvise(ptr, size, MADV_HUGEPAGE);  // advisory: without THP the pages are simply smaller
  touch_pages(static_cast<char*>(ptr), size);
  Status st = CU_CALL(cuMemHostRegister, ptr, size, CU_MEMHOSTREGISTER_PORTABLE);
  if (!st.ok()) {
    munmap(ptr, size);
    return st;
  }
  out->ptr = ptr;
  out->bytes = size;
  return {};
}

Status unpin_host(HostBuffer* buffer) {
  if (buffer->ptr == nullptr) return {};
  Status st = CU_CALL(cuMemHostUnregister, buffer->ptr);
  munmap(buffer->ptr, buffer->bytes);
  buffer->ptr = nullptr;
  buffer->bytes = 0;
  return st;
}

}  // namespace saver
