// The handler's handle on a pending answer: reference counts that keep the connection alive,
// the calls that answer, back-pressure for streamed answers, and coroutine handlers.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "core/hot.hpp"
#include "http/connection.hpp"
#include "http/connection_context.hpp"
#include "squall/core/task.hpp"
#include "squall/http/response.hpp"

namespace squall::http {

// The reference counts below are plain ints of a loop-owned object: a Responder copied or
// destroyed on another thread races with the loop and may free the connection there. That is a
// bug in the caller (keep the Responder on the loop; send data across threads), so it stops the
// process with a message naming it rather than corrupting memory silently. Connections are made
// on the loop thread, so the comparison costs one load per copy.
namespace {

void abort_on_thread_violation(const char* message) {
  std::fprintf(stderr, "squall: %s\n", message);
  std::abort();
}

std::atomic<ThreadViolationHandler> thread_violation_handler{&abort_on_thread_violation};

}  // namespace

ThreadViolationHandler set_thread_violation_handler(ThreadViolationHandler handler) noexcept {
  return thread_violation_handler.exchange(handler != nullptr ? handler
                                                              : &abort_on_thread_violation);
}

namespace {

[[gnu::cold, gnu::noinline]] void report_thread_violation(std::uint64_t id, const char* what) {
  char message[256];
  std::snprintf(message, sizeof message,
                "a Responder of connection %llu was %s off the loop thread; keep Responders on "
                "the loop and pass only data to other threads",
                static_cast<unsigned long long>(id), what);
  thread_violation_handler.load()(message);
}

}  // namespace

// In line in the two callers below: the check runs for every Responder made and dropped.
inline void Connection::check_loop_thread(const char* what) const noexcept {
  // An orphaned connection's context is gone; it was made on the thread it must be touched on,
  // and nothing else is left to check against.
  if (orphaned_ || std::this_thread::get_id() == context_->loop_thread) [[likely]]
    return;
  report_thread_violation(id_, what);
}

SQUALL_HOT void Connection::add_responder(std::uint64_t request_number) noexcept {
  check_loop_thread("copied");
  ++responders_;
  if (request_number == request_number_ && workspace_ != nullptr) ++workspace_->current_responders;
}

SQUALL_HOT void Connection::drop_responder(std::uint64_t request_number) noexcept {
  check_loop_thread("destroyed");
  --responders_;
  const bool current = request_number == request_number_ && workspace_ != nullptr &&
                       workspace_->current_responders > 0;
  if (current) --workspace_->current_responders;
  if (closed()) {
    maybe_destroy();
    return;
  }
  // Only the last Responder of the current request, dropped outside its handler call, settles
  // anything.
  if (!current || workspace_->current_responders > 0 || handler_running_) return;
  if (answer_pending()) {
    dropped_unanswered();
  } else if (!in_process_) {
    // The answer is finished: an idle connection gives its workspace back now.
    release_workspace_if_idle();
  }
}

void Connection::dropped_unanswered() noexcept {
  const Route* route = workspace_->route;
  spdlog::error("connection {}: the Responder for {} {} was dropped without an answer", id_,
                route != nullptr ? route->method : "", route != nullptr ? route->pattern : "");
  answer_internal_error();
}

// Made only by Connection::dispatch(), on the loop thread, for the request it dispatches (which
// holds a workspace): none of add_responder()'s checks can fail.
SQUALL_HOT Responder::Responder(Connection* connection, std::uint64_t request_number) noexcept
    : connection_(connection), request_number_(request_number) {
  ++connection->responders_;
  ++connection->workspace_->current_responders;
}

Responder::Responder(const Responder& other) noexcept
    : connection_(other.connection_), request_number_(other.request_number_) {
  if (connection_ != nullptr) connection_->add_responder(request_number_);
}

SQUALL_HOT Responder::Responder(Responder&& other) noexcept
    : connection_(other.connection_), request_number_(other.request_number_) {
  other.connection_ = nullptr;
}

Responder& Responder::operator=(Responder other) noexcept {
  std::swap(connection_, other.connection_);
  std::swap(request_number_, other.request_number_);
  return *this;
}

SQUALL_HOT Responder::~Responder() {
  if (connection_ != nullptr) connection_->drop_responder(request_number_);
}

SQUALL_HOT Connection* Responder::live_connection() const noexcept {
  Connection* connection = connection_;
  if (connection == nullptr || !connection->answer_pending() ||
      connection->request_number_ != request_number_) {
    return nullptr;
  }
  return connection;
}

bool Responder::connected() const noexcept {
  return live_connection() != nullptr;
}

const Responder& Responder::header(std::string_view name, std::string_view value) const {
  if (!is_header_name(name)) {
    throw std::invalid_argument("response header name \"" + std::string(name) +
                                "\" is not an HTTP token");
  }
  if (!is_header_value(value)) {
    throw std::invalid_argument("response header " + std::string(name) +
                                ": value holds CR, LF or another control character");
  }
  Connection* connection = live_connection();
  if (connection == nullptr) return *this;
  if (connection->state_ != Connection::State::answering) {
    throw std::logic_error("response header " + std::string(name) +
                           ": the response has already started");
  }
  connection->workspace_->response_headers.append(name).append(": ").append(value).append("\r\n");
  return *this;
}

SQUALL_HOT bool Responder::send(int status, std::string_view content_type,
                                std::string_view body) const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->respond(status, content_type, body);
}

