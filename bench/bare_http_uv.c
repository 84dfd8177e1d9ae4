/* The limit of squalld's design, for bench/run.sh: a C program on libuv that answers every read
 * with one fixed HTTP response per request it counts in the read (a request ends with an empty
 * line, "\r\n\r\n"), without parsing anything else. It owns one uv_tcp_t per connection and
 * nothing more; reads go into one buffer shared by every connection (the loop is single-threaded
 * and each read is answered before the next one), and answers leave with uv_try_write, falling
 * back to a uv_write of a copy only when the socket is full.
 *
 * Usage: bare_http_uv [PORT [RESPONSE_FILE]]   (PORT 0 or none: any free port). Prints
 * "listening on HOST:PORT". RESPONSE_FILE replaces the built-in response with its bytes (head and
 * body, sent as they are): bench/run.sh's "bare_same" gives it squalld's own answer, so both send
 * the same bytes and wrk does the same work for either.
 *
 * BARE_EXTRA (bench/keepalive_ab.sh's BARE_VARIANTS), a comma-separated list, adds things
 * squalld has and this loop lacks: "timer", a repeating libuv timer, so that epoll_wait waits
 * with a timeout; "thread", an idle second thread, so that the process's file table is shared
 * and the kernel takes a reference on each file a system call uses. Two more price what squalld's
 * own code does per request: "work", about 1,400 more instructions per request on data already in
 * the cache (squalld runs some 1,400 more than this loop, bench/callgrind.sh), and "pages", one
 * byte written in each of 32 pages per request (what squalld's code and data spread over, and what
 * each return from a system call makes the processor look up again where the kernel isolates its
 * page tables without PCID). "lines" reads 400 cache lines per request, four in each of 100
 * pages: about as many lines as squalld's request touches over this loop's (CACHE_SIM=lines
 * bench/callgrind.sh), which the kernel's work between two requests evicts. */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

static const char builtin_response[] =
    "HTTP/1.1 200 OK\r\nServer: bare\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
    "Hello, World!";
#define MAX_PIPELINE 64
#define MAX_RESPONSE_BYTES 1024

static char read_buffer[64 * 1024];
static char response[MAX_RESPONSE_BYTES];
static size_t response_bytes;
static char answers[MAX_PIPELINE * MAX_RESPONSE_BYTES];

/* BARE_EXTRA=work, pages and lines (see above): pages and lines are on when allocated. */
static int extra_work;
#define WORK_ROUNDS \
  140 /* About ten instructions each (BARE_EXTRA=work SERVERS=bare bench/callgrind.sh). */
#define EXTRA_PAGES_TOUCHED 32
#define EXTRA_LINE_PAGES 100
#define EXTRA_LINES_PER_PAGE 4
static char* extra_pages;
static char* extra_lines;
volatile unsigned extra_sink; /* Keeps the work's result, so that the compiler keeps the work. */

static void extra_per_request(const char* bytes) {
  if (extra_work) {
    unsigned sum = 0;
    for (unsigned i = 0; i < WORK_ROUNDS; i++) sum = sum * 31u + (unsigned char)bytes[i & 31];
    extra_sink = sum;
  }
  if (extra_pages != NULL) {
    for (size_t i = 0; i < EXTRA_PAGES_TOUCHED; i++) extra_pages[i * 4096]++;
  }
  if (extra_lines != NULL) {
    unsigned sum = 0;
    for (size_t page = 0; page < EXTRA_LINE_PAGES; page++) {
      for (size_t line = 0; line < EXTRA_LINES_PER_PAGE; line++) {
        sum += (unsigned char)extra_lines[page * 4096 + line * 1024];
      }
    }
    extra_sink = sum;
  }
}

typedef struct {
  uv_write_t request;
  char bytes[];
} pending_write_t;

static void on_alloc(uv_handle_t* handle, size_t suggested, uv_buf_t* buf) {
  (void)handle;
  (void)suggested;
  *buf = uv_buf_init(read_buffer, sizeof read_buffer);
}

