// ThreadSanitizer suppressions for a program built with -fsanitize=thread. Include this header
// in exactly one translation unit of the program (it defines the hook TSan looks for).
//
// Why: Debian's libuv is not built with ThreadSanitizer, and on Linux it closes descriptors with
// a raw syscall(SYS_close) that TSan's interceptors never see. TSan therefore still believes a
// socket libuv closed on the loop thread is open, and when a pool thread later gets the same
// descriptor number (a Maildir's opendir, a store file) and closes it, TSan reports a data race
// between that close and libuv's last read or epoll_ctl on the old socket. The two never share
// a descriptor; only the number was reused. The suppression matches reports whose top frame is
// a close (TSan matches a substring: close, closedir, fclose), so a race on memory elsewhere is
// still reported.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define SQUALL_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SQUALL_TSAN 1
#endif
#endif

#ifdef SQUALL_TSAN
extern "C" const char* __tsan_default_suppressions() {
  return "race_top:close\n";
}
#endif
