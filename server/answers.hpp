// Answers computed on the primary loop (the job service, the metrics registry) for requests
// received on any worker's loop: the Responder stays parked on its own loop under a ticket,
// only the ticket and the answer's data cross between threads.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "squall/core/loop.hpp"
#include "squall/http/responder.hpp"

namespace squall::squalld {

// An HTTP answer as plain data, so that another thread may build it.
struct Answer {
  int status = 500;
  std::string_view content_type;  // A literal: every answer's media type is a fixed one.
  std::vector<std::pair<std::string, std::string>> headers;  // Extra ones (Location, ...).
  std::string body;
};

// Delivers an Answer to the client that asked: call it once, on the primary loop. Copies may
// be kept and moved across threads (it holds no Responder).
using Reply = std::function<void(Answer)>;

// Sends `answer` through `responder` (its loop thread).
void send_answer(const http::Responder& responder, const Answer& answer);

// One per worker loop. Requests whose answer needs the primary loop's state park their
// Responder here; the Reply handed to the primary loop posts the answer back to this loop,
// where the Responder is taken out and answers. Loop thread of `loop`, except the Replies.
class AnswerDesk {
 public:
  AnswerDesk(Loop& loop, Loop& primary);
  AnswerDesk(const AnswerDesk&) = delete;
  AnswerDesk& operator=(const AnswerDesk&) = delete;

  // Runs `work` on the primary loop (at once when this desk's loop is the primary one) with a
  // Reply that answers `responder`'s request. An exception escaping `work` is a 500.
  void on_primary(const http::Responder& responder, std::function<void(Reply)> work);
  // Drops the Responders still waiting, before their loop closes (their Replies do nothing).
  void clear() noexcept;
  // Whether this desk's loop is the primary loop.
  bool primary() const noexcept { return &loop_ == &primary_; }

 private:
  void deliver(std::uint64_t ticket, const Answer& answer);

  Loop& loop_;                                                 // Where the Responders live.
  Loop& primary_;                                              // Where the work runs.
  RemoteLoop remote_;                                          // loop_, for the Replies.
  RemoteLoop primary_remote_;                                  // primary_, for the work.
  std::unordered_map<std::uint64_t, http::Responder> parked_;  // Waiting for their answer.
  std::uint64_t next_ticket_ = 1;                              // Never reused.
};

}  // namespace squall::squalld
