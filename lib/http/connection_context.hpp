// What the connections of one Server share on their loop: options, counters and budgets, the
// cork that gathers a pass's answers into one write, the pool of workspaces, the Date cache, and
// the connections' deadlines. A connection uses this object, never the Server's privates.
//
// Deadlines: each timer phase has one list, in deadline order. A phase has one duration, so a
// connection (re-)entering it goes to its list's tail (after a reload changes a duration it walks
// back to its place, a few steps at most), and the context keeps one loop timer for the earliest
// head of all lists (nginx keeps a red-black tree, h2o a timer wheel: a FIFO per duration is the
// simplest of the three for fixed durations). An idle connection then costs two pointers and a
// deadline instead of a uv_timer_t, and a busy one no timer operation per request. Deadlines are
// rounded up to a tick of kDeadlineTickMs: a timeout fires up to that much late (never early),
// and a connection answered several times within one tick moves on its list once.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "http/connection.hpp"
#include "http/short_equal.hpp"
#include "squall/core/clock.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/uv_handle.hpp"
#include "squall/http/response.hpp"
#include "squall/http/server.hpp"

namespace squall::http {

class ConnectionContext {
 public:
  using TimerPhase = Connection::TimerPhase;

  // `shared`: the budgets and connection count this server shares with the servers of other
  // loops (workers), or its own.
  ConnectionContext(Loop& loop, std::shared_ptr<const Router> router,
                    std::shared_ptr<SharedLimits> shared);
  // Cuts the connections still held by Responders loose and frees the spare workspaces.
  ~ConnectionContext();
  ConnectionContext(const ConnectionContext&) = delete;
  ConnectionContext& operator=(const ConnectionContext&) = delete;

  // New options (the constructor's and SIGHUP's): limits, timeouts, buffer size.
  void reconfigure(ServerOptions new_options);

  // The cork: responses produced while `owner` is being processed gather here, one write each.
  std::string& cork_for(Connection* owner) {
    if (cork_owner_ != owner) [[unlikely]]
      switch_cork(owner);
    return cork_;
  }
  void flush_cork() noexcept;
  void forget_cork(Connection* owner) noexcept;

  // Read buffers, parsers and request state, lent to connections while they have bytes. One
  // given back is kept as a spare while the spares are fewer than the most lent at once in the
  // last second or two (at least kMinSpareWorkspaces): the next burst of that size reuses them
  // instead of building its workspaces again. A trim each second while there are more spares
  // than that minimum frees those beyond the recent peak, so after a burst they fall back to
  // the minimum within about two seconds.
  static constexpr std::size_t kMinSpareWorkspaces = 32;
  // The granularity of deadlines, in loop milliseconds (a power of two).
  static constexpr std::uint64_t kDeadlineTickMs = 16;
  Workspace* acquire_workspace();
  void release_workspace(Workspace* workspace) noexcept;

  // Deadlines and the set of connections: every open connection is on exactly one phase list
  // (TimerPhase::none: no deadline); a closed one still held by Responders on the closed list.
  void add(Connection* connection) noexcept;  // A new connection, under no deadline yet.
  void set_phase(Connection* connection, TimerPhase phase) noexcept;
  void remove(Connection* connection) noexcept;  // Destroyed (or orphaned).
  // The connection closed: it stays listed (closed) until destroyed; the server may finish its
  // drain. Counted out of connections_open.
  void connection_closed(Connection* connection) noexcept;

  // A walk over the connections (the server's drain and close_all, the deadline timer's pass,
  // resuming output waiters): a connection it closes may complete the server's drain, whose
  // callback may delete the server and this context. While one is on the stack the server's drain
  // check (on_connection_closed) waits; the outermost walk runs it as its very last step.
  class Walk {
   public:
    explicit Walk(ConnectionContext& context) noexcept : context_(context) { ++context_.walks_; }
    Walk(const Walk&) = delete;
    Walk& operator=(const Walk&) = delete;
    ~Walk() {
      if (--context_.walks_ == 0 && context_.drain_check_due_) context_.run_drain_check();
    }

   private:
    ConnectionContext& context_;
  };
  // Runs the server's drain check now, or at the end of the outermost Walk.
  void check_drain() noexcept;
  // Every open connection, for drain and close_all (a copy: the callers close them).
  std::vector<Connection*> open_connections() const;
  bool has_open_connections() const noexcept { return stats.connections_open > 0; }
  Connection* first_open_connection() const noexcept;  // Any one of them, or nullptr.

  // Once unsent bytes fall to half the budget, connections paused for it read again.
  void resume_output_waiters() noexcept;
  // The start of a response head, "HTTP/1.1 <status> <reason>\r\nServer: ..\r\nDate: ..\r\n"
  // then "Content-Type: <content_type>\r\n" unless it is empty, then "Content-Length: " when
  // `content_length` (the caller appends the digits): built once per status, content type and
  // second (the Date), so a response head is one copy of it. The view lives until the next call.
  std::string_view head_prefix(int status, std::string_view content_type, bool content_length);
  // The whole head of the commonest answer: head_prefix(status, content_type, true), the
  // digits of content_length, then keep_alive_tail. For a keep-alive HTTP/1.1 answer with no
  // header the handler set; one copy when the same kind of answer repeats its length.
  std::string_view keep_alive_head(int status, std::string_view content_type,
                                   std::uint64_t content_length);

  // Whether a rate-limited log line may be written now; updates `last_ms`.
  bool once_a_second(std::uint64_t& last_ms) noexcept;

