// squalld: command line -> config -> logging -> loop -> routes -> signals -> run.
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "config/config.hpp"
#include "core/loop.hpp"
#include "core/loop_lag.hpp"
#include "core/signals.hpp"
#include "http/router.hpp"
#include "http/server.hpp"
#include "log/log.hpp"
#include "metrics/metrics.hpp"
#include "server/routes.hpp"

#ifndef SQUALL_VERSION
#define SQUALL_VERSION "0.1.0"
#endif

namespace {

using namespace squall;

struct CommandLine {
  std::string config_path;          // --config; empty means built-in defaults.
  bool check_config = false;        // --check-config
  std::vector<std::string> listen;  // --listen, replacing [server] listen.
  std::string port_file;            // --port-file
};

// Raises the soft descriptor limit to the hard one: every connection costs a descriptor.
void raise_descriptor_limit(std::size_t max_connections) {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  if (limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    getrlimit(RLIMIT_NOFILE, &limit);
  }
  if (limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < max_connections + 64) {
    spdlog::warn(
        "the descriptor limit ({}) is below server.max_connections ({}) + 64: raise "
        "LimitNOFILE (ulimit -n) or lower server.max_connections",
        limit.rlim_cur, max_connections);
  }
}

// Writes `text` to `path` atomically (temporary file, then rename) so a reader never sees half.
void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string temporary = path + ".tmp." + std::to_string(getpid());
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << text;
    if (!out.flush()) throw std::runtime_error("cannot write " + temporary);
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    throw std::runtime_error("cannot rename " + temporary + " to " + path);
  }
}

http::ServerOptions server_options(const Config& config) {
  http::ServerOptions options;
  options.limits.max_url_bytes = config.limits.max_url_bytes;
  options.limits.max_header_bytes = config.limits.max_header_bytes;
  options.limits.max_header_count = config.limits.max_header_count;
  options.limits.max_body_bytes = config.limits.max_body_bytes;
  options.limits.max_chunk_extension_bytes = config.limits.max_chunk_extension_bytes;
  options.limits.write_buffer_high_water = config.limits.write_buffer_high_water;
  options.timeouts.header = config.timeouts.header;
  options.timeouts.body = config.timeouts.body;
  options.timeouts.keepalive = config.timeouts.keepalive;
  options.timeouts.write = config.timeouts.write;
  options.timeouts.lingering = config.timeouts.lingering;
  options.server_name = config.server.name;
  options.max_connections = config.server.max_connections;
  options.backlog = config.server.backlog;
  options.blocking_threshold = config.loop.blocking_threshold;
  return options;
}

log::Options log_options(const Config& config) {
  log::Options options;
  options.level = config.log.level;
  options.error_log = config.log.error_log;
  options.access_log = config.log.access_log;
  options.access_json = config.log.access_format == AccessLogFormat::json;
  return options;
}

void log_access(log::Logs& logs, const http::RequestRecord& record) {
  log::AccessRecord access;
  if (record.request != nullptr) {
    const http::Request& request = *record.request;
    access.remote_address = request.remote_address();
    access.method = request.method();
    access.target = request.target();
    access.http_major = request.http_major();
    access.http_minor = request.http_minor();
    access.referer = request.header("referer").value_or("");
    access.user_agent = request.header("user-agent").value_or("");
  }
  access.status = record.status;
  access.body_bytes_sent = record.body_bytes_sent;
  access.duration = std::chrono::duration_cast<std::chrono::microseconds>(record.duration);
  access.time = std::chrono::system_clock::now();
  access.connection_id = record.connection_id;
  logs.access(access);
}

