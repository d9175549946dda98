#include "core.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_map>

#include "host.h"

namespace saver {
namespace {

constexpr int kMaxDevices = 64;
constexpr size_t kSegmentAlign = 512;                // what cudaMalloc and PyTorch's blocks align to
constexpr size_t kCopyPiece = size_t(64) << 20;      // one cuMemcpyAsync moves at most this much
constexpr size_t kDefaultChunkBytes = size_t(1) << 30;

struct Tag;

struct Chunk {
  Tag* tag = nullptr;
  int device = 0;
  CUdeviceptr base = 0;
  size_t size = 0;                           // reserved == mapped size, a granularity multiple
  CUmemGenericAllocationHandle handle = 0;   // valid while mapped
  bool mapped = false;
  std::map<size_t, size_t> free_ranges;      // offset -> bytes, coalesced
  std::map<size_t, size_t> live;             // offset -> bytes of each segment handed out
  size_t live_bytes = 0;
  HostBuffer shadow;                         // pinned backup, kept across cycles
  bool shadow_valid = false;                 // shadow holds the live bytes (tag paused)
  CUevent copied = nullptr;                  // recorded after this chunk's backup copies
};

struct Tag {
  std::string name;
  bool cpu_backup = false;
  bool paused = false;
  std::vector<Chunk*> chunks;
};

struct Segment {
  Chunk* chunk = nullptr;
  size_t offset = 0;
  size_t bytes = 0;
  CUstream stream = nullptr;
  bool sync_device_on_free = false;
};

struct Device {
  bool ready = false;
  CUdevice dev = 0;
  CUcontext ctx = nullptr;
  bool rdma = false;
  size_t granularity = 0;
  CUstream to_host = nullptr;
  CUstream to_device = nullptr;
};

struct Registry {
  std::mutex mu;
  std::map<std::string, Tag*> tags;  // tags live as long as the process
  std::unordered_map<uintptr_t, Segment> segments;
  Device devices[kMaxDevices];
  size_t chunk_bytes = kDefaultChunkBytes;
};

// Never destroyed: PyTorch may free pool memory during interpreter shutdown, after static
// destructors would have run.
Registry& reg() {
  static Registry* r = new Registry;
  return *r;
}

thread_local Tag* t_tag = nullptr;

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / double(size_t(1) << 30));
  return buf;
}

// Makes a device's primary context current for the lifetime of the object.
class ScopedContext {
 public:
  Status enter(const Device& d) {
    Status st = CU_CALL(cuCtxPushCurrent, d.ctx);
    pushed_ = st.ok();
    return st;
  }
  ~ScopedContext() {
    CUcontext popped;
    if (!pushed_) return;
    trace("cuCtxPopCurrent");
    drv().cuCtxPopCurrent(&popped);
  }

 private:
  bool pushed_ = false;
};

CUmemAllocationProp allocation_prop(const Device& d, int ordinal) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal;
  prop.allocFlags.gpuDirectRDMACapable = d.rdma ? 1 : 0;
  return prop;
}

