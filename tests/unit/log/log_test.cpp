#include "squall/log/log.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <spdlog/spdlog.h>

#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

using namespace squall::log;
namespace fs = std::filesystem;
using squall::testing::read_file;
using squall::testing::TempDir;

namespace {

AccessRecord sample_record() {
  using namespace std::chrono;
  AccessRecord r;
  r.remote_address = "203.0.113.7";
  r.method = "GET";
  r.target = "/a\"b\\c\x01\xff";
  r.http_major = 1;
  r.http_minor = 1;
  r.status = 200;
  r.body_bytes_sent = 1234;
  r.referer = "";
  r.user_agent = "curl/8.0 \"x\" \xc3\xa9";
  r.duration = microseconds(123);
  r.time = sys_days{year{2026} / November / 21} + hours(14) + minutes(3) + seconds(32) +
           milliseconds(123) + microseconds(456);
  r.connection_id = 42;
  return r;
}

// Whether `text` fits `shape`, where '9' stands for any digit and '+' for '+' or '-'.
bool fits(std::string_view text, std::string_view shape) {
  if (text.size() != shape.size()) return false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char want = shape[i];
    char got = text[i];
    bool ok = want == '9'   ? (got >= '0' && got <= '9')
              : want == '+' ? (got == '+' || got == '-')
                            : got == want;
    if (!ok) return false;
  }
  return true;
}

template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no exception";
}

}  // namespace

TEST_CASE("format_combined matches nginx's combined format plus rt and cid") {
  CHECK(format_combined(sample_record()) ==
        "203.0.113.7 - - [21/Nov/2026:14:03:32 +0000] "
        "\"GET /a\\x22b\\x5Cc\\x01\\xFF HTTP/1.1\" 200 1234 \"-\" "
        "\"curl/8.0 \\x22x\\x22 \\xC3\\xA9\" rt=0.000123 cid=42");

  AccessRecord r = sample_record();
  r.method = "";  // Nothing parsed, e.g. a 400 for garbage.
  r.target = "";
  r.status = 400;
  r.body_bytes_sent = 0;
  r.referer = "http://x/\n";
  r.user_agent = "";
  r.duration = std::chrono::microseconds(2'500'000);
  r.connection_id = 7;
  CHECK(format_combined(r) ==
        "203.0.113.7 - - [21/Nov/2026:14:03:32 +0000] \"-\" 400 0 \"http://x/\\x0A\" \"-\" "
        "rt=2.500000 cid=7");
}

TEST_CASE("format_json escapes strings and replaces invalid UTF-8") {
  CHECK(format_json(sample_record()) ==
        "{\"time\":\"2026-11-21T14:03:32.123Z\",\"remote\":\"203.0.113.7\",\"method\":\"GET\","
        "\"target\":\"/a\\\"b\\\\c\\u0001\xef\xbf\xbd\",\"version\":\"HTTP/1.1\","
        "\"status\":200,\"bytes\":1234,\"referer\":\"\","
        "\"user_agent\":\"curl/8.0 \\\"x\\\" \xc3\xa9\",\"duration_us\":123,\"connection\":42}");
}

TEST_CASE("parse_level") {
  CHECK(parse_level("warning") == spdlog::level::warn);
  CHECK(parse_level("off") == spdlog::level::off);
  CHECK(error_message([] { parse_level("loud"); }).find("\"loud\"") != std::string::npos);
}

TEST_CASE("ReopenableFileSink releases a renamed file on reopen") {
  TempDir dir;
  fs::path path = dir.path / "app.log";
  auto sink = std::make_shared<ReopenableFileSink>(path.string());
  spdlog::logger logger("test", sink);
  logger.set_pattern("%v");
  logger.info("first");
  fs::rename(path, dir.path / "app.log.1");  // What logrotate does before signalling.
  sink->reopen();
  logger.info("second");
  logger.flush();
  CHECK(read_file(dir.path / "app.log.1") == "first\n");
  CHECK(read_file(path) == "second\n");
  CHECK((fs::status(path).permissions() & fs::perms::others_all) == fs::perms::none);

  // A failed reopen keeps writing to the file already open.
  fs::rename(path, dir.path / "app.log.2");
  fs::create_directory(path);  // The path is now a directory, so it cannot be opened.
  std::string message = error_message([&] { sink->reopen(); });
  CHECK(message.find(path.string()) != std::string::npos);
  CHECK(message.find("Is a directory") != std::string::npos);
  logger.info("third");
  CHECK(read_file(dir.path / "app.log.2") == "second\nthird\n");
}

TEST_CASE("a log file that cannot be opened throws naming the path and the reason") {
  std::string bad = "/nonexistent-squall-dir/error.log";
  std::string message = error_message([&] { ReopenableFileSink sink(bad); });
  CHECK(message.find(bad) != std::string::npos);
  CHECK(message.find("No such file or directory") != std::string::npos);

  Options options;
  options.access_log = bad;
  message = error_message([&] { Logs logs(options); });
  CHECK(message.find(bad) != std::string::npos);

  options.access_log = "off";
  options.level = "chatty";
  CHECK_THROWS_AS(Logs{options}, std::invalid_argument);
}

