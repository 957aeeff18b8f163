#!/usr/bin/env python3
"""Counts NATS messages and payload bytes on a subject, per second.
   natscount.py PORT SUBJECT SECONDS -> lines "t msgs bytes biggest", then "total msgs bytes"."""
import socket, sys, threading, time
port, subject, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
f = s.makefile("rb")
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB ' + subject.encode() + b' 1\r\n')
lock = threading.Lock()
cur = [0, 0, 0]; tot = [0, 0]
def reader():
    while True:
        line = f.readline()
        if not line:
            return
        if line.startswith(b"PING"):
            s.sendall(b"PONG\r\n")
        elif line.startswith(b"MSG"):
            n = int(line.split()[-1]); f.read(n + 2)
            with lock:
                cur[0] += 1; cur[1] += n; cur[2] = max(cur[2], n); tot[0] += 1; tot[1] += n
threading.Thread(target=reader, daemon=True).start()
for t in range(int(secs)):
    time.sleep(1)
    with lock:
        print(f"{t} {cur[0]} {cur[1]} {cur[2]}", flush=True); cur[:] = [0, 0, 0]
print(f"total {tot[0]} {tot[1]}", flush=True)
