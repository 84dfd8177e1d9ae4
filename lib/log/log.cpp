#include "squall/log/log.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <iterator>
#include <stdexcept>
#include <utility>

#include <fmt/format.h>
#include <spdlog/async.h>
#include <spdlog/async_logger.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "core/background_thread.hpp"

namespace squall::log {

namespace {

constexpr const char* kErrorPattern = "[%Y-%m-%dT%H:%M:%S.%e%z] [%l] %v";
constexpr const char* kAccessPattern = "%v";
// '*' is the syslog priority flag below; journald strips "<N>" and files the line under N.
constexpr const char* kJournalPattern = "<%*>%v";
constexpr auto kFlushTimeout = std::chrono::seconds(5);

std::string errno_text(int err) {
  return std::strerror(err);
}

// Opens a log file for appending. One it creates is 0640 whatever the umask (an admin group
// may read the logs, nobody else); an existing one keeps the mode logrotate or its owner gave it.
int open_append(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0640);
  } while (fd < 0 && errno == EINTR);
  if (fd >= 0) {
    if (::fchmod(fd, 0640) != 0) {
      const int error = errno;
      ::close(fd);
      throw std::runtime_error("cannot chmod 0640 log file \"" + path + "\": " + errno_text(error));
    }
    return fd;
  }
  if (errno == EEXIST) {
    do {
      fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    } while (fd < 0 && errno == EINTR);
  }
  if (fd < 0) {
    throw std::runtime_error("cannot open log file \"" + path + "\": " + errno_text(errno));
  }
  return fd;
}

// The syslog priority of a message's level, as sd-daemon(3) prefixes expect ("<6>").
class SyslogPriorityFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    char digit = '6';
    switch (msg.level) {
      case spdlog::level::trace:
      case spdlog::level::debug:
        digit = '7';
        break;
      case spdlog::level::info:
        digit = '6';
        break;
      case spdlog::level::warn:
        digit = '4';
        break;
      case spdlog::level::err:
        digit = '3';
        break;
      case spdlog::level::critical:
        digit = '2';
        break;
      default:
        break;
    }
    dest.push_back(digit);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<SyslogPriorityFlag>();
  }
};

}  // namespace

namespace detail {

// A sink that writes nothing and counts the flushes the log thread has processed. The queue is
// FIFO with one consumer, so once the flush posted with ticket N is counted, every message
// queued before it has been written.
class FlushBarrier final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  // Waits until `ticket` flushes have been processed or the timeout passes.
  void wait(std::uint64_t ticket) {
    std::unique_lock lock(done_mutex_);
    done_cv_.wait_for(lock, kFlushTimeout, [&] { return done_ >= ticket; });
  }

 protected:
  void sink_it_(const spdlog::details::log_msg&) override {}
  void flush_() override {
    {
      std::lock_guard lock(done_mutex_);
      ++done_;
    }
    done_cv_.notify_all();
  }

 private:
  std::mutex done_mutex_;
  std::condition_variable done_cv_;
  std::uint64_t done_ = 0;
};

}  // namespace detail

spdlog::level::level_enum parse_level(std::string_view name) {
  using spdlog::level::level_enum;
  if (name == "trace") return level_enum::trace;
  if (name == "debug") return level_enum::debug;
  if (name == "info") return level_enum::info;
  if (name == "warn" || name == "warning") return level_enum::warn;
  if (name == "error" || name == "err") return level_enum::err;
  if (name == "critical") return level_enum::critical;
  if (name == "off") return level_enum::off;
  throw std::invalid_argument("unknown log level \"" + std::string(name) +
                              "\" (expected trace, debug, info, warn, error, critical or off)");
}

ReopenableFileSink::ReopenableFileSink(std::string path)
    : path_(std::move(path)), fd_(open_append(path_)) {}

ReopenableFileSink::~ReopenableFileSink() {
  if (fd_ >= 0) ::close(fd_);
}

void ReopenableFileSink::reopen() {
  std::lock_guard lock(mutex_);
  reopen_locked();
}

void ReopenableFileSink::reopen_locked() {
  reopen_requested_.store(false, std::memory_order_relaxed);
  // Open first so that a failure leaves the old file in use and no message is lost.
  int fd = open_append(path_);
  ::close(fd_);
  fd_ = fd;
}

