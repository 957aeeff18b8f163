import base64, json, os, socket, struct, sys
host, port, token, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=60)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
head, buf = buf.split(b"\r\n\r\n", 1)
assert b" 101 " in head.split(b"\r\n")[0], head
def send(text):
    data, mask = text.encode(), os.urandom(4)
    n = len(data)
    hdr = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
def need(n):
    global buf
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk
def frame():
    global buf
    need(2)
    op, n = buf[0] & 0x0F, buf[1] & 0x7F
    at = 2
    if n == 126:
        need(4); n = struct.unpack("!H", buf[2:4])[0]; at = 4
    elif n == 127:
        need(10); n = struct.unpack("!Q", buf[2:10])[0]; at = 10
    need(at + n)
    payload, buf = buf[at:at + n], buf[at + n:]
    return op, payload
send(json.dumps({"id": 1, "op": "connect", "token": token}))
want = json.loads(cmd)["id"]
sent = False
while True:
    op, payload = frame()
    if op == 8:
        sys.exit("closed: %r" % payload)
    if op != 1:
        continue
    v = json.loads(payload)
    if v.get("id") == 1 and not sent:
        if "ok" not in v:
            sys.exit("connect failed: %s" % payload.decode())
        send(cmd); sent = True
    elif v.get("id") == want:
        print(payload.decode()); break
