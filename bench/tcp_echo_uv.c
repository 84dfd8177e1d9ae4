/* A minimal echo server in C on libuv, the reference for bench/tcp_echo.sh: each read is written
 * back as is (uv_write of the read buffer, freed in the write callback). Prints its address. */
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

typedef struct {
  uv_write_t request;
  char* base;
} echo_write_t;

static void on_alloc(uv_handle_t* handle, size_t suggested, uv_buf_t* buf) {
  (void)handle;
  buf->base = malloc(suggested);
  buf->len = suggested;
}

static void on_close(uv_handle_t* handle) { free(handle); }

static void on_write(uv_write_t* request, int status) {
  echo_write_t* write = (echo_write_t*)request;
  (void)status;
  free(write->base);
  free(write);
}

static void on_read(uv_stream_t* client, ssize_t nread, const uv_buf_t* buf) {
  if (nread > 0) {
    echo_write_t* write = malloc(sizeof *write);
    uv_buf_t out = uv_buf_init(buf->base, (unsigned int)nread);
    write->base = buf->base;
    if (uv_write(&write->request, client, &out, 1, on_write) != 0) {
      free(write->base);
      free(write);
      uv_close((uv_handle_t*)client, on_close);
    }
    return;
  }
  free(buf->base);
  if (nread < 0) uv_close((uv_handle_t*)client, on_close);
}

static void on_connection(uv_stream_t* server, int status) {
  if (status < 0) return;
  uv_tcp_t* client = malloc(sizeof *client);
  uv_tcp_init(server->loop, client);
  if (uv_accept(server, (uv_stream_t*)client) == 0) {
    uv_read_start((uv_stream_t*)client, on_alloc, on_read);
  } else {
    uv_close((uv_handle_t*)client, on_close);
  }
}

int main(int argc, char** argv) {
  uv_loop_t* loop = uv_default_loop();
  uv_tcp_t server;
  struct sockaddr_in address;
  struct sockaddr_storage bound;
  int length = sizeof bound;
  char host[64];
  uv_ip4_addr("127.0.0.1", argc > 1 ? atoi(argv[1]) : 0, &address);
  uv_tcp_init(loop, &server);
  if (uv_tcp_bind(&server, (const struct sockaddr*)&address, 0) != 0 ||
      uv_listen((uv_stream_t*)&server, 511, on_connection) != 0) {
    fprintf(stderr, "tcp_echo_uv: cannot listen\n");
    return 1;
  }
  uv_tcp_getsockname(&server, (struct sockaddr*)&bound, &length);
  uv_ip4_name((struct sockaddr_in*)&bound, host, sizeof host);
  printf("listening on %s:%d\n", host, ntohs(((struct sockaddr_in*)&bound)->sin_port));
  fflush(stdout);
  return uv_run(loop, UV_RUN_DEFAULT);
}
