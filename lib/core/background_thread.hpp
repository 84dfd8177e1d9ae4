// The threads squall starts beside an event loop to do its bulk work (the job store's commits,
// its WAL checkpoints, the log writer) name themselves and then call
// schedule_as_background(). Internal to the libraries.
#pragma once

#include <pthread.h>
#include <sched.h>

namespace squall::detail {

// Puts the calling thread under SCHED_BATCH where there is one (Linux): its wake-ups then do
// not preempt the thread running on its CPU. Where it shares a CPU with a loop, work handed
// to it (a log line, an insert) no longer interrupts the loop's pass once per item: it runs
// when the loop waits or its time slice ends, with the same fair share of the CPU, and takes
// everything queued by then at once. On a CPU of its own nothing changes. Any user may
// choose the policy; if it is refused the thread keeps the default one.
inline void schedule_as_background() noexcept {
#ifdef SCHED_BATCH
  const sched_param no_priority{};  // SCHED_BATCH takes priority 0 only.
  pthread_setschedparam(pthread_self(), SCHED_BATCH, &no_priority);
#endif
}

}  // namespace squall::detail
