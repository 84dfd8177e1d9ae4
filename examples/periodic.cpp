// A periodic callback, Tornado's PeriodicCallback: Loop::call_every runs a function on a fixed
// grid until it is cancelled. When a run (or anything else on the loop) overruns the period, the
// missed runs are skipped, not bunched. Build with `make examples`, then:
//   build/examples/periodic --period-ms 100 --count 10
// Prints "tick N at +T ms" for each run and exits 0 after COUNT runs, or on SIGINT / SIGTERM.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>

using namespace squall;

int main(int argc, char** argv) {
  long period_ms = 100;
  long count = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--period-ms") {
      period_ms = std::strtol(argv[i + 1], nullptr, 10);
    } else if (arg == "--count") {
      count = std::strtol(argv[i + 1], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: periodic [--period-ms N] [--count N]\n");
      return 64;
    }
  }
  if (period_ms < 1 || count < 1) {
    std::fprintf(stderr, "periodic: --period-ms and --count must be at least 1\n");
    return 64;
  }
  Loop loop;
  const std::uint64_t start = loop.now_ms();
  long ticks = 0;
  Loop::TimerId timer = 0;
  timer = loop.call_every(std::chrono::milliseconds(period_ms), [&] {
    ++ticks;
    std::printf("tick %ld at +%llu ms\n", ticks,
                static_cast<unsigned long long>(loop.now_ms() - start));
    std::fflush(stdout);
    if (ticks == count) {
      loop.cancel(timer);  // A periodic callback may cancel itself.
      loop.stop();
    }
  });
  SignalWatcher on_int(loop, SIGINT, [&] { loop.stop(); });
  SignalWatcher on_term(loop, SIGTERM, [&] { loop.stop(); });
  loop.run();
  return 0;
}