bool Responder::send(const Response& response) const {
  for (const auto& [name, value] : response.headers) header(name, value);
  return send(response.status, response.content_type, response.body);
}

bool Responder::start(int status, std::string_view content_type) const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->start_stream(status, content_type);
}

bool Responder::write(std::string_view chunk) const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->write_stream(chunk);
}

bool Responder::finish() const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->finish_stream();
}

namespace {

std::string describe(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& caught) {
    return caught.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

}  // namespace

// Resumes every drained() waiter and runs the on_drain callback from a later loop turn, never
// from inside a write callback or close_now(), whose callers are in the middle of something.
void Connection::wake_drain_waiters() noexcept {
  if (workspace_ == nullptr) return;
  if (workspace_->drain_waiters.empty() && !workspace_->on_drain) return;
  auto waiters = std::move(workspace_->drain_waiters);
  workspace_->drain_waiters.clear();
  auto callback = std::move(workspace_->on_drain);
  workspace_->on_drain = nullptr;
  const std::uint64_t id = id_;
  try {
    context_->loop.call_soon([waiters = std::move(waiters), callback = std::move(callback), id] {
      for (const auto& node : waiters) {
        const std::coroutine_handle<> waiter = std::exchange(node->waiter, nullptr);
        if (waiter) waiter.resume();
      }
      if (!callback) return;
      try {
        callback();
      } catch (const std::exception& error) {
        spdlog::error("connection {}: on_drain callback threw: {}", id, error.what());
      } catch (...) {
        spdlog::error("connection {}: on_drain callback threw a non-standard exception", id);
      }
    });
  } catch (const std::exception& error) {
    // Out of memory: the waiters stay suspended until the task is destroyed.
    spdlog::error("connection {}: cannot schedule the drain wake-up: {}", id_, error.what());
  }
}

bool Responder::writable() const noexcept {
  Connection* connection = live_connection();
  return connection != nullptr && connection->unsent() <= connection->high_water();
}

std::size_t Responder::unsent_bytes() const noexcept {
  return connection_ != nullptr && connection_->handle_open_ ? connection_->unsent() : 0;
}

void Responder::on_drain(std::function<void()> callback) const {
  Connection* connection = live_connection();
  if (connection == nullptr || connection->unsent() <= connection->high_water()) {
    // Nothing to wait for (or nobody to wait on): run it on the next turn, as a wait would.
    // (A connection cut loose by a destroyed server has no loop to run it on.)
    Loop* loop =
        connection_ != nullptr && !connection_->orphaned_ ? &connection_->context_->loop : nullptr;
    if (loop != nullptr && callback) loop->call_soon(std::move(callback));
    return;
  }
  connection->workspace_->on_drain = std::move(callback);
}

Drained Responder::drained() const {
  return Drained(*this);
}

bool Drained::await_ready() const noexcept {
  Connection* connection = responder_.live_connection();
  return connection == nullptr || connection->unsent() <= connection->high_water();
}

bool Drained::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (token.stop_requested()) {
    cancelled_ = true;
    return false;
  }
  Connection* connection = responder_.live_connection();
  if (connection == nullptr) return false;
  node_ = std::make_shared<detail::DrainWaiter>();
  node_->waiter = waiter;
  connection->workspace_->drain_waiters.push_back(node_);
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
  return true;
}

void Drained::OnStop::operator()() const noexcept {
  // Resume from the next loop turn, not from inside request_stop(). The connection's wake-up,
  // if it comes as well, finds the waiter taken.
  self->cancelled_ = true;
  std::shared_ptr<detail::DrainWaiter> node = self->node_;
  if (self->responder_.connection_->orphaned_) return;  // The server and its loop are gone.
  try {
    self->responder_.connection_->context_->loop.call_soon([node] {
      const std::coroutine_handle<> waiter = std::exchange(node->waiter, nullptr);
      if (waiter) waiter.resume();
    });
  } catch (...) {
    // Out of memory: the connection's own wake-up (at close or drain) still resumes it.
  }
}

void Drained::await_resume() {
  on_stop_.reset();
  node_.reset();
  if (cancelled_) throw CancelledError("squall::http::Responder::drained: cancelled");
  if (!responder_.connected()) {
    throw CancelledError("squall::http::Responder::drained: the client went away");
  }
}

Drained::~Drained() {
  on_stop_.reset();
  if (node_ != nullptr) node_->waiter = nullptr;
}