Status init_device(int ordinal, Device& d) {
  SAVER_RETURN_IF_ERROR(CU_CALL(cuDeviceGet, &d.dev, ordinal));
  SAVER_RETURN_IF_ERROR(CU_CALL(cuDevicePrimaryCtxRetain, &d.ctx, d.dev));
  int rdma = 0;
  SAVER_RETURN_IF_ERROR(CU_CALL(cuDeviceGetAttribute, &rdma,
                                CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, d.dev));
  d.rdma = rdma != 0;
  CUmemAllocationProp prop = allocation_prop(d, ordinal);
  SAVER_RETURN_IF_ERROR(CU_CALL(cuMemGetAllocationGranularity, &d.granularity, &prop,
                                CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  ScopedContext scope;
  SAVER_RETURN_IF_ERROR(scope.enter(d));
  SAVER_RETURN_IF_ERROR(CU_CALL(cuStreamCreate, &d.to_host, CU_STREAM_NON_BLOCKING));
  SAVER_RETURN_IF_ERROR(CU_CALL(cuStreamCreate, &d.to_device, CU_STREAM_NON_BLOCKING));
  d.ready = true;
  return {};
}

Status device(int ordinal, Device** out) {
  if (ordinal < 0 || ordinal >= kMaxDevices) {
    return make_status(kUsage, "device " + std::to_string(ordinal) + " is out of range");
  }
  Device& d = reg().devices[ordinal];
  if (!d.ready) SAVER_RETURN_IF_ERROR(init_device(ordinal, d));
  *out = &d;
  return {};
}

// ---- physical memory of one chunk: all-or-nothing map, and unmap ----

Status map_chunk(const Device& d, Chunk* c) {
  trace("map chunk 0x%llx + %zu on device %d", static_cast<unsigned long long>(c->base), c->size, c->device);
  CUmemAllocationProp prop = allocation_prop(d, c->device);
  CUmemGenericAllocationHandle handle = 0;
  SAVER_RETURN_IF_ERROR(CU_CALL(cuMemCreate, &handle, c->size, &prop, 0));
  Status st = CU_CALL(cuMemMap, c->base, c->size, 0, handle, 0);
  if (!st.ok()) {
    drv().cuMemRelease(handle);
    return st;
  }
  CUmemAccessDesc access = {};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  st = CU_CALL(cuMemSetAccess, c->base, c->size, &access, 1);
  if (!st.ok()) {
    drv().cuMemUnmap(c->base, c->size);
    drv().cuMemRelease(handle);
    return st;
  }
  c->handle = handle;
  c->mapped = true;
  return {};
}

Status unmap_chunk(Chunk* c) {
  trace("unmap chunk 0x%llx + %zu", static_cast<unsigned long long>(c->base), c->size);
  SAVER_RETURN_IF_ERROR(CU_CALL(cuMemUnmap, c->base, c->size));
  c->mapped = false;
  Status st = CU_CALL(cuMemRelease, c->handle);
  c->handle = 0;
  return st;
}

Status new_chunk(Tag* tag, int ordinal, const Device& d, size_t size, Chunk** out) {
  auto c = std::make_unique<Chunk>();
  c->tag = tag;
  c->device = ordinal;
  c->size = size;
  ScopedContext scope;
  SAVER_RETURN_IF_ERROR(scope.enter(d));
  SAVER_RETURN_IF_ERROR(CU_CALL(cuMemAddressReserve, &c->base, size, d.granularity, 0, 0));
  Status st = map_chunk(d, c.get());
  if (!st.ok()) {
    drv().cuMemAddressFree(c->base, size);
    return st;
  }
  c->free_ranges[0] = size;
  tag->chunks.push_back(c.get());
  *out = c.release();
  return {};
}

// Gives everything a chunk holds back: physical memory, address range, shadow, event.
Status destroy_chunk(Chunk* c) {
  Device& d = reg().devices[c->device];
  ScopedContext scope;
  SAVER_RETURN_IF_ERROR(scope.enter(d));
  Status st;
  if (c->mapped) st = unmap_chunk(c);
  if (!st.ok()) return st;  // still mapped: keep the record so nothing leaks silently
  Status freed = CU_CALL(cuMemAddressFree, c->base, c->size);
  Status unpinned = unpin_host(&c->shadow);
  if (c->copied) drv().cuEventDestroy(c->copied);
  auto& chunks = c->tag->chunks;
  chunks.erase(std::find(chunks.begin(), chunks.end(), c));
  delete c;
  return !freed.ok() ? freed : unpinned;
}

// ---- first-fit sub-allocation inside a chunk ----

bool carve(Chunk* c, size_t bytes, size_t* offset) {
  for (auto it = c->free_ranges.begin(); it != c->free_ranges.end(); ++it) {
    if (it->second < bytes) continue;
    const size_t off = it->first, rest = it->second - bytes;
    c->free_ranges.erase(it);
    if (rest) c->free_ranges[off + bytes] = rest;
    c->live[off] = bytes;
    c->live_bytes += bytes;
    *offset = off;
    return true;
  }
  return false;
}

void give_back(Chunk* c, size_t offset, size_t bytes) {
  c->live.erase(offset);
  c->live_bytes -= bytes;
  size_t start = offset, len = bytes;
  auto next = c->free_ranges.lower_bound(offset);
  if (next != c->free_ranges.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      start = prev->first;
      len += prev->second;
      c->free_ranges.erase(prev);
    }
  }
  if (next != c->free_ranges.end() && offset + bytes == next->first) {
    len += next->second;
    c->free_ranges.erase(next);
  }
  c->free_ranges[start] = len;
}

size_t tag_bytes_on(const Tag* tag, int ordinal) {
  size_t total = 0;
  for (const Chunk* c : tag->chunks) total += c->device == ordinal ? c->size : 0;
  return total;
}

// A chunk for `bytes`: as large as the tag is already (geometric growth, capped), falling back to
// exactly what is needed when the device cannot hold the larger one.
Status grow(Tag* tag, int ordinal, const Device& d, size_t bytes, Chunk** out) {
  const size_t need = round_up(bytes, d.granularity);
  const size_t target = std::min(reg().chunk_bytes, std::max(tag_bytes_on(tag, ordinal), d.granularity));
  const size_t first = std::max(need, round_up(target, d.granularity));
  Status st = new_chunk(tag, ordinal, d, first, out);
  if (st.code == kOutOfMemory && first > need) st = new_chunk(tag, ordinal, d, need, out);
  return st;
}

Tag* find_tag(const std::string& name) {
  auto it = reg().tags.find(name);
  return it == reg().tags.end() ? nullptr : it->second;
}

std::string known_tags() {
  std::string out;
  for (auto& kv : reg().tags) out += (out.empty() ? "'" : ", '") + kv.first + "'";
  return out.empty() ? "none" : out;
}

}  // namespace