  Loop& loop;                            // The loop every connection lives on.
  const std::thread::id loop_thread;     // Responders must be copied and dropped here.
  std::shared_ptr<const Router> router;  // Current routes; replaced on reload.
  ServerOptions options;                 // Assigned in place: parsers point into it.
  ServerStats stats;                     // Counters for metrics.
  HttpDateCache date;                    // Shared Date header text.
  std::string keep_alive_header;         // "Keep-Alive: timeout=75\r\n".
  std::string keep_alive_tail;           // "\r\n" + keep_alive_header + "\r\n".
  // Request bodies buffered by every connection, response bytes queued and not yet written,
  // and the connections open (against max_connections), of this server and of those it shares
  // them with.
  std::shared_ptr<SharedLimits> shared;
  MemoryBudget& body_budget;                                   // shared->bodies.
  MemoryBudget& unsent_budget;                                 // shared->unsent.
  std::function<void(const RequestRecord&)> request_observer;  // Metrics and access log.
  std::function<void()> on_connection_closed;                  // The server's drain check.
  std::atomic<bool> draining{false};  // Answers say Connection: close; read from any thread.
  bool output_waiters = false;        // Some connection paused for unsent_budget.
  std::uint64_t clock_ns = 0;         // monotonic_ns() at this pass's start or last handler's end.
  std::uint64_t last_budget_log_ms = 0;  // 503s for a spent budget are logged once a second.

 private:
  struct List {
    Connection* head = nullptr;  // Earliest deadline.
    Connection* tail = nullptr;  // Latest deadline.
  };
  std::uint64_t duration_ms(TimerPhase phase) const noexcept;
  void unlink(Connection* connection) noexcept;
  void schedule() noexcept;
  void on_timer() noexcept;
  void run_drain_check() noexcept;             // May delete this context: the caller's last step.
  std::size_t spares_wanted() const noexcept;  // The recent peak, at least the minimum.
  void free_spares_beyond(std::size_t keep) noexcept;
  void trim_spares() noexcept;  // The trim timer's pass.
  // Loop::close() before it closes its handles: every open connection closes (its socket is
  // inside it, not a UvHandle the Loop knows).
  void close_for_loop() noexcept;

  static constexpr std::uint64_t kNoLength = ~std::uint64_t{0};  // HeadPrefix::completed_for.
  // One cached response-head prefix (head_prefix()).
  struct HeadPrefix {
    int status = 0;                // 0: unused.
    bool content_length = false;   // Ends with "Content-Length: ".
    std::string content_type;      // As asked for.
    std::size_t date_offset = 0;   // Where the Date value starts in text.
    std::time_t date_second = -1;  // The second the Date in text is for.
    std::size_t prefix_size = 0;   // The prefix is text's first prefix_size bytes.
    // With content_length: the digits of this length and keep_alive_tail follow the prefix in
    // text (keep_alive_head()); kNoLength when nothing follows.
    std::uint64_t completed_for = kNoLength;
    std::string text;

    bool matches(int wanted_status, std::string_view wanted_type,
                 bool wanted_length) const noexcept {
      return status == wanted_status && content_length == wanted_length &&
             detail::short_equal(content_type, wanted_type);
    }
  };
  // The Date value's length: an IMF-fixdate is always 29 bytes.
  static constexpr std::size_t kDateLength = 29;
  HeadPrefix& find_head_prefix(int status, std::string_view content_type, bool content_length);
  // A new entry (or `found`, whose Date had another length) built for find_head_prefix(); out
  // of line so that the lookup stays a leaf.
  [[gnu::noinline]] HeadPrefix& build_head_prefix(HeadPrefix* found, int status,
                                                  std::string_view content_type,
                                                  bool content_length, std::string_view now);
  void switch_cork(Connection* owner);  // Flushes the cork, then lends it to owner.

  std::array<HeadPrefix, 8> head_prefixes_;           // The pairs in use, reused in turn.
  std::size_t next_head_prefix_ = 0;                  // The entry a new pair replaces.
  HeadPrefix* last_head_prefix_ = nullptr;            // The entry of the last answer.
  std::array<List, Connection::kTimerPhases> lists_;  // One per TimerPhase.
  std::string cork_;                                  // Output gathered for cork_owner_.
  Connection* cork_owner_ = nullptr;                  // Whose bytes cork_ holds.
  Workspace* free_workspaces_ = nullptr;              // Spares; stats.spare_workspaces counts them.
  std::size_t lent_workspaces_ = 0;                   // Lent to connections now.
  std::size_t peak_lent_ = 0;                         // Most lent at once since the last trim.
  std::size_t previous_peak_lent_ = 0;                // The same for the second before it.
  std::size_t workspace_capacity_ = 0;                // Read buffer size, from the limits.
  UvHandle<uv_timer_t> timer_;                        // Fires at the earliest deadline.
  bool timer_armed_ = false;                          // timer_ is started.
  std::uint64_t timer_due_ms_ = 0;                    // When it fires (uv_now clock).
  UvHandle<uv_timer_t> trim_timer_;                   // Trims spares each second; unreferenced.
  squall::detail::CloseHook loop_close_hook_;         // close_for_loop(), run by Loop::close().
  bool trim_armed_ = false;                           // trim_timer_ is started.
  bool resuming_output_waiters_ = false;              // resume_output_waiters() is running.
  std::uint32_t walks_ = 0;                           // Walks on the stack.
  bool drain_check_due_ = false;                      // A connection closed during a walk.
};

}  // namespace squall::http
