// The TCP echo server of Tornado's guide, on squall: every line a client sends comes back.
//
//   build/examples/tcp_echo_server 8888        # port 0: any free port; prints the address
//   build/examples/tcp_client 127.0.0.1 8888 hello world
//
// Tornado's version:
//   class EchoServer(TCPServer):
//       async def handle_stream(self, stream, address):
//           while True:
//               try:
//                   data = await stream.read_until(b"\n")
//                   await stream.write(data)
//               except StreamClosedError:
//                   break
// SIGTERM or SIGINT stops it: no new connections, open ones are cancelled, exit status 0.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <stop_token>
#include <string>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/net/tcp.hpp>

using squall::Task;
using squall::net::StreamClosedError;
using squall::net::TcpServer;
using squall::net::TcpStream;

namespace {

// One connection: a coroutine per client, cancelled through its stop token at shutdown.
Task<void> handle_stream(TcpStream stream) {
  try {
    for (;;) {
      // A line longer than 64 KiB is refused (ReadLimitError, logged) rather than buffered.
      std::string line = co_await stream.read_until("\n", 64 * 1024);
      co_await stream.write(line);
    }
  } catch (const StreamClosedError&) {
    // The client went away.
  }
}

// Accepts until the server is closed; each connection runs on its own under `token`.
Task<void> accept_loop(squall::Loop& loop, TcpServer& server, std::stop_token token) {
  try {
    for (;;) {
      TcpStream stream = co_await server.accept();
      squall::spawn(loop, handle_stream(std::move(stream)), token);
    }
  } catch (const StreamClosedError&) {
    // close() ends the loop.
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto port = static_cast<std::uint16_t>(argc > 1 ? std::atoi(argv[1]) : 8888);
  const std::string host = argc > 2 ? argv[2] : "127.0.0.1";
  squall::ignore_sigpipe();
  squall::Loop loop;
  TcpServer server(loop);
  std::printf("listening on %s\n", server.listen(host, port).c_str());
  std::fflush(stdout);

  std::stop_source connections;
  squall::spawn(loop, accept_loop(loop, server, connections.get_token()));

  auto stop = [&] {
    server.close();              // No new connections; accept_loop ends.
    connections.request_stop();  // Every handler's pending read fails with CancelledError.
    loop.stop();                 // Loop::close() below destroys what is left, closing every stream.
  };
  squall::SignalWatcher on_term(loop, SIGTERM, stop);
  squall::SignalWatcher on_int(loop, SIGINT, stop);
  loop.run();
  const int status = loop.close();
  std::printf("stopped\n");
  return status == 0 ? 0 : 1;
}
