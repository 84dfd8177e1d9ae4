// A coroutine handler that fetches ten URLs at once and answers when all are in (the "parallel
// fetches" program of Tornado's guide: `responses = await multi([fetch(u) for u in urls])`).
// The ten fetches share the loop, so the answer takes about as long as the slowest fetch, not
// the sum. Build with `make examples`, then:
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

#include <squall/core/awaitables.hpp>
#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/http/client.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

namespace {

// One fetch's outcome: its status, or its error's text (a failure does not stop the others).
struct Outcome {
  int status = 0;
  std::string error;
};

Task<Outcome> fetch_one(http::Client& client, std::string url) {
  http::FetchRequest request;
  request.url = std::move(url);
  request.total_timeout = std::chrono::seconds(10);
  try {
    const http::FetchResponse response = co_await client.fetch(std::move(request));
    co_return Outcome{response.status, {}};
  } catch (const http::FetchError& error) {
    co_return Outcome{0, error.what()};
  }
}

// The handler: parameters by value (the coroutine outlives the call that started it).
Task<void> gather(http::Client& client, std::string upstream, std::string count,
                  http::Responder responder) {
  const long n = std::strtol(count.c_str(), nullptr, 10);
  if (n < 1 || n > 100) {
    responder.send(400, "text/plain", "n must be between 1 and 100\n");
    co_return;
  }
  const auto started = std::chrono::steady_clock::now();
  std::vector<Task<Outcome>> fetches;
  for (long i = 0; i < n; ++i) {
    fetches.push_back(fetch_one(
        client,
        upstream + (upstream.find('?') == std::string::npos ? "?i=" : "&i=") + std::to_string(i)));
  }
  const std::vector<Outcome> outcomes = co_await when_all(std::move(fetches));
  std::vector<int> statuses;
  std::vector<std::string> errors;
  for (const Outcome& outcome : outcomes) {
    statuses.push_back(outcome.status);
    if (!outcome.error.empty()) errors.push_back(outcome.error);
  }
  const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - started);
  const nlohmann::json answer = {{"fetches", statuses.size()},
                                 {"statuses", statuses},
                                 {"errors", errors},
                                 {"elapsed_ms", elapsed.count()}};
  responder.send(errors.empty() ? 200 : 502, "application/json", answer.dump() + "\n");
}

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
      return gather(client, upstream, request.query("n").value_or("10"), std::move(responder));
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
