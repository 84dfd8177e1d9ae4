// The Maildir transport: one complete file per message in new/, the same name on every attempt,
// failures reported as temporary; and the configuration that selects it.
#include "squall/mail/maildir.hpp"

#include <doctest/doctest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "server/config.hpp"
#include "test_support.hpp"

namespace squall::mail {
namespace {

namespace fs = std::filesystem;
using squall::testing::read_file;
using squall::testing::TempDir;

std::vector<std::string> names_in(const fs::path& directory) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(directory)) {
    names.push_back(entry.path().filename().string());
  }
  return names;
}

constexpr std::string_view kMessage =
    "From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <1@example.com>\r\n\r\nhello\r\n";
constexpr std::string_view kJobId = "0197a0c4a1b2c3d4e5f60718293a4b5c";
constexpr std::int64_t kCreatedMs = 1'700'000'000'123;

TEST_CASE("a message lands whole in new/, named after its job, and tmp/ is left empty") {
  TempDir dir;
  const MaildirWriter writer(dir.file("mail"));
  writer.create_directories();
  for (const char* sub : {"tmp", "new", "cur"}) {
    struct stat status {};
    REQUIRE(::stat(dir.file(std::string("mail/") + sub).c_str(), &status) == 0);
    CHECK(S_ISDIR(status.st_mode));
    CHECK((status.st_mode & 0777) == 0700);
  }
  const SendResult result = writer.deliver(kJobId, kCreatedMs, kMessage);
  CHECK(result.outcome == SendOutcome::sent);
  const std::string name = writer.file_name(kJobId, kCreatedMs);
  CHECK(name.starts_with("1700000000." + std::string(kJobId) + "."));
  CHECK(names_in(dir.path / "mail" / "new") == std::vector<std::string>{name});
  CHECK(names_in(dir.path / "mail" / "tmp").empty());
  CHECK(read_file(dir.path / "mail" / "new" / name) == kMessage);
  struct stat status {};
  REQUIRE(::stat((dir.path / "mail" / "new" / name).c_str(), &status) == 0);
  CHECK((status.st_mode & 0777) == 0600);
}

TEST_CASE("an attempt repeated after a crash leaves one file, also once a reader moved it") {
  TempDir dir;
  const MaildirWriter writer(dir.file("mail"));
  writer.create_directories();
  REQUIRE(writer.deliver(kJobId, kCreatedMs, kMessage).outcome == SendOutcome::sent);
  const std::string name = writer.file_name(kJobId, kCreatedMs);
  // The same job again: nothing new is written.
  CHECK(writer.deliver(kJobId, kCreatedMs, "other bytes").outcome == SendOutcome::sent);
  CHECK(names_in(dir.path / "mail" / "new") == std::vector<std::string>{name});
  CHECK(read_file(dir.path / "mail" / "new" / name) == kMessage);
  // A mail reader moved it to cur/ and flagged it as seen.
  fs::rename(dir.path / "mail" / "new" / name, dir.path / "mail" / "cur" / (name + ":2,S"));
  CHECK(writer.deliver(kJobId, kCreatedMs, kMessage).outcome == SendOutcome::sent);
  CHECK(names_in(dir.path / "mail" / "new").empty());
  // Another job is another file.
  CHECK(writer.deliver("0197a0c4a1b2c3d4e5f60718293a4b5d", kCreatedMs, kMessage).outcome ==
        SendOutcome::sent);
  CHECK(names_in(dir.path / "mail" / "new").size() == 1);
}

TEST_CASE("a Maildir that cannot be written is a temporary failure naming it, then recovers") {
  TempDir dir;
  const MaildirWriter writer(dir.file("mail"));
  writer.create_directories();
  // tmp/ replaced by a file: creating the message fails (as on a full or broken disk).
  fs::remove(dir.path / "mail" / "tmp");
  { std::ofstream(dir.file("mail/tmp")) << "in the way"; }
  const SendResult failed = writer.deliver(kJobId, kCreatedMs, kMessage);
  CHECK(failed.outcome == SendOutcome::temporary_failure);
  CHECK(failed.detail.find("maildir " + dir.file("mail") + ": cannot create tmp/") == 0);
  CHECK(failed.detail.find("Not a directory") != std::string::npos);
  CHECK(names_in(dir.path / "mail" / "new").empty());
  // Repaired, the retry delivers.
  fs::remove(dir.path / "mail" / "tmp");
  writer.create_directories();
  CHECK(writer.deliver(kJobId, kCreatedMs, kMessage).outcome == SendOutcome::sent);
  CHECK(names_in(dir.path / "mail" / "new").size() == 1);
}

TEST_CASE("create_directories names the path it could not make") {
  TempDir dir;
  { std::ofstream(dir.file("file")) << "x"; }
  const MaildirWriter writer(dir.file("file/mail"));
  CHECK_THROWS_WITH_AS(
      writer.create_directories(),
      ("maildir " + dir.file("file/mail") + ": cannot create it: Not a directory").c_str(),
      std::runtime_error);
}

TEST_CASE("the host part of a file name escapes '/' and ':' as the Maildir spec says") {
  const std::string host = maildir_host_name();
  CHECK(!host.empty());
  CHECK(host.find('/') == std::string::npos);
  CHECK(host.find(':') == std::string::npos);
}

TEST_CASE(
    "[smtp] url takes maildir:PATH, and config/dev.toml differs from the defaults only there") {
  const squalld::Config config =
      squalld::load_config_string("[smtp]\nurl = \"maildir:/var/mail/squall\"\n", "t");
  CHECK(config.smtp.url == "maildir:/var/mail/squall");
  CHECK_THROWS_WITH_AS(squalld::load_config_string("[smtp]\nurl = \"maildir:\"\n", "t.toml"),
                       "t.toml:2: [smtp] url: \"maildir:\" needs a directory, e.g. "
                       "\"maildir:squall-mail\"",
                       squalld::ConfigError);
  squalld::Config dev = squalld::load_config_file("config/dev.toml");
  CHECK(dev.smtp.url == "maildir:squall-mail");
  dev.smtp.url = squalld::Config{}.smtp.url;
  CHECK(dev == squalld::Config{});
}

}  // namespace
}  // namespace squall::mail