int serve(const CommandLine& command_line, Config config) {
  log::Logs logs(log_options(config));
  ignore_sigpipe();
  raise_descriptor_limit(config.server.max_connections);

  Loop loop;
  auto router = std::make_shared<http::Router>();
  metrics::Registry registry;
  const auto started = std::chrono::steady_clock::now();
  int exit_code = 0;
  {
    http::Server server(loop, router, server_options(config));
    std::optional<daemon::HttpMetrics> http_metrics;
    LoopLagMonitor lag(loop, config.loop.lag_interval, [&http_metrics](double seconds) {
      if (http_metrics) http_metrics->observe_loop_lag(seconds);
    });
    daemon::add_builtin_routes(
        *router, std::make_shared<const daemon::BuiltinRoutes>(
                     daemon::BuiltinRoutes{config, &server, &lag, &registry, started}));
    http_metrics.emplace(registry, *router, server, &lag, logs);
    server.on_request([&http_metrics, &logs](const http::RequestRecord& record) {
      http_metrics->observe(record);
      if (logs.access_enabled()) log_access(logs, record);
    });

    std::string bound;
    for (const ListenAddress& address : config.server.listen) {
      const std::string where = server.listen(address.host, address.port);
      spdlog::info("listening on {}", where);
      bound += where + "\n";
    }
    if (!command_line.port_file.empty()) write_file_atomically(command_line.port_file, bound);

    bool stopping = false;
    auto shut_down = [&](const char* signal_name) {
      if (stopping) {
        spdlog::warn("{} again while draining: exiting now", signal_name);
        exit_code = 1;
        server.close_all();
        loop.stop();
        return;
      }
      stopping = true;
      spdlog::info("{}: draining {} connections (timeouts.drain {} ms)", signal_name,
                   server.stats().connections_open, config.timeouts.drain.count());
      server.drain(config.timeouts.drain, [&] {
        spdlog::info("drained: exiting");
        loop.stop();
      });
    };
    SignalWatcher on_term(loop, SIGTERM, [&] { shut_down("SIGTERM"); });
    SignalWatcher on_int(loop, SIGINT, [&] { shut_down("SIGINT"); });
    SignalWatcher on_usr1(loop, SIGUSR1, [&] {
      spdlog::info("SIGUSR1: reopening log files");
      logs.reopen();
    });
    spdlog::info("squalld {} ready: {} listener(s), pid {}", SQUALL_VERSION,
                 config.server.listen.size(), getpid());
    loop.run();
  }
  spdlog::info("stopped");
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"squalld: an asynchronous HTTP/1.1 server on one libuv event loop"};
  CommandLine command_line;
  app.add_option("-c,--config", command_line.config_path, "TOML configuration file")
      ->check(CLI::ExistingFile);
  app.add_flag("--check-config", command_line.check_config,
               "Validate the configuration and exit (0 valid, 1 invalid)");
  app.add_option("--listen", command_line.listen,
                 "ADDR:PORT to listen on, replacing [server] listen (repeatable; port 0 picks "
                 "a free port)");
  app.add_option("--port-file", command_line.port_file,
                 "Write the bound ADDR:PORT of each listener to FILE once listening");
  app.set_version_flag("-V,--version", std::string("squalld ") + SQUALL_VERSION);
  CLI11_PARSE(app, argc, argv);

  Config config;
  try {
    if (!command_line.config_path.empty()) config = load_config_file(command_line.config_path);
    if (!command_line.listen.empty()) {
      config.server.listen.clear();
      for (const std::string& text : command_line.listen) {
        try {
          config.server.listen.push_back(parse_listen_address(text));
        } catch (const std::invalid_argument& error) {
          throw ConfigError("--listen " + text + ": " + error.what());
        }
      }
    }
  } catch (const ConfigError& error) {
    std::cerr << "squalld: " << error.what() << "\n";
    return 1;
  }
  if (command_line.check_config) {
    std::cout << "squalld: "
              << (command_line.config_path.empty() ? "built-in defaults" : command_line.config_path)
              << ": configuration is valid\n";
    return 0;
  }
  try {
    return serve(command_line, std::move(config));
  } catch (const std::exception& error) {
    spdlog::critical("squalld: {}", error.what());
    std::cerr << "squalld: " << error.what() << "\n";
    return 1;
  }
}