void ReopenableFileSink::reopen_if_requested() {
  if (reopen_requested_.load(std::memory_order_acquire)) {
    try {
      reopen_locked();
    } catch (const std::runtime_error& e) {
      // Reported through the logger's error handler; the old file stays in use.
      throw spdlog::spdlog_ex(std::string("reopen: ") + e.what());
    }
  }
}

void ReopenableFileSink::sink_it_(const spdlog::details::log_msg& msg) {
  spdlog::memory_buf_t formatted;
  formatter_->format(msg, formatted);
  std::string reopen_error;
  try {
    reopen_if_requested();
  } catch (const spdlog::spdlog_ex& e) {
    reopen_error = e.what();  // Still write this message to the old file, then report.
  }
  const char* p = formatted.data();
  std::size_t left = formatted.size();
  while (left > 0) {
    ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw spdlog::spdlog_ex("write to log file \"" + path_ + "\": " + errno_text(errno));
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (!reopen_error.empty()) throw spdlog::spdlog_ex(reopen_error);
}

// Every message is already a write(2), so a flush only has to honour a pending reopen.
void ReopenableFileSink::flush_() {
  reopen_if_requested();
}

namespace {

constexpr const char* kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                   "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

// Splits a time point into UTC calendar fields and the milliseconds within the second.
std::tm utc(std::chrono::system_clock::time_point time, int* millis) {
  auto ms = std::chrono::floor<std::chrono::milliseconds>(time.time_since_epoch());
  auto secs = std::chrono::floor<std::chrono::seconds>(ms);
  if (millis != nullptr) *millis = static_cast<int>((ms - secs).count());
  std::time_t t = static_cast<std::time_t>(secs.count());
  std::tm tm{};
  gmtime_r(&t, &tm);
  return tm;
}

// nginx's default log escaping: '"', '\' and bytes outside 0x20..0x7e become \xHH.
void append_nginx_escaped(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\' || c < 0x20 || c >= 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += ch;
    }
  }
}

void append_quoted_or_dash(std::string& out, std::string_view s) {
  out += '"';
  if (s.empty()) {
    out += '-';
  } else {
    append_nginx_escaped(out, s);
  }
  out += '"';
}

}  // namespace

