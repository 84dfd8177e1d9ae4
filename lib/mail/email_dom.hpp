// The DOM path of POST /email validation (nlohmann::json), which defines every refusal: for
// tests that hold EmailRequestParser's one-pass scan against it. Not part of the public API.
#pragma once

#include <string_view>
#include <variant>

#include "squall/mail/email.hpp"

namespace squall::mail::detail {

// parse_email_request as the whole body parsed into an nlohmann::json document, then each field
// checked: what EmailRequestParser answers whenever its scan refuses a body.
std::variant<Email, FieldError> parse_email_request_dom(std::string_view json_body,
                                                        const EmailLimits& limits);

}  // namespace squall::mail::detail
