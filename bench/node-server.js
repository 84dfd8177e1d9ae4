// node's side of bench/run.sh: Node's own http server answering GET /plaintext with
// "Hello, World!" (text/plain, with a Content-Length, so no chunked encoding). It listens on a
// port the kernel picks on 127.0.0.1 and prints that port, alone on the first line of stdout.
'use strict';

const http = require('http');

const helloBody = Buffer.from('Hello, World!');
const notFoundBody = Buffer.from('Not Found\n');

const server = http.createServer((request, response) => {
  if (request.url === '/plaintext' && (request.method === 'GET' || request.method === 'HEAD')) {
    response.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': helloBody.length });
    response.end(request.method === 'HEAD' ? undefined : helloBody);
    return;
  }
  response.writeHead(404, { 'Content-Type': 'text/plain', 'Content-Length': notFoundBody.length });
  response.end(notFoundBody);
});

// The idle connections of the memory test and wrk's connections between runs must not be
// closed by the server while the benchmark is running.
server.keepAliveTimeout = 300000;

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
