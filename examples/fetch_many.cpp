// A handler that fetches ten URLs at once and answers when all are in (the "parallel fetches"
// program of Tornado's guide), callback style: each fetch's callback counts down, the last one
// answers. The ten fetches share the loop, so the answer takes about as long as the slowest
// fetch, not the sum. Build with `make examples`, then:
//   build/examples/fetch_many http://127.0.0.1:8000/slow 8081
//   curl 'localhost:8081/gather?n=10'
// The answer is JSON: {"fetches":10,"statuses":[200,...],"errors":[],"elapsed_ms":512}.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/loop.hpp"
#include "core/signals.hpp"
#include "http/client.hpp"
#include "http/router.hpp"
#include "http/server.hpp"

using namespace squall;

namespace {

// What one /gather request collects while its fetches run.
struct Gathering {
  http::Responder responder;
  std::vector<int> statuses;
  std::vector<std::string> errors;
  std::size_t left = 0;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: fetch_many UPSTREAM_URL [PORT]\n");
    return 64;
  }
  const std::string upstream = argv[1];
  const auto port = static_cast<std::uint16_t>(argc > 2 ? std::atoi(argv[2]) : 8081);
  ignore_sigpipe();
  Loop loop;
  {
    http::Client client(loop);
    http::Router router;
    router.add("GET", "/gather", [&](http::Request& request, http::Responder responder) {
      const long n = std::strtol(request.query("n").value_or("10").c_str(), nullptr, 10);
      if (n < 1 || n > 100) {
        responder.send(400, "text/plain", "n must be between 1 and 100\n");
        return;
      }
      auto gathering = std::make_shared<Gathering>();
      gathering->responder = responder;
      gathering->statuses.resize(static_cast<std::size_t>(n));
      gathering->left = static_cast<std::size_t>(n);
      for (long i = 0; i < n; ++i) {
        http::FetchRequest fetch;
        fetch.url = upstream + (upstream.find('?') == std::string::npos ? "?i=" : "&i=") +
                    std::to_string(i);
        fetch.total_timeout = std::chrono::seconds(10);
        client.fetch(std::move(fetch), [gathering, i](http::FetchResult result) {
          if (result.ok()) {
            gathering->statuses[static_cast<std::size_t>(i)] = result.response().status;
          } else {
            gathering->errors.emplace_back(result.error().what());
          }
          if (--gathering->left > 0) return;
          const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
              std::chrono::steady_clock::now() - gathering->started);
          const nlohmann::json answer = {{"fetches", gathering->statuses.size()},
                                         {"statuses", gathering->statuses},
                                         {"errors", gathering->errors},
                                         {"elapsed_ms", elapsed.count()}};
          gathering->responder.send(gathering->errors.empty() ? 200 : 502, "application/json",
                                    answer.dump() + "\n");
        });
      }
    });
    http::Server server(loop, std::make_shared<const http::Router>(std::move(router)), {});
    std::printf("listening on %s\n", server.listen("127.0.0.1", port).c_str());
    std::fflush(stdout);
    auto stop = [&] {
      client.close();
      server.drain(std::chrono::seconds(5), [&] { loop.stop(); });
    };
    SignalWatcher on_int(loop, SIGINT, stop);
    SignalWatcher on_term(loop, SIGTERM, stop);
    loop.run();
  }
  return loop.close() == 0 ? 0 : 1;
}