Status open_tag(const std::string& name, bool cpu_backup) {
  if (name.empty()) return make_status(kUsage, "a tag name must not be empty");
  std::lock_guard<std::mutex> lock(reg().mu);
  Tag* tag = find_tag(name);
  if (tag == nullptr) {
    tag = new Tag;
    tag->name = name;
    tag->cpu_backup = cpu_backup;
    reg().tags[name] = tag;
  } else if (tag->cpu_backup != cpu_backup) {
    return make_status(kUsage, "tag '" + name + "' was opened with cpu_backup=" +
                                   (tag->cpu_backup ? "True" : "False") +
                                   "; a tag keeps one setting, use another tag name");
  }
  return {};
}

Status set_thread_tag(const char* name) {
  if (name == nullptr) {
    t_tag = nullptr;
    return {};
  }
  std::lock_guard<std::mutex> lock(reg().mu);
  Tag* tag = find_tag(name);
  if (tag == nullptr) return make_status(kUsage, std::string("unknown tag '") + name + "'");
  t_tag = tag;
  return {};
}

bool has_thread_tag() { return t_tag != nullptr; }

Status allocate(size_t size, int ordinal, CUstream stream, bool sync_device_on_free, void** out) {
  *out = nullptr;
  SAVER_RETURN_IF_ERROR(load_driver(nullptr));
  Tag* tag = t_tag;
  trace("allocate %zu bytes on device %d, stream %p, tag '%s'", size, ordinal, static_cast<void*>(stream),
        tag ? tag->name.c_str() : "(none)");
  if (tag == nullptr) return make_status(kUsage, "allocation outside a saver region");
  if (size == 0) return {};
  std::lock_guard<std::mutex> lock(reg().mu);
  if (tag->paused) {
    return make_status(kUsage, "tag '" + tag->name + "' is paused: resume it before allocating in it");
  }
  Device* d = nullptr;
  SAVER_RETURN_IF_ERROR(device(ordinal, &d));
  const size_t bytes = round_up(size, kSegmentAlign);
  size_t offset = 0;
  Chunk* chunk = nullptr;
  for (Chunk* c : tag->chunks) {
    if (c->device == ordinal && c->mapped && carve(c, bytes, &offset)) {
      chunk = c;
      break;
    }
  }
  if (chunk == nullptr) {
    SAVER_RETURN_IF_ERROR(grow(tag, ordinal, *d, bytes, &chunk));
    carve(chunk, bytes, &offset);
  }
  const CUdeviceptr ptr = chunk->base + offset;
  reg().segments[ptr] = Segment{chunk, offset, bytes, stream, sync_device_on_free};
  trace("  -> 0x%llx", static_cast<unsigned long long>(ptr));
  *out = reinterpret_cast<void*>(ptr);
  return {};
}

namespace {

// Waits for the work that may still use a segment, without holding the registry lock.
Status wait_for_users(const Segment& seg, int ordinal) {
  ScopedContext scope;
  SAVER_RETURN_IF_ERROR(scope.enter(reg().devices[ordinal]));
  if (seg.sync_device_on_free) return CU_CALL(cuCtxSynchronize);
  return CU_CALL(cuStreamSynchronize, seg.stream);
}

}  // namespace

