// libFuzzer target: the config loader on arbitrary text. load_config_string either returns a
// Config or throws ConfigError whose message names the source; any other exception, a crash or
// a sanitizer report is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "server/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const squall::squalld::Config config = squall::squalld::load_config_string(text, "fuzz.toml");
    // What loads must stay within the bounds the rest of the server relies on.
    if (config.limits.max_body_bytes > config.limits.max_buffered_body_bytes) std::abort();
    if (config.jobs.max_concurrent >= config.server.thread_pool_size) std::abort();
  } catch (const squall::squalld::ConfigError& error) {
    if (std::string_view(error.what()).find("fuzz.toml") == std::string_view::npos) std::abort();
  }
  return 0;
}
