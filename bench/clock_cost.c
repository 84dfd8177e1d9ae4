/* What a clock read costs on this machine, in ns per call: CLOCK_MONOTONIC (what squalld reads
 * twice per request, for its request durations and the blocking-handler check), the coarse clock
 * beside it, and time() (the Date header's second). On a virtual machine the monotonic clock is
 * the hypervisor's (kvm-clock here), and costs more than on bare metal.
 *
 * Usage: cc -O2 -o clock_cost bench/clock_cost.c && ./clock_cost */
#include <stdio.h>
#include <time.h>

static double now_ns(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)now.tv_sec * 1e9 + (double)now.tv_nsec;
}

static void measure(const char* name, clockid_t clock) {
  enum { kCalls = 2000000 };
  struct timespec sink;
  const double start = now_ns();
  for (int i = 0; i < kCalls; i++) clock_gettime(clock, &sink);
  printf("%-28s %6.1f ns\n", name, (now_ns() - start) / kCalls);
}

int main(void) {
  measure("clock_gettime(MONOTONIC)", CLOCK_MONOTONIC);
  measure("clock_gettime(MONOTONIC_COARSE)", CLOCK_MONOTONIC_COARSE);
  enum { kCalls = 2000000 };
  volatile time_t sink = 0;
  const double start = now_ns();
  for (int i = 0; i < kCalls; i++) sink = time(NULL);
  (void)sink;
  printf("%-28s %6.1f ns\n", "time()", (now_ns() - start) / kCalls);
  return 0;
}