Status release(void* ptr, bool* found) {
  const uintptr_t key = reinterpret_cast<uintptr_t>(ptr);
  Segment seg;
  bool mapped = false;
  int ordinal = 0;
  {
    std::lock_guard<std::mutex> lock(reg().mu);
    auto it = reg().segments.find(key);
    *found = it != reg().segments.end();
    trace("release %p (%s)", ptr, *found ? "ours" : "not ours");
    if (!*found) return {};
    seg = it->second;
    mapped = seg.chunk->mapped;
    ordinal = seg.chunk->device;
  }
  if (mapped) SAVER_RETURN_IF_ERROR(wait_for_users(seg, ordinal));
  std::lock_guard<std::mutex> lock(reg().mu);
  auto it = reg().segments.find(key);
  if (it == reg().segments.end()) return make_status(kUsage, "pointer freed twice");
  Chunk* chunk = it->second.chunk;
  give_back(chunk, it->second.offset, it->second.bytes);
  reg().segments.erase(it);
  if (chunk->live_bytes == 0) return destroy_chunk(chunk);
  return {};
}

Status set_chunk_bytes(size_t bytes) {
  if (bytes == 0) return make_status(kUsage, "chunk_bytes must be positive");
  std::lock_guard<std::mutex> lock(reg().mu);
  reg().chunk_bytes = bytes;
  return {};
}

// ---------------------------------------------------------------------------------------------
// transition: pause some tags and resume others

namespace {

// Live bytes of a chunk as maximal contiguous runs, each cut into copy pieces.
template <typename Fn>
Status for_each_piece(const Chunk* c, Fn fn) {
  auto it = c->live.begin();
  while (it != c->live.end()) {
    size_t start = it->first, end = it->first + it->second;
    for (++it; it != c->live.end() && it->first == end; ++it) end += it->second;
    for (size_t off = start; off < end; off += kCopyPiece) {
      SAVER_RETURN_IF_ERROR(fn(off, std::min(kCopyPiece, end - off)));
    }
  }
  return {};
}

Status copy_chunk(Chunk* c, bool to_host, CUstream stream, uint64_t* bytes) {
  char* host = static_cast<char*>(c->shadow.ptr);
  return for_each_piece(c, [&](size_t off, size_t n) -> Status {
    *bytes += n;
    if (to_host) return CU_CALL(cuMemcpyDtoHAsync, host + off, c->base + off, n, stream);
    return CU_CALL(cuMemcpyHtoDAsync, c->base + off, host + off, n, stream);
  });
}

class Transition {
 public:
  Transition(std::vector<Tag*> pause, std::vector<Tag*> resume, Stats* stats)
      : pause_(std::move(pause)), resume_(std::move(resume)), stats_(stats) {}

  Status run() {
    SAVER_RETURN_IF_ERROR(quiesce_devices());
    SAVER_RETURN_IF_ERROR(prepare_backups());
    Status paused = start_pause();
    Status resumed = paused.ok() ? resume_all() : Status{};
    Status finished = finish_pause();
    for (Tag* t : pause_) t->paused = true;
    if (!paused.ok()) return paused;
    if (!finished.ok()) return finished;
    return resumed;
  }

 private:
  // Kernels on any stream may still use the memory being paused: wait once per device.
  Status quiesce_devices() {
    std::set<int> devices;
    for (Tag* t : pause_)
      for (Chunk* c : t->chunks) devices.insert(c->device);
    for (int ordinal : devices) {
      ScopedContext scope;
      SAVER_RETURN_IF_ERROR(scope.enter(reg().devices[ordinal]));
      SAVER_RETURN_IF_ERROR(CU_CALL(cuCtxSynchronize));
    }
    return {};
  }

  // Pins every shadow this pause needs before anything is unmapped, so a host that cannot pin
  // leaves the tag active and untouched.
  Status prepare_backups() {
    auto start = std::chrono::steady_clock::now();
    for (Tag* t : pause_) {
      if (!t->cpu_backup) continue;
      for (Chunk* c : t->chunks) {
        if (!c->mapped || c->live_bytes == 0) continue;
        ScopedContext scope;
        SAVER_RETURN_IF_ERROR(scope.enter(reg().devices[c->device]));
        if (c->shadow.ptr == nullptr) SAVER_RETURN_IF_ERROR(pin_host(c->size, &c->shadow));
        if (c->copied == nullptr) {
          SAVER_RETURN_IF_ERROR(CU_CALL(cuEventCreate, &c->copied, CU_EVENT_DISABLE_TIMING));
        }
      }
    }
    stats_->pin_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return {};
  }

