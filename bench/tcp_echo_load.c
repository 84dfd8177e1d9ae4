/* Load generator for bench/tcp_echo.sh: CONNECTIONS connections to HOST:PORT, each sending a
 * MESSAGE-byte message (MESSAGE-1 'x' bytes and a newline, so a line echo server works too) and
 * waiting for all of it to come back before sending the next, for SECONDS. One thread, epoll.
 * Prints "bytes_per_second N messages M". */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void send_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t sent = send(fd, data, size, 0);
    if (sent < 0) {
      if (errno == EINTR) continue;
      perror("tcp_echo_load: send");
      exit(1);
    }
    data += sent;
    size -= (size_t)sent;
  }
}

int main(int argc, char** argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s HOST PORT CONNECTIONS MESSAGE SECONDS\n", argv[0]);
    return 2;
  }
  const int connections = atoi(argv[3]);
  const size_t message = (size_t)atol(argv[4]);
  const double seconds = atof(argv[5]);
  struct sockaddr_in address = {0};
  address.sin_family = AF_INET;
  address.sin_port = htons((unsigned short)atoi(argv[2]));
  if (inet_pton(AF_INET, argv[1], &address.sin_addr) != 1 || connections <= 0 || message == 0) {
    fprintf(stderr, "tcp_echo_load: bad arguments\n");
    return 2;
  }
  char* payload = malloc(message);
  memset(payload, 'x', message);
  payload[message - 1] = '\n';
  size_t* received = calloc((size_t)connections, sizeof *received);
  int* fds = calloc((size_t)connections, sizeof *fds);
  const int poller = epoll_create1(0);
  for (int i = 0; i < connections; ++i) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fds[i], (struct sockaddr*)&address, sizeof address) != 0) {
      perror("tcp_echo_load: connect");
      return 1;
    }
    int one = 1;
    setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event event = {.events = EPOLLIN, .data.u32 = (unsigned)i};
    epoll_ctl(poller, EPOLL_CTL_ADD, fds[i], &event);
  }
  static char buffer[256 * 1024];
  unsigned long long bytes = 0, messages = 0;
  const double start = now();
  for (int i = 0; i < connections; ++i) send_all(fds[i], payload, message);
  struct epoll_event events[256];
  double end = start + seconds;
  while (now() < end) {
    const int ready = epoll_wait(poller, events, 256, 100);
    for (int e = 0; e < ready; ++e) {
      const int i = (int)events[e].data.u32;
      const ssize_t n = recv(fds[i], buffer, sizeof buffer, MSG_DONTWAIT);
      if (n == 0) {
        fprintf(stderr, "tcp_echo_load: the server closed a connection\n");
        return 1;
      }
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        perror("tcp_echo_load: recv");
        return 1;
      }
      bytes += (unsigned long long)n;
      received[i] += (size_t)n;
      if (received[i] == message) {
        received[i] = 0;
        ++messages;
        send_all(fds[i], payload, message);
      } else if (received[i] > message) {
        fprintf(stderr, "tcp_echo_load: more bytes came back than were sent\n");
        return 1;
      }
    }
  }
  const double elapsed = now() - start;
  printf("bytes_per_second %.0f messages %llu\n", (double)bytes / elapsed, messages);
  return 0;
}
