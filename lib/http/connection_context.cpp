#include "http/connection_context.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>

#include <spdlog/spdlog.h>

#include "core/hot.hpp"
#include "http/short_equal.hpp"

namespace squall::http {

namespace {

constexpr std::uint64_t kSpareTrimPeriodMs = 1000;           // How often spares are trimmed.
constexpr std::size_t kMaxRetainedBodyCapacity = 64 * 1024;  // Larger bodies give memory back.

std::size_t index(Connection::TimerPhase phase) noexcept {
  return static_cast<std::size_t>(phase);
}

}  // namespace

ConnectionContext::ConnectionContext(Loop& loop, std::shared_ptr<const Router> router,
                                     std::shared_ptr<SharedLimits> shared_limits)
    : loop(loop),
      loop_thread(std::this_thread::get_id()),
      router(std::move(router)),
      shared(std::move(shared_limits)),
      body_budget(shared->bodies),
      unsent_budget(shared->unsent),
      timer_(loop, this, uv_timer_init, "connections' deadline timer"),
      trim_timer_(loop, this, uv_timer_init, "workspace trim timer") {
  // Spares alone never keep the loop running.
  uv_unref(trim_timer_.handle());
  loop_close_hook_.owner = this;
  loop_close_hook_.run = [](void* owner) noexcept {
    static_cast<ConnectionContext*>(owner)->close_for_loop();
  };
  loop.adopt_close_hook(loop_close_hook_);
}

ConnectionContext::~ConnectionContext() {
  loop_close_hook_.unlink();
  // Connections still referenced by a Responder outlive the server: cut them loose.
  for (const List& list : lists_) {
    for (Connection* connection = list.head; connection != nullptr;) {
      Connection* next = connection->timer_next;
      connection->timer_prev = connection->timer_next = nullptr;
      connection->orphan();
      connection = next;
    }
  }
  free_spares_beyond(0);
  // timer_ and trim_timer_ (UvHandles) close themselves, or only free their memory after
  // Loop::close().
}

void ConnectionContext::reconfigure(ServerOptions new_options) {
  // Parsers hold a pointer to options.limits: assign in place so it stays valid.
  options = std::move(new_options);
  const auto& limits = options.limits;
  body_budget.limit = limits.max_buffered_body_bytes;
  unsent_budget.limit = limits.max_unsent_bytes;
  // The buffer holds the largest head the limits allow plus room for the next read.
  const std::size_t head = limits.max_url_bytes + limits.max_header_bytes + 64;
  const std::size_t capacity = std::max<std::size_t>(16 * 1024, (head + 4096 + 4095) / 4096 * 4096);
  // Spares of the old size would not fit the new limits: they go now (lent ones when given back).
  if (capacity != workspace_capacity_) free_spares_beyond(0);
  workspace_capacity_ = capacity;
  keep_alive_header =
      "Keep-Alive: timeout=" + std::to_string(options.timeouts.keepalive.count() / 1000) + "\r\n";
  keep_alive_tail = "\r\n" + keep_alive_header + "\r\n";
  // The server name and the keep-alive timeout may have changed.
  for (HeadPrefix& prefix : head_prefixes_) prefix.status = 0;
}

SQUALL_HOT ConnectionContext::HeadPrefix& ConnectionContext::find_head_prefix(
    int status, std::string_view content_type, bool content_length) {
  const std::string_view now = date.now();
  // The entry of the last answer first: a server answers the same kind again and again.
  HeadPrefix* found = last_head_prefix_;
  if (found == nullptr || !found->matches(status, content_type, content_length)) [[unlikely]] {
    found = nullptr;
    for (HeadPrefix& prefix : head_prefixes_) {
      if (prefix.matches(status, content_type, content_length)) {
        found = &prefix;
        break;
      }
    }
  }
  if (found != nullptr && now.size() == kDateLength) [[likely]] {
    // The same second in most calls; a new one is patched in place.
    if (found->date_second != date.second()) [[unlikely]] {
      std::memcpy(found->text.data() + found->date_offset, now.data(), kDateLength);
      found->date_second = date.second();
    }
    last_head_prefix_ = found;
    return *found;
  }
  HeadPrefix& built = build_head_prefix(found, status, content_type, content_length, now);
  last_head_prefix_ = &built;
  return built;
}

ConnectionContext::HeadPrefix& ConnectionContext::build_head_prefix(HeadPrefix* found, int status,
                                                                    std::string_view content_type,
                                                                    bool content_length,
                                                                    std::string_view now) {
  if (found == nullptr) {
    found = &head_prefixes_[next_head_prefix_];
    next_head_prefix_ = (next_head_prefix_ + 1) % head_prefixes_.size();
  }
  HeadPrefix& prefix = *found;
  prefix.status = status;
  prefix.content_length = content_length;
  prefix.content_type.assign(content_type);
  std::string& text = prefix.text;
  text.assign("HTTP/1.1 ");
  text.append(std::to_string(status)).append(" ").append(reason_phrase(status));
  text.append("\r\nServer: ").append(options.server_name).append("\r\nDate: ");
  prefix.date_offset = text.size();
  prefix.date_second = date.second();
  text.append(now).append("\r\n");
  if (!content_type.empty()) text.append("Content-Type: ").append(content_type).append("\r\n");
  if (content_length) text.append("Content-Length: ");
  prefix.prefix_size = text.size();
  prefix.completed_for = kNoLength;
  // A Date of another length (never, for an IMF-fixdate) is rebuilt each time.
  if (now.size() != kDateLength) prefix.status = 0;
  return prefix;
}

std::string_view ConnectionContext::head_prefix(int status, std::string_view content_type,
                                                bool content_length) {
  const HeadPrefix& prefix = find_head_prefix(status, content_type, content_length);
  return std::string_view(prefix.text).substr(0, prefix.prefix_size);
}

SQUALL_HOT std::string_view ConnectionContext::keep_alive_head(int status,
                                                               std::string_view content_type,
                                                               std::uint64_t content_length) {
  HeadPrefix& prefix = find_head_prefix(status, content_type, true);
  if (prefix.completed_for != content_length) {
    // Another length: its digits and the ending replace the last one's.
    prefix.text.resize(prefix.prefix_size);
    char digits[24];
    const auto result = std::to_chars(digits, digits + sizeof digits, content_length);
    prefix.text.append(digits, static_cast<std::size_t>(result.ptr - digits));
    prefix.text.append(keep_alive_tail);
    prefix.completed_for = content_length;
  }
  return prefix.text;
}

bool ConnectionContext::once_a_second(std::uint64_t& last_ms) noexcept {
  // A flood of failures must not become a flood of log lines.
  const std::uint64_t now = loop.now_ms();
  if (last_ms != 0 && now - last_ms < 1000) return false;
  last_ms = now == 0 ? 1 : now;
  return true;
}

// ---- The cork --------------------------------------------------------------------------------

SQUALL_HOT void ConnectionContext::switch_cork(Connection* owner) {
  flush_cork();
  cork_owner_ = owner;
}

SQUALL_HOT void ConnectionContext::flush_cork() noexcept {
  if (cork_owner_ == nullptr) return;
  Connection* owner = cork_owner_;
  cork_owner_ = nullptr;
  owner->write_out(cork_);
}

void ConnectionContext::forget_cork(Connection* owner) noexcept {
  if (cork_owner_ != owner) return;
  cork_.clear();
  cork_owner_ = nullptr;
}

// ---- Workspaces ------------------------------------------------------------------------------

SQUALL_HOT Workspace* ConnectionContext::acquire_workspace() {
  Workspace* workspace = free_workspaces_;
  if (workspace != nullptr) {
    free_workspaces_ = workspace->next_free;
    --stats.spare_workspaces;
  } else {
    workspace = new Workspace(options.limits, &body_budget);
    workspace->buffer = new char[workspace_capacity_];
    workspace->capacity = workspace_capacity_;
    ++stats.workspaces_created;
  }
  ++lent_workspaces_;
  peak_lent_ = std::max(peak_lent_, lent_workspaces_);
  workspace->next_free = nullptr;
  workspace->begin = workspace->end = 0;
  workspace->parser.reset();
  return workspace;
}

SQUALL_HOT void ConnectionContext::release_workspace(Workspace* workspace) noexcept {
  workspace->parser.release_body_budget();
  // The request's fields are views into the buffer and are cleared when the next message
  // begins (RequestParser::begin_message); only what it owns is let go here.
  if (workspace->request.body_stream_ != nullptr) workspace->request.body_stream_.reset();
  workspace->request.connection_ = nullptr;
  workspace->response_headers.clear();
  workspace->remote_address.clear();
  workspace->route = nullptr;
  workspace->current_responders = 0;
  // Set only for late answers, coroutine handlers, streamed request bodies and streamed
  // answers: tested first, since most requests leave them empty and this runs for each one.
  if (workspace->routes_in_use != nullptr) workspace->routes_in_use.reset();
  if (workspace->handler_stop.stop_possible()) {
    workspace->handler_stop = std::stop_source(std::nostopstate);
  }
  if (!workspace->drain_waiters.empty()) workspace->drain_waiters.clear();
  if (workspace->on_drain) workspace->on_drain = nullptr;
  if (workspace->body_stream != nullptr) workspace->body_stream.reset();
  --lent_workspaces_;
  if (stats.spare_workspaces.load() >= spares_wanted() ||
      workspace->capacity != workspace_capacity_) {
    delete workspace;
    return;
  }
  if (workspace->request.body_.capacity() > kMaxRetainedBodyCapacity) {
    std::string().swap(workspace->request.body_);
  }
  workspace->next_free = free_workspaces_;
  free_workspaces_ = workspace;
  ++stats.spare_workspaces;
  if (stats.spare_workspaces.load() > kMinSpareWorkspaces && !trim_armed_ &&
      trim_timer_.is_open()) {
    uv_timer_start(
        trim_timer_.get(),
        [](uv_timer_t* timer) { static_cast<ConnectionContext*>(timer->data)->trim_spares(); },
        kSpareTrimPeriodMs, kSpareTrimPeriodMs);
    trim_armed_ = true;
  }
}

std::size_t ConnectionContext::spares_wanted() const noexcept {
  return std::max({kMinSpareWorkspaces, peak_lent_, previous_peak_lent_});
}

void ConnectionContext::free_spares_beyond(std::size_t keep) noexcept {
  while (stats.spare_workspaces.load() > keep) {
    Workspace* workspace = free_workspaces_;
    free_workspaces_ = workspace->next_free;
    --stats.spare_workspaces;
    delete workspace;
  }
}

void ConnectionContext::trim_spares() noexcept {
  // The peak of the second that just ended and of the one before it bound the spares kept.
  previous_peak_lent_ = peak_lent_;
  peak_lent_ = lent_workspaces_;
  free_spares_beyond(spares_wanted());
  if (stats.spare_workspaces.load() <= kMinSpareWorkspaces) {
    uv_timer_stop(trim_timer_.get());
    trim_armed_ = false;
  }
}

// ---- Connections and their deadlines ---------------------------------------------------------

std::uint64_t ConnectionContext::duration_ms(TimerPhase phase) const noexcept {
  const auto& timeouts = options.timeouts;
  switch (phase) {
    case TimerPhase::first_byte:
    case TimerPhase::head:
      return static_cast<std::uint64_t>(timeouts.header.count());
    case TimerPhase::body:
    case TimerPhase::body_held:
      return static_cast<std::uint64_t>(timeouts.body.count());
    case TimerPhase::idle:
      return static_cast<std::uint64_t>(timeouts.keepalive.count());
    case TimerPhase::write:
      return static_cast<std::uint64_t>(timeouts.write.count());
    case TimerPhase::lingering:
      return static_cast<std::uint64_t>(timeouts.lingering.count());
    case TimerPhase::none:
    case TimerPhase::closed:
      break;
  }
  return 0;
}

void ConnectionContext::add(Connection* connection) noexcept {
  connection->set_timer_phase(TimerPhase::none);
  List& list = lists_[index(TimerPhase::none)];
  connection->timer_prev = list.tail;
  connection->timer_next = nullptr;
  if (list.tail != nullptr) list.tail->timer_next = connection;
  list.tail = connection;
  if (list.head == nullptr) list.head = connection;
  ++stats.connections_open;
}

SQUALL_HOT inline void ConnectionContext::unlink(Connection* connection) noexcept {
  List& list = lists_[index(connection->timer_phase())];
  if (connection->timer_prev != nullptr) {
    connection->timer_prev->timer_next = connection->timer_next;
  } else if (list.head == connection) {
    list.head = connection->timer_next;
  }
  if (connection->timer_next != nullptr) {
    connection->timer_next->timer_prev = connection->timer_prev;
  } else if (list.tail == connection) {
    list.tail = connection->timer_prev;
  }
  connection->timer_prev = connection->timer_next = nullptr;
}

SQUALL_HOT void ConnectionContext::set_phase(Connection* connection, TimerPhase phase) noexcept {
  // Deadlines are rounded up to the next tick, so a timeout fires up to kDeadlineTickMs late and
  // never early, and a connection answered again within the same tick keeps its place.
  const std::uint64_t deadline =
      (loop.now_ms() + duration_ms(phase) + kDeadlineTickMs - 1) & ~(kDeadlineTickMs - 1);
  // Re-entering the same phase with the same deadline changes nothing: the list is sorted by
  // deadline, so the entry is in its place already (the idle deadline of a connection answered
  // again within the same tick).
  if (connection->timer_phase() == phase && connection->deadline_ms == deadline) return;
  List& list = lists_[index(phase)];
  unlink(connection);
  connection->set_timer_phase(phase);
  connection->deadline_ms = deadline;
  // From the tail back to the last entry due no later than this one: the first step ends the
  // walk unless a reload shortened this phase's duration.
  Connection* after = list.tail;
  while (after != nullptr && after->deadline_ms > deadline) after = after->timer_prev;
  connection->timer_prev = after;
  connection->timer_next = after != nullptr ? after->timer_next : list.head;
  if (connection->timer_next != nullptr) {
    connection->timer_next->timer_prev = connection;
  } else {
    list.tail = connection;
  }
  if (after != nullptr) {
    after->timer_next = connection;
  } else {
    list.head = connection;
  }
  if (phase == TimerPhase::none || phase == TimerPhase::closed) return;
  // The loop timer moves only when this deadline comes before the one it waits for.
  if (!timer_armed_ || deadline < timer_due_ms_) schedule();
}

void ConnectionContext::remove(Connection* connection) noexcept {
  unlink(connection);
  connection->set_timer_phase(TimerPhase::none);
}

void ConnectionContext::connection_closed(Connection* connection) noexcept {
  set_phase(connection, TimerPhase::closed);
  --stats.connections_open;
  shared->connections_open.fetch_sub(1, std::memory_order_relaxed);  // Taken by the Server.
  check_drain();
}

void ConnectionContext::check_drain() noexcept {
  if (walks_ > 0) {
    drain_check_due_ = true;
    return;
  }
  run_drain_check();
}

void ConnectionContext::run_drain_check() noexcept {
  drain_check_due_ = false;
  // A copy: the check may delete the server, and with it this context and its members.
  const std::function<void()> check = on_connection_closed;
  if (check) check();
}

std::vector<Connection*> ConnectionContext::open_connections() const {
  std::vector<Connection*> connections;
  connections.reserve(stats.connections_open);
  for (std::size_t phase = 0; phase < lists_.size(); ++phase) {
    if (phase == index(TimerPhase::closed)) continue;
    for (Connection* connection = lists_[phase].head; connection != nullptr;
         connection = connection->timer_next) {
      connections.push_back(connection);
    }
  }
  return connections;
}

Connection* ConnectionContext::first_open_connection() const noexcept {
  for (std::size_t phase = 0; phase < lists_.size(); ++phase) {
    if (phase != index(TimerPhase::closed) && lists_[phase].head != nullptr) {
      return lists_[phase].head;
    }
  }
  return nullptr;
}

void ConnectionContext::schedule() noexcept {
  std::uint64_t earliest = 0;
  bool any = false;
  for (std::size_t phase = 0; phase < lists_.size(); ++phase) {
    if (phase == index(TimerPhase::none) || phase == index(TimerPhase::closed)) continue;
    const Connection* head = lists_[phase].head;
    if (head != nullptr && (!any || head->deadline_ms < earliest)) {
      earliest = head->deadline_ms;
      any = true;
    }
  }
  if (timer_armed_ && (!any || earliest != timer_due_ms_)) {
    uv_timer_stop(timer_.get());
    timer_armed_ = false;
  }
  // After Loop::close() the timer is closed: nothing is due any more.
  if (!any || timer_armed_ || !timer_.is_open()) return;
  const std::uint64_t now = loop.now_ms();
  uv_timer_start(
      timer_.get(),
      [](uv_timer_t* timer) { static_cast<ConnectionContext*>(timer->data)->on_timer(); },
      earliest > now ? earliest - now : 0, 0);
  timer_armed_ = true;
  timer_due_ms_ = earliest;
}

void ConnectionContext::on_timer() noexcept {
  const Walk walk(*this);  // Closing the last connection may end the drain: after this pass.
  timer_armed_ = false;
  const std::uint64_t now = loop.now_ms();
  for (std::size_t phase = 0; phase < lists_.size(); ++phase) {
    if (phase == index(TimerPhase::none) || phase == index(TimerPhase::closed)) continue;
    // Each expiry moves its connection off this list (to another phase, or closed).
    while (lists_[phase].head != nullptr && lists_[phase].head->deadline_ms <= now) {
      Connection* due = lists_[phase].head;
      due->expire();
      if (lists_[phase].head == due) set_phase(due, TimerPhase::none);  // Never loop on it.
    }
  }
  schedule();
}

void ConnectionContext::close_for_loop() noexcept {
  const Walk walk(*this);  // The last close may end the server's drain: after this pass.
  // Each close moves its connection to the closed list.
  while (Connection* connection = first_open_connection()) connection->close_now();
}

void ConnectionContext::resume_output_waiters() noexcept {
  if (!output_waiters || resuming_output_waiters_ || unsent_budget.used > unsent_budget.limit / 2) {
    return;
  }
  const Walk walk(*this);
  output_waiters = false;
  resuming_output_waiters_ = true;
  std::vector<Connection*> connections;
  try {
    connections = open_connections();
  } catch (const std::bad_alloc&) {
    output_waiters = true;  // Tried again at the next write completion.
  }
  for (Connection* connection : connections) {
    // It may pause again, which sets output_waiters again.
    if (connection->waiting_for_output_budget()) connection->resume_after_output_budget();
  }
  resuming_output_waiters_ = false;
}

}  // namespace squall::http
