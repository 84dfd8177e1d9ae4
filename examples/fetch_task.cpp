// One fetch in coroutine style (Tornado's `response = await AsyncHTTPClient().fetch(url)`): a
// Task awaits the response, an error arrives as a thrown FetchError. Build with
// `make examples`:
//   build/examples/fetch_task http://127.0.0.1:8080/plaintext
//   build/examples/fetch_task --timeout 2000 http://127.0.0.1:8080/plaintext
// Prints "status 200", one "header Name: value" line per header, "body_bytes N", a blank line
// and the body; or "error KIND: MESSAGE" on stderr. Exit status: 0 for any HTTP status, 1 for
// an error, 64 for a usage problem.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <stop_token>
#include <string>
#include <string_view>

#include <squall/core/awaitables.hpp>
#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/http/client.hpp>

using namespace squall;

namespace {

// The program's one task: fetch, print, stop the loop. Parameters by value.
Task<void> fetch_and_print(Loop& loop, http::Client& client, http::FetchRequest request,
                           int& exit_status) {
  try {
    const http::FetchResponse response = co_await client.fetch(std::move(request));
    std::cout << "status " << response.status << "\n";
    for (const auto& [name, value] : response.headers) {
      std::cout << "header " << name << ": " << value << "\n";
    }
    std::cout << "body_bytes " << response.body.size() << "\n\n" << response.body;
  } catch (const http::FetchError& error) {
    std::cerr << "error " << http::to_string(error.kind()) << ": " << error.what() << "\n";
    exit_status = 1;
  } catch (const CancelledError&) {
    std::cerr << "error cancelled: interrupted\n";
    exit_status = 1;
  }
  loop.stop();
}

}  // namespace

int main(int argc, char** argv) {
  http::FetchRequest request;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--timeout" && i + 1 < argc) {
      request.total_timeout = std::chrono::milliseconds(std::atol(argv[++i]));
    } else if (!arg.empty() && arg[0] != '-' && request.url.empty()) {
      request.url = argv[i];
    } else {
      std::cerr << "usage: fetch_task [--timeout MS] URL\n";
      return 64;
    }
  }
  if (request.url.empty()) {
    std::cerr << "usage: fetch_task [--timeout MS] URL\n";
    return 64;
  }

  ignore_sigpipe();
  Loop loop;
  int exit_status = 0;
  {
    http::Client client(loop);
    std::stop_source interrupt;
    spawn(loop, fetch_and_print(loop, client, std::move(request), exit_status),
          interrupt.get_token());
    // Ctrl-C cancels the task, and so its fetch.
    SignalWatcher on_int(loop, SIGINT, [&] { interrupt.request_stop(); });
    loop.run();
  }
  return loop.close() == 0 ? exit_status : 2;
}
