#include "squall/http/request.hpp"

#include <algorithm>

#include "core/hot.hpp"

namespace squall::http {

namespace {

int hex_digit(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

char ascii_lower(char c) noexcept {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c;
}

void relocate_view(std::string_view& view, const char* old_begin, const char* old_end,
                   std::ptrdiff_t delta) noexcept {
  if (!view.empty() && view.data() >= old_begin && view.data() < old_end) {
    view = std::string_view(view.data() + delta, view.size());
  }
}

}  // namespace

bool iequals(std::string_view a, std::string_view b) noexcept {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return x == y || ascii_lower(x) == ascii_lower(y);
         });
}

bool percent_decode_into(std::string_view text, bool plus_is_space, std::string& out) {
  out.clear();
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '+' && plus_is_space) {
      out.push_back(' ');
    } else if (c != '%') {
      out.push_back(c);
    } else {
      if (i + 2 >= text.size()) return false;
      const int high = hex_digit(text[i + 1]);
      const int low = hex_digit(text[i + 2]);
      if (high < 0 || low < 0) return false;
      const char byte = static_cast<char>(high * 16 + low);
      if (byte == '\0') return false;
      out.push_back(byte);
      i += 2;
    }
  }
  return true;
}

std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space) {
  std::string out;
  if (!percent_decode_into(text, plus_is_space, out)) return std::nullopt;
  return out;
}

std::vector<std::pair<std::string, std::string>> Request::query_params() const {
  std::vector<std::pair<std::string, std::string>> params;
  std::string_view rest = raw_query_;
  while (!rest.empty()) {
    const auto amp = rest.find('&');
    const std::string_view pair = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
    if (pair.empty()) continue;
    const auto eq = pair.find('=');
    auto name = percent_decode(pair.substr(0, eq), true);
    auto value = percent_decode(eq == std::string_view::npos ? "" : pair.substr(eq + 1), true);
    // A pair that does not decode is skipped, as browsers and Tornado do.
    if (name && value) params.emplace_back(std::move(*name), std::move(*value));
  }
  return params;
}

std::optional<std::string> Request::query(std::string_view name) const {
  for (auto& [key, value] : query_params()) {
    if (key == name) return std::move(value);
  }
  return std::nullopt;
}

std::optional<std::string_view> Request::header(std::string_view name) const noexcept {
  // The length first, inline: most names a lookup meets differ in it.
  for (const Header& header : headers_) {
    if (header.name.size() == name.size() && iequals(header.name, name)) return header.value;
  }
  return std::nullopt;
}

std::string_view Request::param(std::string_view name) const noexcept {
  for (const RouteParam& param : params_) {
    if (param.name == name) return param.value;
  }
  return {};
}

SQUALL_HOT void Request::clear() noexcept {
  method_ = {};
  target_ = {};
  path_ = {};
  raw_query_ = {};
  headers_.clear();
  params_.clear();
  body_.clear();
  body_stream_.reset();
  http_major_ = 1;
  http_minor_ = 1;
}

void Request::relocate(const char* old_begin, const char* old_end, std::ptrdiff_t delta) noexcept {
  relocate_view(target_, old_begin, old_end, delta);
  relocate_view(path_, old_begin, old_end, delta);
  relocate_view(raw_query_, old_begin, old_end, delta);
  for (Header& header : headers_) {
    relocate_view(header.name, old_begin, old_end, delta);
    relocate_view(header.value, old_begin, old_end, delta);
  }
  for (RouteParam& param : params_) relocate_view(param.value, old_begin, old_end, delta);
}

}  // namespace squall::http