  // Queues the backup copies and unmaps chunks that need none right away.
  Status start_pause() {
    for (Tag* t : pause_) {
      for (Chunk* c : t->chunks) {
        if (!c->mapped) continue;
        const Device& d = reg().devices[c->device];
        ScopedContext scope;
        SAVER_RETURN_IF_ERROR(scope.enter(d));
        if (t->cpu_backup && c->live_bytes > 0) {
          SAVER_RETURN_IF_ERROR(copy_chunk(c, true, d.to_host, &stats_->to_host_bytes));
          SAVER_RETURN_IF_ERROR(CU_CALL(cuEventRecord, c->copied, d.to_host));
          pending_.push_back(c);
        } else {
          SAVER_RETURN_IF_ERROR(unmap_chunk(c));
          stats_->released_bytes += c->size;
        }
      }
    }
    return {};
  }

  // Unmaps the oldest chunk whose backup is in flight; false when none is left.
  Status finish_one(bool* done_one) {
    *done_one = false;
    if (next_pending_ >= pending_.size()) return {};
    Chunk* c = pending_[next_pending_++];
    ScopedContext scope;
    SAVER_RETURN_IF_ERROR(scope.enter(reg().devices[c->device]));
    SAVER_RETURN_IF_ERROR(CU_CALL(cuEventSynchronize, c->copied));
    c->shadow_valid = true;
    SAVER_RETURN_IF_ERROR(unmap_chunk(c));
    stats_->released_bytes += c->size;
    *done_one = true;
    return {};
  }

  Status finish_pause() {
    Status first;
    for (bool more = true; more;) {
      Status st = finish_one(&more);
      if (!st.ok() && first.ok()) first = st;
      if (!st.ok()) more = next_pending_ < pending_.size();
    }
    return first;
  }

  // Maps one chunk, making room by finishing pending pauses while the device is full.
  Status map_with_room(Chunk* c) {
    const Device& d = reg().devices[c->device];
    for (;;) {
      Status st = map_chunk(d, c);
      if (st.code != kOutOfMemory) return st;
      bool freed = false;
      SAVER_RETURN_IF_ERROR(finish_one(&freed));
      if (!freed) return st;
    }
  }

  Status resume_all() {
    std::vector<Chunk*> mapped_now;
    for (Tag* t : resume_) {
      for (Chunk* c : t->chunks) {
        if (c->mapped) continue;
        const Device& d = reg().devices[c->device];
        ScopedContext scope;
        Status st = scope.enter(d);
        if (st.ok()) st = map_with_room(c);
        if (st.ok()) mapped_now.push_back(c);
        if (st.ok() && t->cpu_backup && c->shadow_valid)
          st = copy_chunk(c, false, d.to_device, &stats_->to_device_bytes);
        if (!st.ok()) return roll_back(mapped_now, c, st);
      }
    }
    SAVER_RETURN_IF_ERROR(wait_restores(mapped_now));
    for (Chunk* c : mapped_now) {
      c->shadow_valid = false;
      stats_->restored_bytes += c->size;
    }
    for (Tag* t : resume_) t->paused = false;
    return {};
  }

  Status wait_restores(const std::vector<Chunk*>& chunks) {
    std::set<int> devices;
    for (Chunk* c : chunks) devices.insert(c->device);
    for (int ordinal : devices) {
      const Device& d = reg().devices[ordinal];
      ScopedContext scope;
      SAVER_RETURN_IF_ERROR(scope.enter(d));
      SAVER_RETURN_IF_ERROR(CU_CALL(cuStreamSynchronize, d.to_device));
    }
    return {};
  }

  // Undoes a failed resume: every chunk it mapped is unmapped again, so the tags stay paused
  // with their backups, and the error says how much memory was missing.
  Status roll_back(const std::vector<Chunk*>& mapped_now, Chunk* failed, Status cause) {
    Status undo = wait_restores(mapped_now);
    for (Chunk* c : mapped_now) {
      ScopedContext scope;
      if (undo.ok()) undo = scope.enter(reg().devices[c->device]);
      if (undo.ok()) undo = unmap_chunk(c);
    }
    if (!undo.ok()) return undo;
    if (cause.code != kOutOfMemory) return cause;
    return out_of_memory(failed, cause);
  }

