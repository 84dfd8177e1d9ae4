#include "server/answers.hpp"

#include <exception>

#include <spdlog/spdlog.h>

namespace squall::squalld {

void send_answer(const http::Responder& responder, const Answer& answer) {
  for (const auto& [name, value] : answer.headers) responder.header(name, value);
  responder.send(answer.status, answer.content_type, answer.body);
}

AnswerDesk::AnswerDesk(Loop& loop, Loop& primary)
    : loop_(loop), primary_(primary), remote_(loop.remote()), primary_remote_(primary.remote()) {}

void AnswerDesk::on_primary(const http::Responder& responder, std::function<void(Reply)> work) {
  const std::uint64_t ticket = next_ticket_++;
  parked_.emplace(ticket, responder);
  Reply reply;
  if (primary()) {
    // The work and its Reply run on this very loop: no hop back.
    reply = [this, ticket](Answer answer) { deliver(ticket, answer); };
  } else {
    // The desk outlives every callback its loop runs (it is cleared, then destroyed, only
    // after the loop stopped running); a Reply posted after that is dropped by the loop.
    reply = [this, remote = remote_, ticket](Answer answer) {
      remote.call_soon([this, ticket, answer = std::move(answer)] { deliver(ticket, answer); });
    };
  }
  auto run = [work = std::move(work), reply]() {
    try {
      work(reply);
    } catch (const std::exception& error) {
      spdlog::error("answering on the primary loop failed: {}", error.what());
      reply(Answer{500, "text/plain", {}, "internal error\n"});
    }
  };
  if (primary()) {
    run();
  } else if (!primary_remote_.call_soon(std::move(run))) {
    deliver(ticket, Answer{503, "text/plain", {{"Retry-After", "5"}}, "shutting down\n"});
  }
}

void AnswerDesk::deliver(std::uint64_t ticket, const Answer& answer) {
  const auto found = parked_.find(ticket);
  if (found == parked_.end()) return;
  const http::Responder responder = std::move(found->second);
  parked_.erase(found);
  send_answer(responder, answer);
}

void AnswerDesk::clear() noexcept {
  parked_.clear();
}

}  // namespace squall::squalld
