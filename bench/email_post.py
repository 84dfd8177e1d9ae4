#!/usr/bin/env python3
"""Sends COUNT POST /email (the body of bench/email.lua) to 127.0.0.1:PORT over CONNECTIONS
keep-alive connections; exits non-zero unless every answer is 202. Used by
bench/email_callgrind.sh and bench/send_callgrind.sh.

Usage: email_post.py PORT COUNT CONNECTIONS"""
import http.client
import sys
import threading

port, count, connections = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = ('{"to": "Bench Recipient <rcpt@example.com>", "subject": "squall bench", '
        '"text": "Hello from wrk.\\n", "html": "<p>Hello from <b>wrk</b>.</p>\\n"}').encode()
failures = []


def run(n):
    # Under valgrind squalld answers slowly: a generous timeout.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    for _ in range(n):
        conn.request("POST", "/email", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 202:
            failures.append(response.status)


threads = [threading.Thread(target=run, args=(count // connections + (i < count % connections),))
           for i in range(connections)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    sys.exit(f"{len(failures)} answers were not 202: {sorted(set(failures))}")