TEST_CASE("Logs writes error and access files and reopens them after a rename") {
  TempDir dir;
  fs::path error_path = dir.path / "error.log";
  fs::path access_path = dir.path / "access.log";
  auto previous_default = spdlog::default_logger();
  {
    Options options;
    options.error_log = error_path.string();
    options.access_log = access_path.string();
    options.access_json = false;
    Logs logs(options);
    CHECK(logs.access_enabled());
    CHECK(spdlog::default_logger() == logs.error());

    spdlog::info("hello {}", 1);
    spdlog::debug("hidden at info");
    logs.access(sample_record());
    logs.flush();
    fs::rename(error_path, dir.path / "error.log.1");
    fs::rename(access_path, dir.path / "access.log.1");
    logs.reopen();

    logs.set_level("debug");
    spdlog::debug("after {}", "rotation");
    AccessRecord r = sample_record();
    r.connection_id = 43;
    logs.access(r);
    logs.flush();

    CHECK(fits(read_file(dir.path / "error.log.1"),
               "[9999-99-99T99:99:99.999+99:99] [info] hello 1\n"));
    CHECK(read_file(error_path).ends_with("] [debug] after rotation\n"));
    CHECK(read_file(dir.path / "access.log.1") == format_combined(sample_record()) + "\n");
    CHECK(read_file(access_path) == format_combined(r) + "\n");
    CHECK(logs.dropped_messages() == 0);
  }
  CHECK(spdlog::default_logger() == previous_default);
  CHECK(spdlog::get("squall") == nullptr);
}

TEST_CASE("the log writer thread runs under SCHED_BATCH: a line queued does not preempt the loop") {
  TempDir dir;
  Options options;
  options.error_log = (dir.path / "error.log").string();
  options.access_log = (dir.path / "access.log").string();
  const auto before = squall::testing::thread_ids_named("squall-log");
  Logs logs(options);
  logs.access(sample_record());
  logs.flush();  // The writer has started, and named itself, by the time a flush returns.
  auto writers = squall::testing::thread_ids_named("squall-log");
  std::erase_if(writers, [&](pid_t id) { return std::ranges::find(before, id) != before.end(); });
  REQUIRE(writers.size() == 1);
  CHECK(::sched_getscheduler(writers.front()) == SCHED_BATCH);
}

TEST_CASE("access log off, JSON access log, and the destructor drains the queue") {
  TempDir dir;
  Options options;
  options.error_log = (dir.path / "error.log").string();
  options.access_log = "off";
  {
    Logs logs(options);
    CHECK_FALSE(logs.access_enabled());
    logs.access(sample_record());  // Ignored.
    logs.error()->warn("last words");
  }
  CHECK(read_file(dir.path / "error.log").ends_with("] [warning] last words\n"));

  options.access_log = (dir.path / "access.json").string();
  options.access_json = true;
  {
    Logs logs(options);
    logs.access(sample_record());
  }
  CHECK(read_file(dir.path / "access.json") == format_json(sample_record()) + "\n");
}

TEST_CASE("a full queue drops the oldest messages and counts them") {
  TempDir dir;
  Options options;
  options.error_log = (dir.path / "error.log").string();
  options.access_log = "off";
  options.queue_size = 4;
  constexpr int kMessages = 20000;
  Logs logs(options);
  for (int i = 0; i < kMessages; ++i) logs.error()->info("message {}", i);
  logs.flush();
  std::string text = read_file(dir.path / "error.log");
  auto lines = static_cast<std::uint64_t>(std::count(text.begin(), text.end(), '\n'));
  CHECK(lines + logs.dropped_messages() == kMessages);
  CHECK(text.ends_with("message 19999\n"));  // The newest survive.
}

TEST_CASE("journal mode prefixes error lines with the syslog priority and drops the timestamp") {
  TempDir dir;
  Options options;
  options.error_log = (dir.path / "error.log").string();
  options.access_log = "off";
  options.level = "trace";
  options.journal = true;
  {
    Logs logs(options);
    spdlog::trace("t");
    spdlog::debug("d");
    spdlog::info("i {}", 1);
    spdlog::warn("w");
    spdlog::error("e");
    spdlog::critical("c");
  }
  CHECK(read_file(dir.path / "error.log") == "<7>t\n<7>d\n<6>i 1\n<4>w\n<3>e\n<2>c\n");
}

TEST_CASE("log files are created 0640 whatever the umask; existing ones keep their mode") {
  TempDir dir;
  for (const mode_t mask : {mode_t{0}, mode_t{022}, mode_t{077}}) {
    CAPTURE(mask);
    const fs::path path = dir.path / ("app-" + std::to_string(mask) + ".log");
    const mode_t old = ::umask(mask);
    {
      auto sink = std::make_shared<ReopenableFileSink>(path.string());
      fs::rename(path, path.string() + ".1");
      sink->reopen();  // As after logrotate: a new file.
    }
    ::umask(old);
    CHECK(fs::status(path.string() + ".1").permissions() == fs::perms(0640));
    CHECK(fs::status(path).permissions() == fs::perms(0640));
  }
  const fs::path existing = dir.path / "existing.log";
  std::ofstream(existing) << "old\n";
  fs::permissions(existing, fs::perms(0600));
  ReopenableFileSink sink(existing.string());
  CHECK(fs::status(existing).permissions() == fs::perms(0600));
}
