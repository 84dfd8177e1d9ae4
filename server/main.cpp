// squalld: command line -> config -> (daemonize) -> logging -> loop -> listeners -> privileges
// -> services -> READY -> run; SIGHUP reloads the configuration, SIGTERM drains.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sqlite3.h>
#include <CLI/CLI.hpp>

#include "core/tsan_suppressions.hpp"
#include "server/access.hpp"
#include "server/config.hpp"
#include "server/jobs_service.hpp"
#include "server/routes.hpp"
#include "server/workers.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/loop_lag.hpp"
#include "squall/core/signals.hpp"
#include "squall/daemon/daemonize.hpp"
#include "squall/daemon/privileges.hpp"
#include "squall/daemon/systemd.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"
#include "squall/jobs/pg_store.hpp"
#include "squall/log/log.hpp"
#include "squall/mail/maildir.hpp"
#include "squall/mail/smtp.hpp"
#include "squall/metrics/metrics.hpp"
#include "squall/net/listener.hpp"

#ifndef SQUALL_VERSION
#define SQUALL_VERSION "0.1.0"
#endif

namespace {

using namespace squall;
using namespace squall::squalld;
namespace fs = std::filesystem;

// After the drain deadline, how long sends aborted then may take to end and release their jobs
// (libcurl checks the abort flag about once a second) before the loop stops regardless.
constexpr std::chrono::milliseconds kAbortGrace{2'000};

struct CommandLine {
  std::string config_path;          // --config; empty means built-in defaults. Made absolute.
  bool check_config = false;        // --check-config
  std::vector<std::string> listen;  // --listen, replacing [server] listen.
  std::string port_file;            // --port-file. Made absolute.
  bool daemonize = false;           // --daemon
  std::string pid_file;             // --pid-file. Made absolute.
  std::string new_token;            // --new-token NAME: print a token and its line, exit.
};

// What main() prepared before serving: it outlives the daemon.
struct Startup {
  const CommandLine& command_line;
  fs::path base_directory;                   // The starting directory: relative paths in the
                                             // config are resolved against it, also on reload.
  std::vector<daemon::ListenFd> inherited;   // Sockets from systemd (socket activation).
  daemon::PidFile* pid_file = nullptr;       // --pid-file, locked.
  daemon::Daemonizer* daemonizer = nullptr;  // --daemon: tells the starting process the outcome.
  bool daemon_refused = false;               // --daemon given under systemd.
};

// `path` made absolute against `base` (empty stays empty).
std::string absolute_from(const fs::path& base, const std::string& path) {
  if (path.empty() || path.front() == '/') return path;
  return (base / path).lexically_normal().string();
}

// Relative paths in the config are relative to the directory squalld was started in, and stay
// so after --daemon's chdir("/") and on reload: they are made absolute here.
void resolve_paths(Config& config, const fs::path& base) {
  for (std::string* target : {&config.log.error_log, &config.log.access_log}) {
    if (*target != "stderr" && *target != "off") *target = absolute_from(base, *target);
  }
  if (config.jobs.store != ":memory:" && !config.jobs.store.starts_with("file:") &&
      !jobs::is_postgresql_url(config.jobs.store)) {
    config.jobs.store = absolute_from(base, config.jobs.store);
  }
  config.smtp.password_file = absolute_from(base, config.smtp.password_file);
  if (config.smtp.url.starts_with(mail::maildir_scheme)) {
    config.smtp.url = std::string(mail::maildir_scheme) +
                      absolute_from(base, config.smtp.url.substr(mail::maildir_scheme.size()));
  }
  config.smtp.ca_file = absolute_from(base, config.smtp.ca_file);
  config.auth.tokens_file = absolute_from(base, config.auth.tokens_file);
  config.webhooks.secret_file = absolute_from(base, config.webhooks.secret_file);
}

// The configuration as the command line asks for it: the --config file (or the defaults), with
// --listen replacing [server] listen and relative paths resolved. Used at start and on reload.
// Throws ConfigError naming the file, line and key.
Config load_configuration(const CommandLine& command_line, const fs::path& base) {
  Config config;
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
  resolve_paths(config, base);
  return config;
}

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
  options.limits = config.limits;
  options.timeouts = config.timeouts;  // The connection's timeouts; drain is squalld's own.
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
  // journald timestamps lines and files them by the "<N>" priority prefix.
  options.journal = config.log.error_log == "stderr" && daemon::stderr_is_journal();
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

// The running daemon: its workers (servers, routes and metrics), listeners, signals, reloads.
class Squalld {
 public:
  Squalld(const Startup& startup, Config config, log::Logs& logs, Loop& loop)
      : startup_(startup),
        config_(std::move(config)),
        logs_(logs),
        loop_(loop),
        worker_count_(config_.server.workers == 0 ? squalld::usable_cores()
                                                  : config_.server.workers),
        http_metrics_(registry_, logs_) {
    builtin_ = std::make_shared<const squalld::BuiltinRoutes>(squalld::BuiltinRoutes{
        &registry_, &http_metrics_, started_,
        [this]() -> const char* { return jobs_ ? jobs_->store_status() : nullptr; },
        [this] { return stopping_; },
        [this] {
          std::uint64_t open = 0;
          for (const auto& worker : workers_) open += worker->server->stats().connections_open;
          return open;
        },
        [this] {
          double largest = 0;
          for (const auto& worker : workers_) {
            largest = std::max(largest, worker->lag->last_lag_seconds());
          }
          return largest;
        }});
    // Worker 0 lives on this loop; the others start once the listeners are open.
    workers_.push_back(std::make_unique<squalld::Worker>(0, loop_));
    set_up_worker(*workers_.front());
    // Signals are watched before the first listener exists: from the "listening on" line on,
    // SIGTERM is a graceful stop and SIGHUP a reload (they run once the loop runs).
    on_term_.emplace(loop_, SIGTERM, [this] { shut_down("SIGTERM"); });
    on_int_.emplace(loop_, SIGINT, [this] { shut_down("SIGINT"); });
    on_hup_.emplace(loop_, SIGHUP, [this] { reload(); });
    on_usr1_.emplace(loop_, SIGUSR1, [this] {
      // Queued after the reopen request, so this line is the first one in the new files.
      logs_.reopen();
      spdlog::info("SIGUSR1: log files reopened");
    });
  }

  // The other workers first (each tears down its own loop on its thread), then worker 0's
  // objects, then the job service: no answer is left to come back to a worker.
  ~Squalld() {
    watchdog_.reset();
    for (auto& worker : workers_) worker->stop();
    for (auto& worker : workers_) worker->join();
    workers_.front()->tear_down();
    jobs_.reset();
  }

  // Everything between the configuration and READY=1. Throws on failure (the caller exits 1).
  void start() {
    // Before anything is bound: an open mail relay on a public address is refused here.
    try {
      access_ = squalld::AccessControl::build(
          config_, squalld::exposure_of(config_, !startup_.inherited.empty()));
    } catch (const std::exception& error) {
      throw std::runtime_error(config_name() + ": " + error.what());
    }
    daemon::notify_status("Starting: opening listeners");
    const std::vector<std::string> listening = open_listeners();
    // --port-file as soon as the listeners are bound, while squalld may still be root (the
    // service user may not be able to write there); a start-up that fails after this takes the
    // file back (withdraw_port_file, from serve()). The notes follow it: tests rely on the order.
    write_port_file();
    for (const std::string& note : listening) spdlog::info("{}", note);
    if (startup_.pid_file != nullptr) startup_.pid_file->write(getpid());
    // Root is needed no further than this: binding, log files, the pid file.
    const std::string dropped = daemon::drop_privileges(config_.server.user, config_.server.group);
    if (!dropped.empty()) spdlog::info("{}", dropped);

    // ---- Things that must be ready before READY=1 -----------------------------------------
    // Whatever must work before systemd (or --daemon's parent) is told the service is up.
    // After the privilege drop, so files created here belong to the service user; before the
    // router, so build_router() can add routes that use these services.
    daemon::notify_status("Starting: opening the job store " + config_.jobs.store);
    jobs_ = std::make_unique<squalld::JobsService>(loop_, config_, registry_);
    jobs_->start();
    // ---- End of the things that must be ready before READY=1 ------------------------------

    install_router(*workers_.front(), build_router(config_, access_, *workers_.front()));
    start_other_workers();
    start_watchdog();
    spdlog::info("squalld {} ready: {} listener(s), {} worker(s), pid {}", SQUALL_VERSION,
                 listeners_.size(), workers_.size(), getpid());
    if (startup_.daemonizer != nullptr) {
      logs_.flush();  // Start-up lines reach the terminal before stderr goes to /dev/null.
      startup_.daemonizer->report_ready();
    }
    daemon::notify_ready(serving_status());
  }

  int exit_code() const noexcept { return exit_code_; }

  // A start-up that fails once the port file exists (the job store refused, say) takes the file
  // back, so that whoever waits for it does not connect to a squalld on its way out. It is
  // written as soon as the listeners are bound, while squalld may still be root; after a
  // privilege drop its directory may not let the service user remove it, which is said.
  void withdraw_port_file() const noexcept {
    if (!port_file_written_) return;  // Never one this squalld did not write.
    const std::string& path = startup_.command_line.port_file;
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      spdlog::warn("--port-file {}: cannot remove it after the failed start: {}", path,
                   std::strerror(errno));
    }
  }

 private:
  // One configured address and what it is bound to ("127.0.0.1:0" -> "127.0.0.1:41234").
  struct OpenListener {
    ListenAddress configured;
    std::string bound;
  };
  // A listening socket waiting to be adopted by worker `worker` (index >= 1).
  struct Handover {
    std::size_t worker;
    int fd;
  };

  // A worker's loop-owned objects, made on its loop thread (the primary's in the constructor).
  void set_up_worker(squalld::Worker& worker) {
    worker.desk = std::make_unique<squalld::AnswerDesk>(worker.loop(), loop_);
    worker.observer = std::make_unique<squalld::HttpMetrics::Observer>(http_metrics_);
    squalld::HttpMetrics::Observer* observer = worker.observer.get();
    worker.lag = std::make_unique<LoopLagMonitor>(
        worker.loop(), config_.loop.lag_interval,
        [observer](double seconds) { observer->observe_loop_lag(seconds); });
    worker.server = std::make_unique<http::Server>(
        worker.loop(), std::make_shared<const http::Router>(), server_options(config_),
        worker.primary() ? std::make_shared<http::SharedLimits>()
                         : workers_.front()->server->shared_limits());
    worker.server->number_connections(worker.index() + 1, worker_count_);
    worker.server->on_request([observer, &logs = logs_](const http::RequestRecord& record) {
      observer->observe(record);
      if (logs.access_enabled()) log_access(logs, record);
    });
  }

  // Workers 1..N-1: each on its own thread, adopting its sockets, with the routes in force.
  void start_other_workers() {
    http_metrics_.add_worker(*workers_.front()->server, *workers_.front()->lag);
    for (std::size_t index = 1; index < worker_count_; ++index) {
      auto worker = std::make_unique<squalld::Worker>(index, loop_);
      std::vector<int> fds;
      for (const Handover& handover : handovers_) {
        if (handover.worker == index) fds.push_back(handover.fd);
      }
      // The main thread waits while the setup runs: config_ and access_ are not changing.
      worker->start_thread([this, &fds](squalld::Worker& self) {
        set_up_worker(self);
        for (int fd : fds) self.server->adopt_listener(fd);
        install_router(self, build_router(config_, access_, self));
      });
      http_metrics_.add_worker(*worker->server, *worker->lag);
      workers_.push_back(std::move(worker));
    }
    handovers_.clear();
  }

  // The watchdog pings from this loop while every worker's loop proves it runs: each beats
  // every quarter of the ping period, and a beat older than the period stops the pings.
  void start_watchdog() {
    watchdog_.emplace(loop_, [this] {
      const auto period = static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::milliseconds>(watchdog_->interval()).count());
      return std::all_of(workers_.begin(), workers_.end(),
                         [period](const auto& worker) { return worker->beating_within(period); });
    });
    if (!watchdog_->enabled() || workers_.size() == 1) return;
    const auto period = std::max<std::uint64_t>(
        1,
        static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::milliseconds>(watchdog_->interval()).count()) /
            4);
    for (auto& worker : workers_) {
      squalld::Worker* target = worker.get();
      target->remote().call_soon([target, period] { target->start_heartbeat(period); });
    }
  }

  // The routes a configuration asks for, for one worker's loop: at start and on every reload.
  std::shared_ptr<const http::Router> build_router(
      const Config& config, std::shared_ptr<const squalld::AccessControl> access,
      squalld::Worker& worker) const {
    auto router = std::make_shared<http::Router>();
    squalld::add_builtin_routes(*router, config.routes, config.auth, builtin_, access,
                                *worker.desk);
    if (jobs_) jobs_->add_routes(*router, config, access, *worker.desk);
    return router;
  }

  // On the worker's loop thread.
  static void install_router(squalld::Worker& worker, std::shared_ptr<const http::Router> router) {
    worker.observer->set_routes(*router);
    worker.server->set_router(std::move(router));
  }

  // The sockets of one address for every worker: worker 0's adopted now, the others' kept in
  // `handovers` for their workers. With one worker, a plain listener as ever (no SO_REUSEPORT,
  // so a second squalld on the same port fails to bind). Returns the bound address; throws
  // std::system_error naming the address, having closed what it opened.
  std::string listen_everywhere(const ListenAddress& address, std::vector<Handover>& handovers) {
    http::Server& first = *workers_.front()->server;
    if (worker_count_ == 1) return first.listen(address.host, address.port);
    std::vector<int> fds;
    try {
      fds.push_back(
          net::open_reuseport_socket(address.host, address.port, config_.server.backlog, true));
      const std::uint16_t port = net::bound_port(fds.front());
      for (std::size_t index = 1; index < worker_count_; ++index) {
        fds.push_back(
            net::open_reuseport_socket(address.host, port, config_.server.backlog, false));
      }
    } catch (...) {
      for (int fd : fds) ::close(fd);
      throw;
    }
    std::string bound;
    try {
      bound = first.adopt_listener(fds.front());  // The listener owns it from now on.
    } catch (...) {
      for (std::size_t i = 1; i < fds.size(); ++i) ::close(fds[i]);
      throw;
    }
    for (std::size_t index = 1; index < fds.size(); ++index)
      handovers.push_back({index, fds[index]});
    return bound;
  }

  // Binds every listener; returns what to log once the port file exists.
  std::vector<std::string> open_listeners() {
    std::vector<std::string> notes;
    http::Server& first = *workers_.front()->server;
    if (!startup_.inherited.empty()) {
      // Socket activation: systemd owns the addresses; [server] listen is not used. Every
      // worker accepts from the same socket (a duplicate descriptor each).
      socket_activated_ = true;
      for (const daemon::ListenFd& passed : startup_.inherited) {
        const std::string bound = first.adopt_listener(passed.fd);
        for (std::size_t index = 1; index < worker_count_; ++index) {
          const int copy = ::fcntl(passed.fd, F_DUPFD_CLOEXEC, 3);
          if (copy < 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "cannot duplicate the socket from systemd (descriptor " +
                                        std::to_string(passed.fd) + ") for a worker");
          }
          handovers_.push_back({index, copy});
        }
        listeners_.push_back({ListenAddress{}, bound});
        notes.push_back(fmt::format("listening on {} (socket \"{}\" from systemd, descriptor {})",
                                    bound, passed.name, passed.fd));
      }
      notes.push_back("[server] listen is ignored: the listening sockets come from systemd");
      if (worker_count_ > 1) {
        notes.push_back(
            fmt::format("{} workers accept from each socket from systemd", worker_count_));
      }
    } else {
      for (const ListenAddress& address : config_.server.listen) {
        const std::string bound = listen_everywhere(address, handovers_);
        listeners_.push_back({address, bound});
        notes.push_back("listening on " + bound);
      }
      if (worker_count_ > 1) {
        notes.push_back(fmt::format(
            "{} workers accept on each address, a socket each (SO_REUSEPORT)", worker_count_));
      }
    }
    return notes;
  }

  // --port-file: every bound address, one a line (at start and after the list changes).
  void write_port_file() {
    if (startup_.command_line.port_file.empty()) return;
    std::string text;
    for (const OpenListener& open : listeners_) text += open.bound + "\n";
    write_file_atomically(startup_.command_line.port_file, text);
    port_file_written_ = true;
  }

  std::string serving_status() const {
    std::string status = "Serving on";
    for (std::size_t i = 0; i < listeners_.size(); ++i) {
      status += (i == 0 ? " " : ", ") + listeners_[i].bound;
    }
    return status;
  }

  std::string config_name() const {
    return startup_.command_line.config_path.empty() ? "the built-in defaults"
                                                     : startup_.command_line.config_path;
  }

  // SIGHUP: the same --config file again (with the same --listen overrides), validated as a
  // whole before any of it applies; an invalid one is refused and the old one stays in force.
  // Every worker then applies it on its own loop; READY=1 follows once all of them have.
  void reload() {
    if (stopping_) {
      spdlog::info("SIGHUP while draining: not reloading");
      return;
    }
    daemon::notify_reloading("Reloading " + config_name());
    spdlog::info("SIGHUP: reloading {}", config_name());
    try {
      apply(load_configuration(startup_.command_line, startup_.base_directory));
    } catch (const std::exception& error) {
      spdlog::error("reload refused, the running configuration stays in force: {}", error.what());
      daemon::notify_ready(std::string("Reload failed: ") + error.what() +
                           "; running the previous configuration. " + serving_status());
      return;
    }
  }

  // Applies `next`, or throws having changed nothing.
  void apply(Config next) {
    // 1. Whatever can fail, before anything changes.
    log::parse_level(next.log.level);
    // The tokens file is read again, so a reload adds and revokes tokens.
    std::shared_ptr<const squalld::AccessControl> access =
        squalld::AccessControl::build(next, squalld::exposure_of(next, socket_activated_));
    std::vector<std::shared_ptr<const http::Router>> routers;  // One per worker.
    for (auto& worker : workers_) routers.push_back(build_router(next, access, *worker));
    http::ServerOptions options = server_options(next);

    std::vector<OpenListener> listeners;  // The new list, in the new config's order.
    std::vector<OpenListener> opened;     // Opened by this reload.
    std::vector<Handover> handovers;      // Their sockets for the other workers.
    http::Server& first = *workers_.front()->server;
    auto undo = [&] {
      for (const OpenListener& open : opened) first.close_listener(open.bound);
      for (const Handover& handover : handovers) ::close(handover.fd);
    };
    if (socket_activated_) {
      listeners = listeners_;
      if (next.server.listen != config_.server.listen) {
        spdlog::info("[server] listen changed but is ignored: the sockets come from systemd");
      }
    } else {
      for (const ListenAddress& address : next.server.listen) {
        const auto existing =
            std::find_if(listeners_.begin(), listeners_.end(),
                         [&](const OpenListener& open) { return open.configured == address; });
        if (existing != listeners_.end()) {
          listeners.push_back(*existing);
          continue;
        }
        try {
          const std::string bound = listen_everywhere(address, handovers);
          opened.push_back({address, bound});
          listeners.push_back({address, bound});
        } catch (const std::exception& error) {
          undo();
          throw std::runtime_error(std::string("[server] listen: ") + error.what());
        }
      }
    }
    // [smtp] and [jobs]: all or nothing (a password file may be unreadable), and last, so a
    // failure only has the listeners just opened to undo.
    try {
      if (jobs_) jobs_->reconfigure(next);
    } catch (const std::exception&) {
      undo();
      throw;
    }

    // 2. Apply; nothing below throws. Worker 0 now, the others on their loops.
    std::vector<std::string> closed;  // Bound addresses no longer configured.
    for (const OpenListener& old : listeners_) {
      const bool kept = std::any_of(listeners.begin(), listeners.end(),
                                    [&](const auto& open) { return open.bound == old.bound; });
      if (!kept) closed.push_back(old.bound);
    }
    first.reconfigure(options);
    install_router(*workers_.front(), routers.front());
    access_ = std::move(access);
    logs_.set_level(next.log.level);
    const bool listeners_changed = !opened.empty() || listeners.size() != listeners_.size();
    listeners_ = std::move(listeners);
    if (listeners_changed) {
      try {
        write_port_file();
      } catch (const std::exception& error) {
        spdlog::warn("reload: --port-file: {}", error.what());
      }
    }
    for (const OpenListener& open : opened) spdlog::info("listening on {}", open.bound);

    if (next.server.max_connections > config_.server.max_connections) {
      raise_descriptor_limit(next.server.max_connections);
    }
    std::vector<std::string> restart_keys = restart_needed(next);
    config_ = std::move(next);

    // Each other worker applies the same on its own loop, accepting what its sockets of the
    // addresses no longer configured still queue before closing them; worker 0's sockets,
    // which receive every new connection for those addresses meanwhile, close last (as in a
    // drain: steer_to_first_worker).
    steer_to_first_worker(closed);
    auto adopt = [handovers](squalld::Worker& worker) {
      for (const Handover& handover : handovers) {
        if (handover.worker != worker.index()) continue;
        try {
          worker.server->adopt_listener(handover.fd);
        } catch (const std::exception& error) {
          spdlog::error("worker {}: {}", worker.index(), error.what());
        }
      }
    };
    after_other_workers(
        [options, routers, adopt, closed](squalld::Worker& worker, const RemoteLoop&) {
          worker.server->reconfigure(options);
          install_router(worker, routers[worker.index()]);
          adopt(worker);
          for (const std::string& bound : closed) worker.server->close_listener(bound);
        },
        [this, closed, restart_keys = std::move(restart_keys)] {
          for (const std::string& bound : closed) {
            if (workers_.front()->server->close_listener(bound)) {
              spdlog::info("stopped listening on {}", bound);
            }
          }
          spdlog::info("configuration reloaded from {}", config_name());
          // Logged after the line above, so that a level raised to warn still shows these.
          for (const std::string& key : restart_keys) {
            spdlog::warn("reload: {} changed; the new value takes effect at the next restart", key);
          }
          daemon::notify_ready(serving_status() + " (configuration reloaded)");
        },
        [handovers](squalld::Worker& worker) {
          for (const Handover& handover : handovers) {
            if (handover.worker == worker.index()) ::close(handover.fd);
          }
        });
  }

  // The keys of `next` that differ from the running configuration and need a restart.
  std::vector<std::string> restart_needed(const Config& next) const {
    std::vector<std::string> keys;
    auto changed = [&keys](bool differs, const char* key) {
      if (differs) keys.emplace_back(key);
    };
    changed(next.log.error_log != config_.log.error_log, "[log] error_log");
    changed(next.log.access_log != config_.log.access_log, "[log] access_log");
    changed(next.log.access_format != config_.log.access_format, "[log] access_format");
    changed(next.server.thread_pool_size != config_.server.thread_pool_size,
            "[server] thread_pool_size");
    changed(next.server.user != config_.server.user, "[server] user");
    changed(next.server.group != config_.server.group, "[server] group");
    changed(next.server.workers != config_.server.workers, "[server] workers");
    changed(next.loop.lag_interval != config_.loop.lag_interval, "[loop] lag_interval");
    changed(next.jobs.store != config_.jobs.store, "[jobs] store");
    changed(next.jobs.durability != config_.jobs.durability, "[jobs] durability");
    changed(next.webhooks.url != config_.webhooks.url, "[webhooks] url");
    changed(next.webhooks.secret_file != config_.webhooks.secret_file, "[webhooks] secret_file");
    changed(next.webhooks.timeout != config_.webhooks.timeout, "[webhooks] timeout");
    changed(next.webhooks.max_attempts != config_.webhooks.max_attempts, "[webhooks] max_attempts");
    return keys;
  }

  // With SO_REUSEPORT sockets, makes the kernel give every new connection for these addresses
  // to worker 0's socket, the first of each group, so that the other workers' sockets can
  // accept what they queue and close without the kernel queueing (then resetting) one more in
  // between. Linux's net.ipv4.tcp_migrate_req = 1 would instead move a closing socket's queue
  // to another socket of its group; it is off by default and squalld does not need it.
  void steer_to_first_worker(const std::vector<std::string>& addresses) const {
    if (worker_count_ == 1 || socket_activated_) return;
    for (const auto& listener : workers_.front()->server->listeners()) {
      if (std::find(addresses.begin(), addresses.end(), listener->bound_address()) ==
          addresses.end()) {
        continue;
      }
      const int status = net::steer_reuseport_group_to_first(listener->descriptor());
      if (status < 0) {
        spdlog::warn(
            "cannot steer new connections on {} to one worker ({}): a connection arriving while "
            "a worker closes its socket may be reset",
            listener->bound_address(), uv_strerror(status));
      }
    }
  }

  // Runs `each` on every worker but 0, on its own loop, then `last` on this loop once all of
  // them have (at once with one worker). `gone` runs here instead of `each` for a worker whose
  // loop no longer runs.
  void after_other_workers(std::function<void(squalld::Worker&, const RemoteLoop&)> each,
                           std::function<void()> last,
                           std::function<void(squalld::Worker&)> gone = nullptr) {
    auto waiting = std::make_shared<std::size_t>(workers_.size());
    auto one_done = [waiting, last = std::move(last)] {
      if (--*waiting == 0) last();
    };
    for (std::size_t index = 1; index < workers_.size(); ++index) {
      squalld::Worker* worker = workers_[index].get();
      const bool posted =
          worker->remote().call_soon([worker, each, one_done, primary = loop_.remote()] {
            each(*worker, primary);
            primary.call_soon(one_done);
          });
      if (!posted) {
        if (gone) gone(*worker);
        one_done();
      }
    }
    one_done();
  }

  // On the worker's own loop.
  static void log_worker_drain(squalld::Worker& worker) {
    spdlog::info("worker {}: draining {} connections", worker.index(),
                 worker.server->stats().connections_open);
  }

  void shut_down(const char* signal_name) {
    if (stopping_) {
      spdlog::warn("{} again while draining: exiting now", signal_name);
      exit_code_ = 1;
      for (auto& worker : workers_) {
        squalld::Worker* target = worker.get();
        if (target->primary()) {
          target->server->close_all();
        } else {
          target->remote().call_soon([target] { target->server->close_all(); });
        }
      }
      loop_.stop();
      return;
    }
    stopping_ = true;
    std::uint64_t connections = 0;
    for (const auto& worker : workers_) connections += worker->server->stats().connections_open;
    // systemd waits for the drain deadline plus a margin, even if TimeoutStopSec= is shorter.
    daemon::notify_stopping("Draining " + std::to_string(connections) + " connection(s)",
                            config_.timeouts.drain + std::chrono::seconds(5));
    spdlog::info("{}: draining {} connections (timeouts.drain {} ms)", signal_name, connections,
                 config_.timeouts.drain.count());
    // Every worker's connections and the running sends drain side by side; the last one to
    // finish stops the loop (this loop; the destructor stops the others).
    auto remaining = std::make_shared<std::size_t>(workers_.size() + (jobs_ ? 1 : 0));
    auto one_done = [this, remaining] {
      if (--*remaining > 0) return;
      spdlog::info("drained: exiting");
      loop_.stop();
    };
    if (jobs_) {
      jobs_->drain([one_done] {
        spdlog::info("running sends finished; unsent jobs stay queued for the next start");
        one_done();
      });
    }
    // Each server accepts what its listeners still queue, then closes them. Worker 0's
    // sockets receive every new connection from now on and close last, once the other
    // workers' have closed: no connection is queued on a socket after its last accept.
    // Worker 0 drains at once meanwhile (what it answers says Connection: close).
    const auto deadline = config_.timeouts.drain;
    std::vector<std::string> bound;
    for (const OpenListener& open : listeners_) bound.push_back(open.bound);
    steer_to_first_worker(bound);
    // With several workers each says when its own drain begins (on its own loop), so what it
    // answers from then on is known to say Connection: close.
    if (workers_.size() > 1) log_worker_drain(*workers_.front());
    workers_.front()->server->drain(deadline, one_done, true);
    after_other_workers(
        [deadline, one_done](squalld::Worker& worker, const RemoteLoop& primary) {
          log_worker_drain(worker);  // Only called with several workers.
          worker.server->drain(deadline, [one_done, primary] { primary.call_soon(one_done); });
        },
        [this] { workers_.front()->server->stop_listening(); });
    // At the deadline, sends still running are aborted (libcurl notices within a second) and
    // their jobs released for the next start; the loop stops once that is recorded, or a
    // short grace later whatever happens, so the exit stays bounded by the drain deadline.
    drain_deadline_ = loop_.call_later(config_.timeouts.drain, [this] {
      if (jobs_) jobs_->abort_sends();
      drain_deadline_ = loop_.call_later(kAbortGrace, [this] {
        spdlog::warn(
            "drain deadline passed and aborted sends did not end in time; "
            "their jobs are sent again at the next start");
        loop_.stop();
      });
    });
  }

  const Startup& startup_;
  Config config_;  // The configuration in force.
  log::Logs& logs_;
  Loop& loop_;                      // The primary loop: signals, jobs, metrics, worker 0.
  const std::size_t worker_count_;  // [server] workers, "auto" resolved.
  metrics::Registry registry_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  squalld::HttpMetrics http_metrics_;  // Fed by every worker's Observer.
  // Worker 0 first. Torn down explicitly by the destructor, before jobs_.
  std::vector<std::unique_ptr<squalld::Worker>> workers_;
  std::vector<Handover> handovers_;  // Sockets for workers not started yet.
  std::unique_ptr<squalld::JobsService> jobs_;
  Loop::TimerId drain_deadline_ = 0;  // Stops the loop if sends outlive timeouts.drain.
  std::shared_ptr<const squalld::BuiltinRoutes> builtin_;  // What the built-in routes read.
  std::shared_ptr<const squalld::AccessControl> access_;   // Tokens and rules in force.
  std::vector<OpenListener> listeners_;                    // In the configured order.
  bool socket_activated_ = false;                          // The listeners came from systemd.
  bool port_file_written_ = false;                         // --port-file holds our addresses.
  bool stopping_ = false;                                  // SIGTERM or SIGINT arrived.
  int exit_code_ = 0;
  std::optional<daemon::Watchdog> watchdog_;
  std::optional<SignalWatcher> on_term_;
  std::optional<SignalWatcher> on_int_;
  std::optional<SignalWatcher> on_hup_;
  std::optional<SignalWatcher> on_usr1_;
};