  Status out_of_memory(Chunk* failed, const Status& cause) {
    size_t needed = 0;
    std::string names;
    for (Tag* t : resume_) {
      names += (names.empty() ? "'" : ", '") + t->name + "'";
      for (Chunk* c : t->chunks) needed += (!c->mapped && c->device == failed->device) ? c->size : 0;
    }
    size_t free_bytes = 0, total = 0;
    ScopedContext scope;
    if (scope.enter(reg().devices[failed->device]).ok()) drv().cuMemGetInfo(&free_bytes, &total);
    const size_t missing = needed > free_bytes ? needed - free_bytes : 0;
    return make_status(
        kOutOfMemory,
        "resume of " + names + " needs " + gib(needed) + " on device " +
            std::to_string(failed->device) + " but " + gib(free_bytes) + " are free (" +
            gib(missing) + " missing, " + std::to_string(missing) + " bytes); " +
            "the tag stays paused with its contents: free device memory and resume again. "
            "Driver: " + cause.message);
  }

  std::vector<Tag*> pause_;
  std::vector<Tag*> resume_;
  Stats* stats_;
  std::vector<Chunk*> pending_;
  size_t next_pending_ = 0;
};

Status select_tags(const std::vector<std::string>& names, bool all, bool want_paused,
                   std::vector<Tag*>* out) {
  if (all) {
    for (auto& kv : reg().tags)
      if (kv.second->paused == want_paused) out->push_back(kv.second);
    return {};
  }
  for (const std::string& name : names) {
    Tag* t = find_tag(name);
    if (t == nullptr) {
      return make_status(kUsage, "unknown tag '" + name + "' (known: " + known_tags() + ")");
    }
    if (t->paused != want_paused) {
      return make_status(kUsage, "tag '" + name + "' is " + (t->paused ? "already paused" : "not paused"));
    }
    out->push_back(t);
  }
  return {};
}

}  // namespace

Status transition(const std::vector<std::string>& pause, bool all_active,
                  const std::vector<std::string>& resume, bool all_paused, Stats* stats) {
  SAVER_RETURN_IF_ERROR(load_driver(nullptr));
  std::lock_guard<std::mutex> lock(reg().mu);
  std::vector<Tag*> to_pause, to_resume;
  SAVER_RETURN_IF_ERROR(select_tags(pause, all_active, false, &to_pause));
  SAVER_RETURN_IF_ERROR(select_tags(resume, all_paused, true, &to_resume));
  for (Tag* t : to_pause) {
    if (t == t_tag) {
      return make_status(kUsage, "tag '" + t->name + "' is this thread's current region: leave it first");
    }
    if (std::find(to_resume.begin(), to_resume.end(), t) != to_resume.end()) {
      return make_status(kUsage, "tag '" + t->name + "' cannot be paused and resumed at once");
    }
  }
  if (tracing()) {
    std::string names;
    for (Tag* t : to_pause) names += " pause '" + t->name + "'";
    for (Tag* t : to_resume) names += " resume '" + t->name + "'";
    trace("transition:%s", names.c_str());
  }
  return Transition(std::move(to_pause), std::move(to_resume), stats).run();
}

// ---------------------------------------------------------------------------------------------
// report

namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

void tag_json(std::ostringstream& o, const Tag* t) {
  size_t held = 0, paused = 0, live = 0, backed = 0, host = 0, segments = 0;
  std::set<int> devices;
  for (const Chunk* c : t->chunks) {
    (c->mapped ? held : paused) += c->size;
    live += c->live_bytes;
    backed += c->shadow_valid ? c->live_bytes : 0;
    host += c->shadow.bytes;
    segments += c->live.size();
    devices.insert(c->device);
  }
  o << "{\"name\":" << json_string(t->name) << ",\"cpu_backup\":" << (t->cpu_backup ? "true" : "false")
    << ",\"paused\":" << (t->paused ? "true" : "false") << ",\"chunks\":" << t->chunks.size()
    << ",\"segments\":" << segments << ",\"held_bytes\":" << held << ",\"paused_bytes\":" << paused
    << ",\"live_bytes\":" << live << ",\"backed_up_bytes\":" << backed << ",\"host_bytes\":" << host
    << ",\"devices\":[";
  const char* sep = "";
  for (int dv : devices) {
    o << sep << dv;
    sep = ",";
  }
  o << "]}";
}

}  // namespace

std::string report_json() {
  std::lock_guard<std::mutex> lock(reg().mu);
  std::ostringstream o;
  o << "{\"chunk_bytes\":" << reg().chunk_bytes << ",\"tags\":[";
  const char* sep = "";
  for (auto& kv : reg().tags) {
    o << sep;
    tag_json(o, kv.second);
    sep = ",";
  }
  o << "]}";
  return o.str();
}

}  // namespace saver