static void on_close(uv_handle_t* handle) {
  free(handle);
}

static void on_idle_timer(uv_timer_t* timer) {
  (void)timer;
}

static void* idle_thread(void* arg) {
  (void)arg;
  for (;;) pause();
  return NULL;
}

static void on_write(uv_write_t* request, int status) {
  (void)status;
  free(request);
}

/* Requests are counted by their ends, "\r\n\r\n", not overlapping. memchr finds each LF (a
 * vector scan, as a parser's); the three bytes before it may lie in the previous read, whose last
 * three bytes the handle's data field keeps (bits 8-31, the last byte in 8-15) with how many of
 * them follow the last end counted (bits 0-1). A byte-at-a-time loop here cost 16 instructions a
 * byte, most of this program's work per request. */
static char byte_at(const char* bytes, uintptr_t state, ptrdiff_t j) {
  return j >= 0 ? bytes[j] : (char)(state >> (8 * -j)); /* j < 0: the previous read's tail. */
}

static size_t count_requests(uv_stream_t* client, const char* bytes, size_t length) {
  const uintptr_t state = (uintptr_t)client->data;
  const ptrdiff_t n = (ptrdiff_t)length;
  ptrdiff_t start = -(ptrdiff_t)(state & 3); /* The first byte after the last end counted. */
  size_t count = 0;
  const char* end = bytes + length;
  for (const char* p = bytes; (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++) {
    const ptrdiff_t i = p - bytes;
    if (i - 3 >= start && byte_at(bytes, state, i - 1) == '\r' &&
        byte_at(bytes, state, i - 2) == '\n' && byte_at(bytes, state, i - 3) == '\r') {
      count++;
      start = i + 1;
    }
  }
  uintptr_t tail = 0;
  for (ptrdiff_t distance = 1; distance <= 3; distance++) {
    tail |= (uintptr_t)(unsigned char)byte_at(bytes, state, n - distance) << (8 * distance);
  }
  const ptrdiff_t usable = n - start < 3 ? n - start : 3;
  client->data = (void*)(tail | (uintptr_t)usable);
  return count;
}

static void on_read(uv_stream_t* client, ssize_t nread, const uv_buf_t* buf) {
  (void)buf;
  if (nread < 0) {
    uv_close((uv_handle_t*)client, on_close);
    return;
  }
  size_t count = count_requests(client, read_buffer, (size_t)nread);
  if (extra_work || extra_pages != NULL || extra_lines != NULL) {
    for (size_t i = 0; i < count; i++) extra_per_request(read_buffer);
  }
  while (count > 0) {
    const size_t batch = count < MAX_PIPELINE ? count : MAX_PIPELINE;
    const size_t size = batch * response_bytes;
    uv_buf_t out = uv_buf_init(answers, (unsigned int)size);
    int written = uv_try_write(client, &out, 1);
    if (written == UV_EAGAIN) written = 0;
    if (written < 0) {
      uv_close((uv_handle_t*)client, on_close);
      return;
    }
    if ((size_t)written < size) {
      const size_t rest = size - (size_t)written;
      pending_write_t* pending = malloc(sizeof *pending + rest);
      memcpy(pending->bytes, answers + written, rest);
      uv_buf_t tail = uv_buf_init(pending->bytes, (unsigned int)rest);
      if (uv_write(&pending->request, client, &tail, 1, on_write) != 0) {
        free(pending);
        uv_close((uv_handle_t*)client, on_close);
        return;
      }
    }
    count -= batch;
  }
}

static void on_connection(uv_stream_t* server, int status) {
  if (status < 0) return;
  uv_tcp_t* client = malloc(sizeof *client);
  uv_tcp_init(server->loop, client);
  client->data = NULL;
  if (uv_accept(server, (uv_stream_t*)client) == 0) {
    uv_tcp_nodelay(client, 1);
    uv_read_start((uv_stream_t*)client, on_alloc, on_read);
  } else {
    uv_close((uv_handle_t*)client, on_close);
  }
}

static int out_of_memory(const char* variant) {
  fprintf(stderr, "bare_http_uv: out of memory for BARE_EXTRA=%s\n", variant);
  return 1;
}

int main(int argc, char** argv) {
  uv_loop_t* loop = uv_default_loop();
  uv_tcp_t server;
  struct sockaddr_in address;
  struct sockaddr_storage bound;
  int length = sizeof bound;
  char host[64];
  if (argc > 2) {
    FILE* file = fopen(argv[2], "rb");
    if (file == NULL) {
      fprintf(stderr, "bare_http_uv: cannot open %s\n", argv[2]);
      return 1;
    }
    response_bytes = fread(response, 1, sizeof response, file);
    const int too_long = fgetc(file) != EOF;
    fclose(file);
    if (response_bytes == 0 || too_long) {
      fprintf(stderr, "bare_http_uv: %s is empty or over %d bytes\n", argv[2], MAX_RESPONSE_BYTES);
      return 1;
    }
  } else {
    response_bytes = sizeof builtin_response - 1;
    memcpy(response, builtin_response, response_bytes);
  }
  for (size_t i = 0; i < MAX_PIPELINE; i++)
    memcpy(answers + i * response_bytes, response, response_bytes);
  uv_ip4_addr("127.0.0.1", argc > 1 ? atoi(argv[1]) : 0, &address);
  uv_tcp_init(loop, &server);
  if (uv_tcp_bind(&server, (const struct sockaddr*)&address, 0) != 0 ||
      uv_listen((uv_stream_t*)&server, 511, on_connection) != 0) {
    fprintf(stderr, "bare_http_uv: cannot listen\n");
    return 1;
  }
  uv_tcp_getsockname(&server, (struct sockaddr*)&bound, &length);
  uv_ip4_name((struct sockaddr_in*)&bound, host, sizeof host);
  /* BARE_EXTRA: "a,b,..." of timer, thread, work, pages, lines. */
  const char* extra = getenv("BARE_EXTRA");
  static char extras[256];
  snprintf(extras, sizeof extras, "%s", extra != NULL ? extra : "");
  static uv_timer_t timer;
  for (char* name = strtok(extras, ","); name != NULL; name = strtok(NULL, ",")) {
    if (strcmp(name, "timer") == 0) {
      uv_timer_init(loop, &timer);
      uv_timer_start(&timer, on_idle_timer, 1000000, 1000000);
    } else if (strcmp(name, "thread") == 0) {
      pthread_t thread;
      if (pthread_create(&thread, NULL, idle_thread, NULL) != 0) {
        fprintf(stderr, "bare_http_uv: cannot start the idle thread\n");
        return 1;
      }
    } else if (strcmp(name, "work") == 0) {
      extra_work = 1;
    } else if (strcmp(name, "pages") == 0) {
      if ((extra_pages = calloc(EXTRA_PAGES_TOUCHED, 4096)) == NULL) return out_of_memory(name);
    } else if (strcmp(name, "lines") == 0) {
      if ((extra_lines = malloc(EXTRA_LINE_PAGES * 4096)) == NULL) return out_of_memory(name);
      /* Written once, so that each page is its own (untouched ones all map the zero page). */
      memset(extra_lines, 1, EXTRA_LINE_PAGES * 4096);
    } else {
      fprintf(stderr, "bare_http_uv: BARE_EXTRA: %s is none of timer, thread, work, pages, lines\n",
              name);
      return 1;
    }
  }
  /* Printed once BARE_EXTRA is accepted: a script reading the port never starts a wrong loop. */
  printf("listening on %s:%d\n", host, ntohs(((struct sockaddr_in*)&bound)->sin_port));
  fflush(stdout);
  return uv_run(loop, UV_RUN_DEFAULT);
}
