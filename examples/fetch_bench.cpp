// A load generator on http::Client: keeps N fetches in flight to one URL for a while, then prints
// one JSON line with the fetches per second and the client's CPU time per fetch (getrusage:
// user + system, every thread of the process). bench/run_client.sh runs it against nginx.
//   build/examples/fetch_bench --concurrency 100 --seconds 10 http://127.0.0.1:8080/plaintext
// {"fetches":250000,"errors":0,"non_2xx":0,"seconds":10.0,"fetches_per_s":25000,
//  "cpu_us_per_fetch":38.1,"connections":100}
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/http/client.hpp>

using namespace squall;

namespace {

double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

[[noreturn]] void usage(std::string_view problem) {
  std::cerr << "fetch_bench: " << problem
            << "\nusage: fetch_bench [--concurrency N] [--seconds S] [--warmup S] URL\n";
  std::exit(64);
}

}  // namespace

int main(int argc, char** argv) {
  std::string url;
  long concurrency = 100;
  double seconds = 10;
  double warmup = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--concurrency" && i + 1 < argc) {
      concurrency = std::strtol(argv[++i], nullptr, 10);
    } else if (arg == "--seconds" && i + 1 < argc) {
      seconds = std::strtod(argv[++i], nullptr);
    } else if (arg == "--warmup" && i + 1 < argc) {
      warmup = std::strtod(argv[++i], nullptr);
    } else if (!arg.empty() && arg[0] == '-') {
      usage("unknown option " + std::string(arg));
    } else {
      url = argv[i];
    }
  }
  if (url.empty() || concurrency < 1 || seconds <= 0 || warmup < 0) usage("bad arguments");

  ignore_sigpipe();
  Loop loop;
  {
    http::ClientOptions options;
    options.max_in_flight = static_cast<std::size_t>(concurrency);
    options.max_in_flight_per_host = static_cast<std::size_t>(concurrency);
    options.max_idle_connections = static_cast<std::size_t>(concurrency);
    http::Client client(loop, options);

    using Clock = std::chrono::steady_clock;
    const auto warm_until = Clock::now() + std::chrono::duration<double>(warmup);
    const auto stop_at = warm_until + std::chrono::duration<double>(seconds);
    bool measuring = false;
    bool stopping = false;
    std::uint64_t fetches = 0, errors = 0, non_2xx = 0;
    double cpu_start = 0;
    Clock::time_point measure_start;
    std::string first_error;

    http::FetchRequest request;
    request.url = url;
    std::function<void()> launch;
    auto on_result = [&](http::FetchResult result) {
      if (!result.ok()) {
        if (first_error.empty()) first_error = result.error().what();
        if (measuring) ++errors;
      } else if (measuring) {
        ++fetches;
        if (result.response().status / 100 != 2) ++non_2xx;
      }
      const auto now = Clock::now();
      if (!measuring && now >= warm_until) {
        measuring = true;
        measure_start = now;
        cpu_start = cpu_seconds();
      }
      if (now >= stop_at) {
        if (!stopping) {
          stopping = true;
          const double elapsed =
              measuring ? std::chrono::duration<double>(now - measure_start).count() : 0.0;
          const double cpu = measuring ? cpu_seconds() - cpu_start : 0.0;
          std::printf(
              "{\"fetches\":%llu,\"errors\":%llu,\"non_2xx\":%llu,\"seconds\":%.3f,"
              "\"fetches_per_s\":%.0f,\"cpu_us_per_fetch\":%.2f,\"concurrency\":%ld}\n",
              static_cast<unsigned long long>(fetches), static_cast<unsigned long long>(errors),
              static_cast<unsigned long long>(non_2xx), elapsed,
              elapsed > 0 ? static_cast<double>(fetches) / elapsed : 0.0,
              fetches > 0 ? cpu * 1e6 / static_cast<double>(fetches) : 0.0, concurrency);
          if (!first_error.empty()) std::fprintf(stderr, "first error: %s\n", first_error.c_str());
          std::fflush(stdout);
        }
        if (client.in_flight() == 0) loop.stop();
        return;
      }
      launch();
    };
    launch = [&] { client.fetch(request, on_result); };
    for (long i = 0; i < concurrency; ++i) launch();
    loop.run();
  }
  return loop.close() == 0 ? 0 : 1;
}
