#include "trace.h"

#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace saver {
namespace {

constexpr unsigned kRing = 128;
constexpr size_t kLine = 192;
constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};

std::atomic<int> g_level{0};
std::atomic<unsigned> g_next{0};
char g_ring[kRing][kLine];
struct sigaction g_previous[64];
std::once_flag g_once;

// Async-signal-safe output: write(2) of literal text and of unsigned numbers.
void put(const char* text) {
  ssize_t ignored = write(STDERR_FILENO, text, std::strlen(text));
  (void)ignored;
}

void put_number(unsigned long long value, int base) {
  char buf[32];
  int at = sizeof(buf);
  buf[--at] = '\0';
  do {
    buf[--at] = "0123456789abcdef"[value % base];
    value /= base;
  } while (value && at > 0);
  put(buf + at);
}

void dump_ring() {
  const unsigned end = g_next.load();
  const unsigned start = end > kRing ? end - kRing : 0;
  for (unsigned i = start; i < end; ++i) {
    const char* line = g_ring[i % kRing];
    put("  ");
    ssize_t ignored = write(STDERR_FILENO, line, strnlen(line, kLine));
    (void)ignored;
    put("\n");
  }
}

void on_fatal(int sig, siginfo_t* info, void*) {
  put("\n[saver trace] fatal signal ");
  put_number(sig, 10);
  put(" (fault address 0x");
  put_number(reinterpret_cast<unsigned long long>(info ? info->si_addr : nullptr), 16);
  put(", thread ");
  put_number(static_cast<unsigned long long>(pthread_self()), 16);
  put("); the saver's last calls, oldest first:\n");
  dump_ring();
  Dl_info self;
  if (dladdr(reinterpret_cast<void*>(&on_fatal), &self)) {
    put("[saver trace] ");
    put(self.dli_fname ? self.dli_fname : "?");
    put(" is loaded at 0x");
    put_number(reinterpret_cast<unsigned long long>(self.dli_fbase), 16);
    put("; native backtrace:\n");
  }
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
  // Hand on to the previous handler (Python's faulthandler, or the default action).
  sigaction(sig, &g_previous[sig], nullptr);
  raise(sig);
}

void install() {
  const char* env = std::getenv("FP8MOE_SAVER_DEBUG");
  const int level = env ? std::atoi(env) : 0;
  if (level <= 0) return;
  void* warm[2];
  backtrace(warm, 2);  // loads libgcc's unwinder now, not inside the signal handler
  struct sigaction action = {};
  action.sa_sigaction = on_fatal;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  for (int sig : kSignals) sigaction(sig, &action, &g_previous[sig]);
  g_level.store(level);
  trace("tracing on (FP8MOE_SAVER_DEBUG=%d)", level);
}

}  // namespace

void trace_init() { std::call_once(g_once, install); }

bool tracing() { return g_level.load(std::memory_order_relaxed) > 0; }

void trace(const char* fmt, ...) {
  if (!tracing()) return;
  char* line = g_ring[g_next.fetch_add(1) % kRing];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(line, kLine, fmt, args);
  va_end(args);
  if (g_level.load(std::memory_order_relaxed) >= 2) std::fprintf(stderr, "[saver trace] %s\n", line);
}

}  // namespace saver