std::string format_combined(const AccessRecord& r) {
  std::string out;
  out.reserve(128 + r.target.size() + r.user_agent.size() + r.referer.size());
  append_nginx_escaped(out, r.remote_address.empty() ? std::string_view("-") : r.remote_address);
  std::tm tm = utc(r.time, nullptr);
  fmt::format_to(std::back_inserter(out), " - - [{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000] \"",
                 tm.tm_mday, kMonths[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                 tm.tm_sec);
  if (r.method.empty()) {
    out += '-';  // No request line was parsed, as nginx logs it.
  } else {
    append_nginx_escaped(out, r.method);
    out += ' ';
    append_nginx_escaped(out, r.target);
    fmt::format_to(std::back_inserter(out), " HTTP/{}.{}", r.http_major, r.http_minor);
  }
  fmt::format_to(std::back_inserter(out), "\" {} {} ", r.status, r.body_bytes_sent);
  append_quoted_or_dash(out, r.referer);
  out += ' ';
  append_quoted_or_dash(out, r.user_agent);
  // Integer arithmetic so that the six decimals are exact.
  std::int64_t us = std::max<std::int64_t>(r.duration.count(), 0);
  fmt::format_to(std::back_inserter(out), " rt={}.{:06} cid={}", us / 1'000'000, us % 1'000'000,
                 r.connection_id);
  return out;
}

std::string format_json(const AccessRecord& r) {
  int millis = 0;
  std::tm tm = utc(r.time, &millis);
  nlohmann::ordered_json j;
  j["time"] = fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", tm.tm_year + 1900,
                          tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
  j["remote"] = r.remote_address;
  j["method"] = r.method;
  j["target"] = r.target;
  j["version"] = fmt::format("HTTP/{}.{}", r.http_major, r.http_minor);
  j["status"] = r.status;
  j["bytes"] = r.body_bytes_sent;
  j["referer"] = r.referer;
  j["user_agent"] = r.user_agent;
  j["duration_us"] = static_cast<std::int64_t>(r.duration.count());
  j["connection"] = r.connection_id;
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

namespace {

spdlog::sink_ptr make_sink(const std::string& target,
                           std::vector<std::shared_ptr<ReopenableFileSink>>& files) {
  if (target == "stderr") return std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto file = std::make_shared<ReopenableFileSink>(target);
  files.push_back(file);
  return file;
}

}  // namespace

Logs::Logs(const Options& options) : options_(options) {
  auto level = parse_level(options.level);
  if (options.queue_size == 0) throw std::invalid_argument("log queue_size must be positive");
  if (options.error_log.empty() || options.error_log == "off") {
    throw std::invalid_argument("error_log must be \"stderr\" or a file path");
  }
  if (options.access_log.empty()) {
    throw std::invalid_argument("access_log must be \"stderr\", \"off\" or a file path");
  }

  spdlog::sink_ptr error_sink = make_sink(options.error_log, files_);
  spdlog::sink_ptr access_sink;
  if (options.access_log != "off") access_sink = make_sink(options.access_log, files_);

  pool_ = std::make_shared<spdlog::details::thread_pool>(options.queue_size, 1, [] {
    // Signals are for the event loop thread; a handler here would also interrupt writes.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    pthread_setname_np(pthread_self(), "squall-log");
    // Each line queued would otherwise wake this thread into the loop's pass on a shared CPU.
    squall::detail::schedule_as_background();
  });
  barrier_ = std::make_shared<detail::FlushBarrier>();
  barrier_->set_level(spdlog::level::off);  // Sees flushes only, never messages.

  error_ = std::make_shared<spdlog::async_logger>(
      "squall", spdlog::sinks_init_list{error_sink, barrier_}, pool_,
      spdlog::async_overflow_policy::overrun_oldest);
  if (options.journal) {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<SyslogPriorityFlag>('*').set_pattern(kJournalPattern);
    error_->set_formatter(std::move(formatter));
  } else {
    error_->set_pattern(kErrorPattern);
  }
  error_->set_level(level);
  if (access_sink) {
    access_ = std::make_shared<spdlog::async_logger>(
        "squall.access", spdlog::sinks_init_list{access_sink, barrier_}, pool_,
        spdlog::async_overflow_policy::overrun_oldest);
    access_->set_pattern(kAccessPattern);
    access_->set_level(spdlog::level::info);
  }

  previous_default_ = spdlog::default_logger();
  spdlog::set_default_logger(error_);
}

Logs::~Logs() {
  // Restore the previous default (this also drops "squall" from spdlog's registry) so that
  // spdlog::info() after this point does not reach a logger whose thread is gone.
  if (spdlog::default_logger() == error_) spdlog::set_default_logger(previous_default_);
  // The pool's destructor queues a terminate behind every pending message and joins the thread,
  // so everything already queued is written first.
  pool_.reset();
  for (auto* logger : {error_.get(), access_.get()}) {
    if (logger == nullptr) continue;
    for (auto& sink : logger->sinks()) {
      try {
        sink->flush();
      } catch (const std::exception&) {
        // Nothing is left to report a failed flush to at this point.
      }
    }
  }
}

void Logs::access(const AccessRecord& record) {
  if (!access_) return;
  std::string line = options_.access_json ? format_json(record) : format_combined(record);
  access_->log(spdlog::level::info, spdlog::string_view_t(line.data(), line.size()));
}

void Logs::post_flushes() {
  // Caller holds flush_mutex_. Both loggers share the barrier, so each flush counts once.
  error_->flush();
  ++flushes_posted_;
  if (access_) {
    access_->flush();
    ++flushes_posted_;
  }
}

void Logs::reopen() {
  for (auto& file : files_) file->request_reopen();
  // Queue a flush so that the reopen happens now even if nothing else is logged.
  std::lock_guard lock(flush_mutex_);
  post_flushes();
}

std::uint64_t Logs::dropped_messages() const {
  return pool_->overrun_counter();
}

void Logs::set_level(std::string_view level) {
  error_->set_level(parse_level(level));
}

void Logs::flush() {
  std::uint64_t ticket;
  {
    std::lock_guard lock(flush_mutex_);
    post_flushes();
    ticket = flushes_posted_;
  }
  barrier_->wait(ticket);
}

}  // namespace squall::log
