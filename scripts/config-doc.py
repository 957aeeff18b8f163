#!/usr/bin/env python3
"""Writes docs/configuration.md from `gateway --help` (run from the repo root):
    cargo build -p gateway && target/debug/gateway --help | scripts/config-doc.py > docs/configuration.md
A test checks that the file lists every flag."""
import re
import sys

lines = sys.stdin.read().splitlines()
opts = []
i = 0
while i < len(lines):
    m = re.match(r'\s+(?:-\w, )?--([a-z0-9-]+)(?: [\[<].*)?$', lines[i])
    if m and m.group(1) not in ('help', 'version'):
        flag = m.group(1)
        desc = []
        i += 1
        while i < len(lines) and not re.match(r'\s+(?:-\w, )?--', lines[i]):
            desc.append(lines[i].strip())
            i += 1
        d = ' '.join(desc)
        env = re.search(r'\[env: (\w+)=?[^\]]*\]', d)
        d = re.sub(r'\s*\[env: [^\]]*\]', '', d)
        d = re.sub(r'\s*\[possible values: [^\]]*\]', '', d)
        default = re.search(r'\[default: ([^\]]*)\]', d)
        d = re.sub(r'\s*\[default: [^\]]*\]', '', d).strip()
        opts.append((flag, env.group(1) if env else '', default.group(1) if default else '', d))
    else:
        i += 1

BAR = '\\|'
out = [
    '# Configuration', '',
    'Every option has three spellings: a flag (`--max-frame-bytes 65536`), an environment',
    'variable (`GATEWAY_MAX_FRAME_BYTES=65536`) and a key in the TOML file given by `--config`',
    '(`max_frame_bytes = 65536`). Precedence: flag, then environment, then file, then default.',
    'Values are checked before any port is bound; an invalid value stops the node with exit',
    'status 64 and a message that names the option. Unknown keys in the file are errors.', '',
    '`gateway --help` prints the same list (this file is generated from it by',
    '`scripts/config-doc.py`). Durations are in the unit their name ends with.', '',
    '| flag | environment | TOML key | default | meaning |', '|---|---|---|---|---|',
]
for flag, env, default, d in opts:
    key = '(flag/env only)' if flag == 'config' else flag.replace('-', '_')
    out.append('| `--%s` | `%s` | `%s` | %s | %s |' % (flag, env, key, default.replace('|', BAR), d.replace('|', BAR)))
out += [
    '', '## Sub-command', '',
    '`gateway token --sub USER [--rooms PATTERNS] [--pub PATTERNS] [--ttl SECONDS]` prints a connection',
    'token signed with the configured HS256 secret (`--jwt-secret`, its variable or the file). `--rooms`',
    'defaults to `*`, `--pub` to the value of `--rooms`, `--ttl` to 86400 (0: no `exp`).', '',
    '## TOML-only settings', '',
    'Per-namespace room publish limits (the namespace is the room-name part before the first `:`):', '',
    '```toml', 'room_publish_per_sec = 50', '[room_limits.ann]', 'publish_per_sec = 1', '[room_limits.dm]',
    'publish_burst = 7', '```', '',
    'See [operations.md](operations.md) for what each limit protects and how to size it,',
    '[auth.md](auth.md) for keys and TLS, and [cluster.md](cluster.md) for the NATS options.', '',
    '## Example file', '',
    '```toml', 'listen = "0.0.0.0:8080"', 'node_id = "gw-0"',
    'jwks = "https://kc.example.com/realms/chat/protocol/openid-connect/certs"',
    'jwt_issuer = ["https://kc.example.com/realms/chat"]', 'allowed_origins = ["https://chat.example.com"]',
    'nats = "nats://nats-0:4222,nats://nats-1:4222,nats://nats-2:4222"', 'nats_replicas = 3',
    'ephemeral_prefixes = ["typing:"]', '```', '',
]
print('\n'.join(out))
