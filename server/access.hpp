// Who may call which route of squalld: API tokens for the mail routes whenever squalld is
// reachable beyond loopback (Redis's protected mode is the model), and per-route rules for
// /healthz, /metrics and /echo. Built from the configuration and the tokens file at start and
// on every reload; the routes of one router share one AccessControl.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "server/config.hpp"
#include "squall/auth/tokens.hpp"
#include "squall/http/request.hpp"
#include "squall/http/responder.hpp"

namespace squall::squalld {

// Where squalld can be reached from other hosts: the [server] listen addresses that are not
// loopback, or every socket systemd passed (their address is systemd's business).
struct Exposure {
  bool inherited_sockets = false;             // Socket activation: treated as public.
  std::vector<std::string> public_listeners;  // "0.0.0.0:8080", ...
  bool exposed() const noexcept { return inherited_sockets || !public_listeners.empty(); }
};
Exposure exposure_of(const Config& config, bool inherited_sockets);

// A caller of a mail route: a token's entry, or anonymous.
struct Caller {
  const auth::Token* token = nullptr;  // Owned by the AccessControl; nullptr = anonymous.
  // The owner of the caller's jobs: the token's name, "" when anonymous.
  std::string owner() const { return token != nullptr ? token->name : std::string(); }
};

class AccessControl {
 public:
  // Reads [auth] tokens_file (if set). Throws std::runtime_error naming the setting when the
  // configuration would serve the mail routes to anyone on a public address (no tokens and no
  // [auth] anonymous = true), or when the tokens file cannot be read or parsed.
  static std::shared_ptr<const AccessControl> build(const Config& config, const Exposure& exposure);

  // For POST /email and GET /jobs/{id}: the caller, or nullopt after answering 401 (no or an
  // invalid token where one is needed; an invalid token is refused even where none is needed).
  std::optional<Caller> authenticate(const http::Request& request,
                                     const http::Responder& responder) const;
  // For the other routes: whether `rule` lets this request through; if not, it has been
  // answered (401 with WWW-Authenticate, or 403 for a loopback-only route).
  bool allow(RouteAccess rule, const http::Request& request,
             const http::Responder& responder) const;

  // Whether the mail routes need a token.
  bool mail_needs_token() const noexcept { return mail_needs_token_; }
  std::size_t token_count() const noexcept { return tokens_.size(); }

 private:
  AccessControl(auth::TokenSet tokens, bool mail_needs_token)
      : tokens_(std::move(tokens)), mail_needs_token_(mail_needs_token) {}

  auth::TokenSet tokens_;          // From [auth] tokens_file.
  bool mail_needs_token_ = false;  // See mail_needs_token().
};

// What --check-config prints about access control: who may send mail and read jobs, and why.
std::string describe_access(const Config& config, const Exposure& exposure,
                            const AccessControl& access);

// --new-token NAME: a fresh token and its tokens-file line, as printed on stdout.
std::string new_token_text(std::string_view name);

}  // namespace squall::squalld
