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

// email_from_json as the stored form parsed into an nlohmann::json document: what it answers
// whenever its direct reader does not take the text (only the form email_to_json writes).
Email email_from_json_dom(std::string_view json);
// Whether email_from_json reads `json` without the DOM. For tests.
bool reads_stored_form_directly(std::string_view json);

}  // namespace squall::mail::detail
