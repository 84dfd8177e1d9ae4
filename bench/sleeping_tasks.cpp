// Memory per sleeping task: spawns N tasks (default 100,000) that each `co_await squall::sleep`
// for an hour, and reports the heap bytes (mallinfo2) and resident memory they added, per task.
#include <malloc.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "squall/core/awaitables.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"

namespace {

squall::Task<void> nap(squall::Loop& loop) {
  co_await squall::sleep(loop, std::chrono::hours(1));
}

long resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

}  // namespace

int main(int argc, char** argv) {
  const long count = argc > 1 ? std::atol(argv[1]) : 100'000;
  squall::Loop loop;
  const auto heap_before = static_cast<long>(mallinfo2().uordblks);
  const long resident_before = resident_bytes();
  // Each task runs up to its sleep (its timer is started) before spawn returns.
  for (long i = 0; i < count; ++i) squall::spawn(loop, nap(loop));
  const auto heap_after = static_cast<long>(mallinfo2().uordblks);
  const long resident_after = resident_bytes();
  std::printf("tasks %ld heap_bytes_per_task %.0f resident_bytes_per_task %.0f\n", count,
              static_cast<double>(heap_after - heap_before) / static_cast<double>(count),
              static_cast<double>(resident_after - resident_before) / static_cast<double>(count));
  return loop.close() == 0 ? 0 : 1;  // Destroys the sleeping frames and closes their timers.
}
