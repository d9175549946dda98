// Diagnostics for failures that leave no error message behind.
//
// A crash inside the driver or inside PyTorch's allocator (SIGSEGV and friends) kills the process
// before any Status can reach Python. With FP8MOE_SAVER_DEBUG=1 in the environment the library
// keeps the last entry points and driver calls it made in a small ring (every CU_CALL, every
// allocator hook, every map and unmap with its address and size), and on a fatal signal writes
// that ring and a native backtrace (library offsets for addr2line) to stderr, then hands the
// signal on to whatever handler was there before (Python's faulthandler prints the Python stack).
// FP8MOE_SAVER_DEBUG=2 also prints every entry as it is made. Off (the default) it costs one
// branch per driver call.
#pragma once

namespace saver {

// Reads FP8MOE_SAVER_DEBUG once and, when set, installs the fatal-signal handler.
void trace_init();

bool tracing();

// Records one line (printf format) in the ring; a no-op unless tracing.
void trace(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace saver