int serve(const Startup& startup, Config config) {
  log::Logs logs(log_options(config));
  if (startup.daemon_refused) {
    spdlog::info(
        "started by systemd (NOTIFY_SOCKET or INVOCATION_ID is set): --daemon is "
        "ignored, staying in the foreground");
  }
  if (startup.command_line.daemonize && config.log.error_log == "stderr" &&
      !startup.daemon_refused) {
    spdlog::warn(
        "--daemon with [log] error_log = \"stderr\": the error log is discarded once "
        "started; set it to a file");
  }
  ignore_sigpipe();
  raise_descriptor_limit(config.server.max_connections);

  Loop loop;
  int exit_code = 0;
  {
    Squalld squalld(startup, std::move(config), logs, loop);
    try {
      squalld.start();
    } catch (...) {
      squalld.withdraw_port_file();
      throw;
    }
    loop.run();
    exit_code = squalld.exit_code();
  }
  spdlog::info("stopped");
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  // Before SQLite's first use: no process-wide count of SQLite's memory, whose mutex every
  // allocation inside SQLite took (8% of the store thread's instructions per accepted job).
  // squalld never asks for sqlite3_memory_used(); a refusal (SQLite already initialised) only
  // leaves the count on.
  sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
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
  app.add_flag("--daemon", command_line.daemonize,
               "Detach into the background once started (ignored under systemd)");
  app.add_option("--pid-file", command_line.pid_file,
                 "Write the daemon's pid to FILE, locked against a second instance, removed "
                 "on exit");
  app.add_option("--new-token", command_line.new_token,
                 "Print a new API token NAME and its line for [auth] tokens_file, then exit");
  app.set_version_flag("-V,--version", std::string("squalld ") + SQUALL_VERSION);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    // --help and --version exit 0; every command-line mistake exits 1, as config errors do.
    return app.exit(error) == 0 ? 0 : 1;
  }
  if (!command_line.new_token.empty()) {
    try {
      std::cout << squalld::new_token_text(command_line.new_token);
    } catch (const std::exception& error) {
      std::cerr << "squalld: --new-token: " << error.what() << "\n";
      return 1;
    }
    return 0;
  }
  // libcurl's global state must be set up before any thread exists.
  mail::global_init();

  // Paths are relative to the starting directory, also after --daemon's chdir("/").
  std::error_code cwd_error;
  const fs::path base = fs::current_path(cwd_error);
  for (std::string* path :
       {&command_line.config_path, &command_line.port_file, &command_line.pid_file}) {
    *path = absolute_from(base, *path);
  }

  Config config;
  try {
    config = load_configuration(command_line, base);
  } catch (const ConfigError& error) {
    std::cerr << "squalld: " << error.what() << "\n";
    return 1;
  }
  if (command_line.check_config) {
    const std::string name =
        command_line.config_path.empty() ? "built-in defaults" : command_line.config_path;
    // Sockets passed by systemd count as public; a check run by hand sees none.
    const bool inherited = std::getenv("LISTEN_FDS") != nullptr;
    const squalld::Exposure exposure = squalld::exposure_of(config, inherited);
    try {
      const auto access = squalld::AccessControl::build(config, exposure);
      std::cout << "squalld: " << name << ": configuration is valid\n"
                << "squalld: access: " << squalld::describe_access(config, exposure, *access)
                << "\n";
    } catch (const std::exception& error) {
      std::cerr << "squalld: " << name << ": " << error.what() << "\n";
      return 1;
    }
    return 0;
  }

  Startup startup{command_line, base, {}, nullptr, nullptr, false};
  std::optional<daemon::Daemonizer> daemonizer;
  std::optional<daemon::PidFile> pid_file;
  int exit_code = 1;
  try {
    // Before daemonizing: LISTEN_PID names this process, and the sockets must be kept open.
    startup.inherited = daemon::listen_fds();
    // libuv sizes its pool from the environment on first use: before the loop exists.
    setenv("UV_THREADPOOL_SIZE", std::to_string(config.server.thread_pool_size).c_str(), 1);
    if (command_line.daemonize) {
      if (daemon::under_systemd()) {
        startup.daemon_refused = true;
      } else {
        std::vector<int> keep;
        for (const daemon::ListenFd& passed : startup.inherited) keep.push_back(passed.fd);
        daemonizer.emplace(daemon::Daemonizer::start(keep));
        startup.daemonizer = &*daemonizer;
      }
    }
    if (!command_line.pid_file.empty()) {
      pid_file.emplace(command_line.pid_file);
      startup.pid_file = &*pid_file;
    }
    exit_code = serve(startup, std::move(config));
  } catch (const daemon::AlreadyRunning& error) {
    std::cerr << error.what() << "\n";
    exit_code = 1;
  } catch (const std::exception& error) {
    spdlog::critical("squalld: {}", error.what());
    std::cerr << "squalld: " << error.what() << "\n";
    exit_code = 1;
  }
  if (daemonizer) daemonizer->report_exit(exit_code);
  return exit_code;
}
