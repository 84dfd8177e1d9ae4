// The message squall sends, held byte for byte: build_mime, the envelope and make_message_id over
// a corpus of emails (encoded-words, folding, quoted-printable soft breaks, dots at line starts,
// CR/LF mixes, text with html, every address form), compared with the texts in
// tests/unit/mail/mime_golden.txt, which the code wrote when the corpus was made. A change that
// alters one byte of any message fails here; a change meant to alter the output rewrites the
// file (SQUALL_UPDATE_MIME_GOLDEN=1 ./build/unit_tests -tc='*golden*') and shows the difference
// in review. prepare_message, which makes the same message and envelope in one pass, is held to
// what the separate functions return for every sample.
#include "squall/mail/email.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

using namespace squall::mail;
using namespace std::chrono;

namespace {

constexpr const char* kGoldenPath = "tests/unit/mail/mime_golden.txt";

// One message of the corpus: what the send job has (the email, the configured sender and
// Message-ID domain, the job id) and the Date.
struct Sample {
  std::string name;
  Email email;
  std::string default_from = "Squall <squall@example.com>";
  std::string message_id_domain = "example.com";
  std::string job_id = "01JDQ5V4Z8K3M2N1P0Q9R8S7T6";
  system_clock::time_point date = sys_days{year{2026} / November / 21} + 14h + 3min + 32s;
};

// The MIME text readable and stable in a text file: CRLF as a line feed, any other control or
// 8-bit byte (none is expected) as <xHH>, and the multipart boundary, which is random, as
// BOUNDARY after checking its form.
std::string printable_mime(std::string mime) {
  const std::string marker = "boundary=\"";
  if (const auto at = mime.find(marker); at != std::string::npos) {
    const auto start = at + marker.size();
    const auto end = mime.find('"', start);
    REQUIRE(end != std::string::npos);
    const std::string boundary = mime.substr(start, end - start);
    CHECK(boundary.size() == 9 + 32);
    CHECK(boundary.starts_with("=_squall_"));
    CHECK(boundary.find_first_not_of("0123456789abcdef", 9) == std::string::npos);
    for (auto found = mime.find(boundary); found != std::string::npos;
         found = mime.find(boundary, found)) {
      mime.replace(found, boundary.size(), "BOUNDARY");
    }
  }
  std::string out;
  for (std::size_t i = 0; i < mime.size(); ++i) {
    const auto c = static_cast<unsigned char>(mime[i]);
    if (c == '\r' && i + 1 < mime.size() && mime[i + 1] == '\n') {
      out += '\n';
      ++i;
    } else if (c < 0x20 || c >= 0x7f) {
      static constexpr char kHex[] = "0123456789ABCDEF";
      out += "<x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
      out += '>';
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// What the send job makes of a sample, in the order it makes it; a refusal is recorded with its
// message.
std::string describe(const Sample& sample) {
  std::string out = "=== " + sample.name + "\n";
  std::string message_id;
  try {
    message_id = make_message_id(sample.job_id, sample.message_id_domain);
    out += "message-id: " + message_id + "\n";
  } catch (const std::invalid_argument& error) {
    out += "message-id refused: " + std::string(error.what()) + "\n";
    message_id = "fallback@example.com";
  }
  try {
    out += "sender: " + envelope_sender(sample.email, sample.default_from) + "\n";
  } catch (const std::invalid_argument& error) {
    out += "sender refused: " + std::string(error.what()) + "\n";
  }
  std::vector<std::string> recipients;
  std::string recipients_refused;
  try {
    recipients = envelope_recipients(sample.email);
    out += "recipients:";
    for (const std::string& recipient : recipients) out += " " + recipient;
    out += "\n";
  } catch (const std::invalid_argument& error) {
    recipients_refused = error.what();
    out += "recipients: refused: " + recipients_refused + "\n";
  }
  std::string mime, mime_refused;
  try {
    mime = build_mime(sample.email, sample.default_from, message_id, sample.date);
    out += "--- mime\n" + printable_mime(mime);
  } catch (const std::invalid_argument& error) {
    mime_refused = error.what();
    out += "refused: " + mime_refused + "\n";
  }

  // prepare_message: the same message and envelope, or the first refusal of the two.
  CAPTURE(sample.name);
  try {
    const OutgoingMessage message =
        prepare_message(sample.email, sample.default_from, message_id, sample.date);
    CHECK(mime_refused.empty());
    CHECK(recipients_refused.empty());
    CHECK(printable_mime(message.mime) == printable_mime(mime));
    CHECK(message.sender == envelope_sender(sample.email, sample.default_from));
    CHECK(message.recipients == recipients);
  } catch (const std::invalid_argument& error) {
    CHECK(error.what() == (mime_refused.empty() ? recipients_refused : mime_refused));
  }
  return out;
}

// FNV-1a: a stable digest for the generated samples, whose full texts would make the file large.
std::uint64_t digest(std::string_view text) {
  std::uint64_t hash = 14695981039346656037ull;
  for (const char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 1099511628211ull;
  }
  return hash;
}

std::vector<Sample> written_samples() {
  std::vector<Sample> samples;
  const auto add = [&](std::string name) -> Sample& {
    samples.push_back(Sample{});
    samples.back().name = std::move(name);
    return samples.back();
  };
  {
    // bench/email.lua's request: what the benchmarks send.
    Sample& s = add("bench request");
    s.email.to = {"Bench Recipient <rcpt@example.com>"};
    s.email.subject = "squall bench";
    s.email.text = "Hello from wrk.\n";
    s.email.html = "<p>Hello from <b>wrk</b>.</p>\n";
  }
  {
    Sample& s = add("ascii text, every header");
    s.email.from = "Sender Name <sender@example.org>";
    s.email.to = {"Alice <alice@example.com>", "bob@example.org"};
    s.email.cc = {"carol@example.net", "Dave Example <dave@example.net>"};
    s.email.bcc = {"secret@example.com"};
    s.email.reply_to = "Support Team <help@example.com>";
    s.email.subject = "Hello there";
    s.email.text = "Hi Alice,\n.\n.hidden line\nA = B, price 5 \xe2\x82\xac \nBye";
  }
  {
    Sample& s = add("unicode names and subject");
    s.email.from = "J\xc3\xb6rg M\xc3\xbcller <joerg@example.de>";
    s.email.to = {
        "\xc3\x9cn\xc3\xaf"
        "c\xc3\xb6"
        "d\xc3\xa9 \xe2\x9c\x93 <u@example.com>",
        "\xce\x94 <delta@example.gr>"};
    s.email.subject =
        "Gr\xc3\xbc\xc3\x9f"
        "e \xe2\x9c\x93 \xf0\x9f\x98\x80 aus M\xc3\xbcnchen";
    s.email.text =
        "Gr\xc3\xbc\xc3\x9f"
        "e,\nJ\xc3\xb6rg \xf0\x9f\x98\x80\n";
  }
  {
    Sample& s = add("display names with quotes, commas and specials");
    s.email.to = {"\"Doe, John\" <john@example.com>",
                  "Plain Name <p@example.com>",
                  "\"Back\\\\slash \\\"Q\\\"\" <r@example.com>",
                  "O'Brien <ob@example.com>",
                  "Name.With.Dots <dots@example.com>",
                  "\"Smith (work)\" <s@example.com>",
                  "=?UTF-8?B?eA==?= <enc@example.com>"};
    s.email.cc = {"\"quoted..local\"@example.com", "\"a\\\"b\"@example.com"};
    s.email.reply_to = "\"Reply, Here\" <reply@example.com>";
    s.email.subject = "names";
    s.email.text = "t";
  }
  {
    Sample& s = add("a display name too long for one quoted string");
    s.email.from =
        "A Very Long Display Name, With A Comma, That Goes On Beyond Seventy Characters "
        "<long@example.com>";
    s.email.to = {
        "Averyveryveryveryveryveryveryveryveryveryveryveryveryveryveryveryverylongatom "
        "<atom@example.com>"};
    s.email.subject = "long names";
    s.email.text = "t";
  }
  {
    Sample& s = add("long ascii subject folded at spaces");
    for (int i = 0; i < 30; ++i) {
      s.email.subject += "word" + std::to_string(i) + (i % 7 ? " " : "  ");
    }
    s.email.subject += "end";
    s.email.to = {"a@example.com"};
    s.email.text = "t";
  }
  {
    Sample& s = add("long unicode subject as several encoded-words");
    for (int i = 0; i < 20; ++i)
      s.email.subject +=
          "Gr\xc3\xbc\xc3\x9f"
          "e \xe2\x9c\x93 ";
    s.email.to = {"a@example.com"};
    s.email.text = "t";
  }
  {
    Sample& s = add("subject: one unbreakable word");
    s.email.subject = std::string(200, 'x');
    s.email.to = {"a@example.com"};
    s.email.text = "t";
  }
  {
    Sample& s = add("subject: a first word that only fits after Subject:");
    s.email.subject = std::string(69, 'f') + " " + std::string(77, 'g') + " end";
    s.email.to = {"a@example.com"};
    s.email.text = "t";
  }
  {
    Sample& s = add("subject: encoded-word look-alike, padding, tab, empty");
    s.email.subject = " =?UTF-8?B?eA==?= literally\tpadded ";
    s.email.to = {"a@example.com"};
    s.email.text = "t";
  }
  {
    Sample& s = add("empty subject");
    s.email.to = {"a@example.com"};
    s.email.text = "t";
  }
  {
    Sample& s = add("quoted-printable: long lines, equals signs, trailing blanks, dots, From");
    s.email.to = {"a@example.com"};
    s.email.subject = "qp";
    s.email.text = std::string(300, 'x') + "\n" + std::string(100, '=') + "\r\n" +
                   "trailing space \n" + "trailing tab\t\n" + ".\n" + ".leading dot\r\n" +
                   "From here\nFrom: there\n" +
                   "Gr\xc3\xbc\xc3\x9f"
                   "e \xe2\x9c\x93 " +
                   std::string(80, 'y') + "\r" + "tab\t";
  }
  {
    Sample& s = add("quoted-printable: every line length around 76, with and without a last break");
    s.email.to = {"a@example.com"};
    s.email.subject = "qp lengths";
    for (std::size_t length = 70; length <= 82; ++length) {
      for (const char last : {'x', '=', ' ', '\t'}) {
        s.email.text += std::string(length - 1, 'a') + last + "\n";
        s.email.html += std::string(length - 2, 'b') + "=" + last + "\r\n";
      }
    }
    s.email.html += std::string(75, 'c') + " ";
  }
  {
    Sample& s = add("CR, LF and CRLF mixed, empty lines, a final CR");
    s.email.to = {"a@example.com"};
    s.email.subject = "line ends";
    s.email.text = "one\rtwo\nthree\r\nfour\n\r\n\n\r\rfive\r";
    s.email.html = "\n\n<p>x</p>\r\n\r\n";
  }
  {
    Sample& s = add("html alone");
    s.email.to = {"a@example.com"};
    s.email.subject = "s";
    s.email.html = "<b>bold</b>";
  }
  {
    Sample& s = add("control characters and 8-bit bytes in the body");
    s.email.to = {"a@example.com"};
    s.email.subject = "bytes";
    s.email.text = std::string("nul") + '\0' + "soh\x01 del\x7f esc\x1b" + "\xc3\xa9\xe2\x82\xac";
  }
  {
    Sample& s = add("many recipients, duplicates in the envelope");
    for (int i = 0; i < 25; ++i) s.email.to.push_back("user" + std::to_string(i) + "@example.com");
    s.email.cc = {"USER1@example.com", "user2@EXAMPLE.COM", "Named <user3@Example.Com>"};
    s.email.bcc = {"user4@example.com", "hidden@example.com", "HIDDEN@example.com"};
    s.email.subject = "many";
    s.email.text = "t";
  }
  {
    Sample& s = add("address forms: IP literals, plus tags, subdomains, a 64-octet local part");
    s.email.from = "x@[192.0.2.1]";
    s.email.to = {"y@[IPv6:2001:db8::1]", "user+tag@sub.example.co.uk", "a.b-c_d@example-host.com",
                  std::string(64, 'l') + "@example.com"};
    s.email.reply_to = "reply@example.com";
    s.email.subject = "forms";
    s.email.text = "t";
  }
  {
    Sample& s = add("Message-ID from an odd job id and the sender's domain");
    s.job_id = "job 42.x=y<z>/\xc3\xa9";
    s.message_id_domain = "Squall <squall@mail.example.com>";
    s.default_from = "squall@mail.example.com";
    s.email.to = {"a@example.com"};
    s.email.subject = "id";
    s.email.text = "t";
  }
  {
    Sample& s = add("dates: a leap day before 1970, with a fraction of a second");
    s.date = sys_days{year{1968} / February / 29} + 23h + 59min + 59s + 999ms;
    s.email.to = {"a@example.com"};
    s.email.subject = "date";
    s.email.text = "t";
  }
  {
    Sample& s = add("dates: the first of January 2000");
    s.date = sys_days{year{2000} / January / 1} + 0h + 0min + 0s + 1us;
    s.email.to = {"a@example.com"};
    s.email.subject = "date";
    s.email.text = "t";
  }
  {
    Sample& s = add("refused: a recipient that is no address");
    s.email.to = {"a@example.com", "broken"};
    s.email.subject = "s";
    s.email.text = "t";
  }
  {
    Sample& s = add("refused: a Bcc that is no address (the message itself is fine)");
    s.email.to = {"a@example.com"};
    s.email.bcc = {"not an address"};
    s.email.subject = "s";
    s.email.text = "t";
  }
  {
    Sample& s = add("refused: a bad default sender and a bad Message-ID domain");
    s.default_from = "not an address";
    s.message_id_domain = "bad domain";
    s.email.to = {"a@example.com"};
    s.email.subject = "s";
    s.email.text = "t";
  }
  {
    Sample& s = add("refused: a bad cc and a bad reply_to");
    s.email.to = {"a@example.com"};
    s.email.cc = {"c@example.com", "<c@example.com"};
    s.email.reply_to = "r@";
    s.email.subject = "s";
    s.email.text = "t";
  }
  {
    Sample& s = add("refused: a subject with a line break");
    s.email.to = {"a@example.com"};
    s.email.subject = "a\r\nBcc: x@y.z";
    s.email.text = "t";
  }
  return samples;
}

// Emails made from pieces that exercise the same paths in many combinations, from a fixed seed
// (std::mt19937's sequence is the same everywhere; the raw numbers are used, not a distribution,
// whose results the standard leaves to the library).
std::vector<Sample> generated_samples() {
  static const std::vector<std::string> kAddresses = {
      "a@example.com",
      "Alice <alice@example.com>",
      "\"Doe, John\" <john@example.com>",
      "J\xc3\xb6rg M\xc3\xbcller <joerg@example.de>",
      "bob@EXAMPLE.org",
      "bob@example.org",
      "\"quoted..local\"@example.com",
      "user+tag@sub.example.co.uk",
      "x@[192.0.2.1]",
      "y@[IPv6:2001:db8::1]",
      "\xc3\x9cn\xc3\xaf"
      "c\xc3\xb6"
      "d\xc3\xa9 \xe2\x9c\x93 <u@example.com>",
      "\"Back\\\\slash \\\"Q\\\"\" <r@example.com>",
      "A Very Long Display Name That Goes On And On Beyond Seventy Characters <l@example.com>",
      "=?UTF-8?B?eA==?= <enc@example.com>",
      "Name.With.Dots <dots@example.com>",
      "O'Brien <ob@example.com>",
      "Bench Recipient <rcpt@example.com>",
      "\"\" <empty-name@example.com>",
      "Spaces   Inside <spaces@example.com>",
      "\xe5\xb1\xb1\xe7\x94\xb0\xe5\xa4\xaa\xe9\x83\x8e <yamada@example.jp>",
  };
  static const std::vector<std::string> kWords = {"hello",
                                                  "world",
                                                  "=",
                                                  ".",
                                                  "From ",
                                                  "a",
                                                  "   ",
                                                  "\t",
                                                  "\xc3\xa9",
                                                  "\xe2\x9c\x93",
                                                  "\xf0\x9f\x98\x80",
                                                  "=?",
                                                  "?=",
                                                  "x=y",
                                                  std::string(40, 'w'),
                                                  std::string(90, 'z'),
                                                  "<p>",
                                                  "</p>",
                                                  "\"",
                                                  "\\",
                                                  ",",
                                                  "Gr\xc3\xbc\xc3\x9f"
                                                  "e",
                                                  "==",
                                                  "end "};
  static const std::vector<std::string> kLineEnds = {"\n", "\r\n", "\r", "\n\n", ""};
  std::mt19937 random(20261130);
  const auto pick = [&](std::size_t count) { return static_cast<std::size_t>(random() % count); };
  const auto address = [&] { return kAddresses[pick(kAddresses.size())]; };
  const auto phrase = [&](std::size_t max_words, bool line_ends) {
    std::string text;
    const std::size_t words = pick(max_words + 1);
    for (std::size_t i = 0; i < words; ++i) {
      text += kWords[pick(kWords.size())];
      if (pick(3) == 0) text += ' ';
      if (line_ends && pick(4) == 0) text += kLineEnds[pick(kLineEnds.size())];
    }
    return text;
  };
  std::vector<Sample> samples;
  for (int n = 0; n < 400; ++n) {
    Sample s;
    s.name = "generated " + std::to_string(n);
    if (pick(2) == 0) s.email.from = address();
    for (std::size_t i = 1 + pick(8); i > 0; --i) s.email.to.push_back(address());
    for (std::size_t i = pick(4); i > 0; --i) s.email.cc.push_back(address());
    for (std::size_t i = pick(3); i > 0; --i) s.email.bcc.push_back(address());
    if (pick(3) == 0) s.email.reply_to = address();
    // Subjects: no line breaks (a header), spaces and tabs allowed.
    s.email.subject = phrase(pick(2) == 0 ? 4 : 30, false);
    switch (pick(3)) {
      case 0:
        s.email.text = phrase(60, true);
        break;
      case 1:
        s.email.html = phrase(60, true);
        break;
      default:
        s.email.text = phrase(60, true);
        s.email.html = phrase(60, true);
    }
    if (s.email.text.empty() && s.email.html.empty()) s.email.text = "t";
    // Any second from 1678 to 2261 (system_clock's range), sometimes with a fraction.
    const auto seconds = static_cast<std::int64_t>(random() % 18'000'000'000ull) - 9'000'000'000;
    s.date = system_clock::time_point(std::chrono::seconds(seconds)) +
             std::chrono::milliseconds(pick(2) == 0 ? 0 : random() % 1000);
    s.job_id = "job-" + std::to_string(random());
    samples.push_back(std::move(s));
  }
  return samples;
}

// The corpus as the golden file holds it: the written samples in full, the generated ones as
// digests.
std::string corpus_text() {
  std::string text;
  for (const Sample& sample : written_samples()) text += describe(sample);
  for (const Sample& sample : generated_samples()) {
    const std::string description = describe(sample);
    CHECK_MESSAGE(description.find("refused") == std::string::npos, description);
    std::ostringstream line;
    line << "=== " << sample.name << " digest " << std::hex << digest(description) << "\n";
    text += line.str();
  }
  return text;
}

// The text as a list of "=== name" sections, so that a difference is reported per sample.
std::vector<std::string> sections(const std::string& text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t next = text.find("\n=== ", start);
    next = next == std::string::npos ? text.size() : next + 1;
    out.push_back(text.substr(start, next - start));
    start = next;
  }
  return out;
}

}  // namespace

TEST_CASE("golden messages: build_mime, the envelope and the Message-ID are unchanged") {
  const std::string actual = corpus_text();
  if (std::getenv("SQUALL_UPDATE_MIME_GOLDEN") != nullptr) {
    std::ofstream(kGoldenPath, std::ios::binary) << actual;
    FAIL("rewrote " << kGoldenPath
                    << ": review its difference, then run the test without "
                       "SQUALL_UPDATE_MIME_GOLDEN");
  }
  std::ifstream file(kGoldenPath, std::ios::binary);
  REQUIRE_MESSAGE(file, "cannot open " << kGoldenPath << " (run the unit tests from the tree)");
  std::stringstream golden;
  golden << file.rdbuf();
  const std::vector<std::string> expected = sections(golden.str());
  const std::vector<std::string> got = sections(actual);
  CHECK(got.size() == expected.size());
  CHECK(expected.size() > 400);
  for (std::size_t i = 0; i < expected.size() && i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == expected[i]);
  }
}
