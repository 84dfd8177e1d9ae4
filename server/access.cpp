#include "server/access.hpp"

#include <stdexcept>

#include <nlohmann/json.hpp>

namespace squall::squalld {

namespace {

constexpr std::string_view kChallenge = "Bearer realm=\"squalld\"";
constexpr std::string_view kInvalidChallenge = "Bearer realm=\"squalld\", error=\"invalid_token\"";

void refuse(const http::Responder& responder, int status, std::string_view message,
            bool invalid_token) {
  if (status == 401) {
    responder.header("WWW-Authenticate", invalid_token ? kInvalidChallenge : kChallenge);
  }
  const nlohmann::json body = {{"error", message}, {"field", "Authorization"}};
  responder.send(status, "application/json", body.dump() + "\n");
}

}  // namespace

Exposure exposure_of(const Config& config, bool inherited_sockets) {
  Exposure exposure;
  exposure.inherited_sockets = inherited_sockets;
  if (!inherited_sockets) {
    for (const ListenAddress& address : config.server.listen) {
      if (!auth::is_loopback_address(address.host)) {
        exposure.public_listeners.push_back(address.text());
      }
    }
  }
  return exposure;
}

std::shared_ptr<const AccessControl> AccessControl::build(const Config& config,
                                                          const Exposure& exposure) {
  auth::TokenSet tokens;
  if (!config.auth.tokens_file.empty()) {
    try {
      tokens = auth::TokenSet(auth::load_tokens_file(config.auth.tokens_file));
    } catch (const std::exception& error) {
      throw std::runtime_error(std::string("[auth] tokens_file: ") + error.what());
    }
  }
  const bool mail_routes = config.routes.email || config.routes.jobs;
  if (exposure.exposed() && tokens.empty() && !config.auth.anonymous && mail_routes) {
    const std::string where =
        exposure.inherited_sockets
            ? std::string("squalld serves sockets passed by systemd (socket activation)")
            : "[server] listen " + exposure.public_listeners.front() + " is not a loopback address";
    throw std::runtime_error(
        where +
        ", and [auth] tokens_file names no token: POST /email would be an open mail relay. "
        "Set [auth] tokens_file (make a token with `squalld --new-token NAME`), or set "
        "[auth] anonymous = true to let anyone who reaches squalld send mail");
  }
  const bool needs_token = !config.auth.anonymous && (exposure.exposed() || !tokens.empty());
  return std::shared_ptr<const AccessControl>(new AccessControl(std::move(tokens), needs_token));
}

std::optional<Caller> AccessControl::authenticate(const http::Request& request,
                                                  const http::Responder& responder) const {
  const auto header = request.header("authorization");
  if (!header) {
    if (mail_needs_token_) {
      refuse(responder, 401, "an API token is required (Authorization: Bearer TOKEN)", false);
      return std::nullopt;
    }
    return Caller{};
  }
  const auto presented = auth::bearer_token(*header);
  const auth::Token* token = presented ? tokens_.find(*presented) : nullptr;
  if (token == nullptr) {
    refuse(responder, 401,
           presented ? "the API token is not valid" : "expected Authorization: Bearer TOKEN", true);
    return std::nullopt;
  }
  return Caller{token};
}

bool AccessControl::allow(RouteAccess rule, const http::Request& request,
                          const http::Responder& responder) const {
  if (rule == RouteAccess::open) return true;
  const bool loopback = auth::is_loopback_address(request.remote_address());
  if (rule == RouteAccess::loopback) {
    if (loopback) return true;
    refuse(responder, 403, "this route answers loopback clients only", false);
    return false;
  }
  if (rule == RouteAccess::loopback_or_token && loopback) return true;
  const auto header = request.header("authorization");
  const auto presented = header ? auth::bearer_token(*header) : std::nullopt;
  if (presented && tokens_.find(*presented) != nullptr) return true;
  refuse(responder, 401,
         header ? "the API token is not valid"
                : "an API token is required (Authorization: Bearer TOKEN)",
         header.has_value());
  return false;
}

std::string describe_access(const Config& config, const Exposure& exposure,
                            const AccessControl& access) {
  std::string text;
  if (exposure.inherited_sockets) {
    text += "squalld serves sockets passed by systemd, which count as public. ";
  } else if (exposure.public_listeners.empty()) {
    text += "squalld listens on loopback only. ";
  } else {
    text += "squalld listens beyond loopback (";
    for (std::size_t i = 0; i < exposure.public_listeners.size(); ++i) {
      text += (i == 0 ? "" : ", ") + exposure.public_listeners[i];
    }
    text += "). ";
  }
  text += std::to_string(access.token_count()) + " API token(s) from [auth] tokens_file";
  if (!config.auth.tokens_file.empty()) text += " " + config.auth.tokens_file;
  text += ". ";
  if (!config.routes.email && !config.routes.jobs) {
    text += "POST /email and GET /jobs/{id} are switched off.";
  } else if (access.mail_needs_token()) {
    text += "POST /email and GET /jobs/{id} require a token.";
  } else if (config.auth.anonymous) {
    text += "POST /email and GET /jobs/{id} are open to anyone ([auth] anonymous = true).";
  } else {
    text += "POST /email and GET /jobs/{id} are open to local clients without a token.";
  }
  return text;
}

std::string new_token_text(std::string_view name) {
  const auth::NewToken made = auth::generate_token(name);
  return "token: " + made.token +
         "\n# Give the token to the client (Authorization: Bearer TOKEN); it is not stored.\n"
         "# Add this line to the [auth] tokens_file, then reload squalld (SIGHUP):\n" +
         made.line + "\n";
}

}  // namespace squall::squalld
