// One fetch in callback style (Tornado's AsyncHTTPClient.fetch(request, callback)): the loop
// runs, the callback gets a response or an error, the loop stops. Build with `make examples`:
//   build/examples/fetch_callback http://127.0.0.1:8080/plaintext
//   build/examples/fetch_callback --cacert ca.pem --follow 5 --max-body 1000000 https://...
// Prints "status 200", one "header Name: value" line per header, "effective_url ...",
// "redirects N", "timings_us dns=.. connect=.. tls=.. first_byte=.. total=..",
// "body_bytes N", a blank line and the body; or "error KIND: MESSAGE" on stderr. Exit status:
// 0 for any HTTP status, 1 for an error, 64 for a usage problem.
#include <csignal>
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

constexpr std::string_view kUsage =
    "usage: fetch_callback [--method M] [--header 'Name: value']... [--data BODY]\n"
    "                      [--cacert FILE] [--follow MAX] [--max-body BYTES]\n"
    "                      [--connect-timeout MS] [--timeout MS] URL\n";

[[noreturn]] void usage(std::string_view problem) {
  std::cerr << "fetch_callback: " << problem << "\n" << kUsage;
  std::exit(64);
}

long number(std::string_view option, const char* text) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*text == '\0' || *end != '\0' || value < 0) usage(std::string(option) + " needs a number");
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  http::FetchRequest request;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--method" && has_value) {
      request.method = argv[++i];
    } else if (arg == "--header" && has_value) {
      const std::string line = argv[++i];
      const auto colon = line.find(':');
      if (colon == std::string::npos) usage("--header needs 'Name: value'");
      const auto start = line.find_first_not_of(' ', colon + 1);
      request.headers.emplace_back(line.substr(0, colon),
                                   start == std::string::npos ? "" : line.substr(start));
    } else if (arg == "--data" && has_value) {
      request.body = argv[++i];
      if (request.method == "GET") request.method = "POST";
    } else if (arg == "--cacert" && has_value) {
      request.ca_file = argv[++i];
    } else if (arg == "--follow" && has_value) {
      request.follow_redirects = true;
      request.max_redirects = static_cast<int>(number(arg, argv[++i]));
    } else if (arg == "--max-body" && has_value) {
      request.max_body_size = static_cast<std::size_t>(number(arg, argv[++i]));
    } else if (arg == "--connect-timeout" && has_value) {
      request.connect_timeout = std::chrono::milliseconds(number(arg, argv[++i]));
    } else if (arg == "--timeout" && has_value) {
      request.total_timeout = std::chrono::milliseconds(number(arg, argv[++i]));
    } else if (!arg.empty() && arg[0] == '-') {
      usage("unknown option or missing value: " + std::string(arg));
    } else {
      request.url = argv[i];
    }
  }
  if (request.url.empty()) usage("a URL is needed");

  ignore_sigpipe();
  Loop loop;
  int exit_status = 0;
  {
    http::Client client(loop);
    try {
      client.fetch(std::move(request), [&](http::FetchResult result) {
        if (!result.ok()) {
          std::cerr << "error " << http::to_string(result.error().kind()) << ": "
                    << result.error().what() << "\n";
          exit_status = 1;
        } else {
          const http::FetchResponse& response = result.response();
          std::cout << "status " << response.status << "\n";
          for (const auto& [name, value] : response.headers) {
            std::cout << "header " << name << ": " << value << "\n";
          }
          const auto& t = response.timings;
          std::cout << "effective_url " << response.effective_url << "\n"
                    << "redirects " << response.redirects << "\n"
                    << "timings_us dns=" << t.dns.count() << " connect=" << t.connect.count()
                    << " tls=" << t.tls.count() << " first_byte=" << t.first_byte.count()
                    << " total=" << t.total.count() << "\n"
                    << "body_bytes " << response.body.size() << "\n\n"
                    << response.body;
        }
        loop.stop();
      });
    } catch (const std::exception& error) {
      std::cerr << "fetch_callback: " << error.what() << "\n";
      return 64;
    }
    SignalWatcher on_int(loop, SIGINT, [&] {
      client.close();  // The callback gets `cancelled` and stops the loop.
    });
    loop.run();
  }
  return loop.close() == 0 ? exit_status : 2;
}