void Connection::handler_failed(std::uint64_t request_number, const Route* route,
                                std::exception_ptr error) noexcept {
  const bool live = answer_pending() && request_number == request_number_;
  bool cancelled = false;
  const char* body_failure = nullptr;
  try {
    std::rethrow_exception(error);
  } catch (const CancelledError&) {
    cancelled = true;
  } catch (const BodyError& failure) {
    body_failure = failure.what();
  } catch (...) {
  }
  const std::string_view method = route != nullptr ? std::string_view(route->method) : "";
  const std::string_view pattern = route != nullptr ? std::string_view(route->pattern) : "";
  if (cancelled && !live) {
    spdlog::debug("connection {}: handler for {} {} cancelled: the client went away", id_, method,
                  pattern);
    return;
  }
  if (body_failure != nullptr && !live) {
    // The connection answered the client already (413, 408, ...): not the handler's fault.
    spdlog::debug("connection {}: handler for {} {} stopped: {}", id_, method, pattern,
                  body_failure);
    return;
  }
  try {
    spdlog::error("connection {}: handler for {} {} threw: {}", id_, method, pattern,
                  describe(error));
  } catch (...) {
    // Out of memory for the log line: the client still gets its 500.
  }
  if (live) answer_internal_error();
}

// The root frame of a coroutine handler's task (spawn's, specialised: no completion callback,
// and the Task<Response> form's send in the same frame). Registered with its Loop while it
// lives, so Loop::close() destroys it if it is still suspended then. What the task throws goes
// to the connection (a 500 and the log line), or, while run_handler() is still starting it, back
// to run_handler(), which rethrows it to dispatch() as a callback's exception.
struct Responder::HandlerRoot {
  // Its frame comes from the per-thread frame cache (PromiseBase), as every task's does.
  struct promise_type : squall::detail::PromiseBase {
    squall::detail::TaskLink link;         // On its Loop's list of tasks.
    Responder responder;                   // The answer the task owes.
    std::shared_ptr<const Router> routes;  // Keeps `route` valid for the log line.
    const Route* route = nullptr;          // The matched route.
    std::exception_ptr error;              // What the task threw.
    bool starting = true;                  // run_handler() has not returned yet.
    bool finished = false;                 // The body ended while starting.

    HandlerRoot get_return_object() noexcept {
      return HandlerRoot{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    struct Release {
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<promise_type> frame) const noexcept {
        promise_type& promise = frame.promise();
        if (promise.starting) {
          promise.finished = true;  // run_handler() takes the outcome and destroys the frame.
          return;
        }
        if (promise.error && promise.responder.connection_ != nullptr) {
          promise.responder.connection_->handler_failed(promise.responder.request_number_,
                                                        promise.route, promise.error);
        }
        Loop::release_task(promise.link);
        frame.destroy();
      }
      void await_resume() const noexcept {}
    };
    Release final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() noexcept { error = std::current_exception(); }
  };
  // `co_await OwnPromise{}` gives the body its own promise, without suspending.
  struct OwnPromise {
    promise_type* promise = nullptr;
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<promise_type> frame) noexcept {
      promise = &frame.promise();
      return false;
    }
    promise_type& await_resume() const noexcept { return *promise; }
  };

  std::coroutine_handle<promise_type> frame;  // Owned by itself once started.

  static HandlerRoot run(Task<void> task) { co_await std::move(task); }
  static HandlerRoot run(Task<Response> task) {
    const promise_type& self = co_await OwnPromise{};
    const Response response = co_await std::move(task);
    self.responder.send(response);
  }

  // Registers and starts `root` for the request `responder` answers.
  static void start(const Responder& responder, Connection& connection, HandlerRoot root) {
    Loop& loop = connection.context_->loop;
    Workspace& workspace = *connection.workspace_;
    promise_type& promise = root.frame.promise();
    promise.responder = responder;
    promise.routes = connection.context_->router;
    promise.route = workspace.route;
    workspace.handler_stop = std::stop_source();
    promise.stop_token = workspace.handler_stop.get_token();
    loop.adopt_task(promise.link, root.frame);
    // The body runs until its first suspension (or its end) now, inside dispatch().
    squall::detail::resume(root.frame);
    if (!promise.finished) {
      promise.starting = false;  // From now on the frame reports and frees itself.
      return;
    }
    // It ended before returning here: an exception goes to dispatch(), which answers and logs
    // as for a callback.
    const std::exception_ptr error = std::move(promise.error);
    Loop::release_task(promise.link);
    root.frame.destroy();
    if (error) std::rethrow_exception(error);
  }
};

void Responder::run_handler(Task<void> task) const {
  Connection* connection = live_connection();
  if (connection == nullptr) return;
  if (connection->context_->loop.closed()) {
    throw std::logic_error("squall::http::Responder::run_handler: the loop is closed");
  }
  HandlerRoot::start(*this, *connection, HandlerRoot::run(std::move(task)));
}

void Responder::run_handler(Task<Response> task) const {
  Connection* connection = live_connection();
  if (connection == nullptr) return;
  if (connection->context_->loop.closed()) {
    throw std::logic_error("squall::http::Responder::run_handler: the loop is closed");
  }
  HandlerRoot::start(*this, *connection, HandlerRoot::run(std::move(task)));
}

}  // namespace squall::http
