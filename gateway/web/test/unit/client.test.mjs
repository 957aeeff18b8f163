// Unit tests of the client's backoff, jitter, close-code advice, token
// refresh timing and offset tracking (node --test). The Client tests drive it
// through an in-memory WebSocket stand-in that plays the server's side of
// docs/protocol.md; the real gateway and browser are in gateway/tests/browser.rs.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Client,
  CloseCode,
  OffsetTracker,
  backoffDelay,
  closeAdvice,
  randomKey,
  refreshDelay,
  tokenExpiry,
} from '../../client.js';

/** A seeded PRNG (mulberry32) so that the jitter tests are repeatable. */
function seeded(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test('backoff doubles its cap per attempt up to the maximum', () => {
  const top = () => 0.999999;
  assert.equal(backoffDelay(0, 1000, 30_000, top), 999);
  assert.equal(backoffDelay(1, 1000, 30_000, top), 1999);
  assert.equal(backoffDelay(3, 1000, 30_000, top), 7999);
  assert.equal(backoffDelay(5, 1000, 30_000, top), 29_999);
  assert.equal(backoffDelay(500, 1000, 30_000, top), 29_999, 'huge attempts do not overflow');
  assert.equal(backoffDelay(-1, 1000, 30_000, top), 999);
  assert.equal(backoffDelay(4, 1000, 30_000, () => 0), 0, 'full jitter starts at zero');
});

test('full jitter spreads a reconnect storm over the whole window', () => {
  const random = seeded(42);
  const cap = 8000;
  const buckets = new Array(10).fill(0);
  const n = 10_000;
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const d = backoffDelay(3, 1000, 30_000, random);
    assert.ok(d >= 0 && d < cap, `${d} within [0, ${cap})`);
    buckets[Math.floor(d / (cap / 10))]++;
    sum += d;
  }
  // Uniform: every tenth of the window gets about a tenth of the clients.
  for (const b of buckets) assert.ok(b > n * 0.07 && b < n * 0.13, `bucket ${b} of ${n}`);
  const mean = sum / n;
  assert.ok(mean > cap * 0.45 && mean < cap * 0.55, `mean ${mean}`);
  // Two clients with the same attempt count rarely pick the same delay.
  const a = backoffDelay(3, 1000, 30_000, seeded(1));
  const b = backoffDelay(3, 1000, 30_000, seeded(2));
  assert.notEqual(a, b);
});

test('close codes: fast after 1012 and 4009, new token after 4001 and 4010, never after 1009', () => {
  assert.deepEqual(closeAdvice(CloseCode.RESTARTING), { reconnect: true, fast: true, newToken: false, penalty: 0 });
  assert.deepEqual(closeAdvice(CloseCode.SLOW_CONSUMER), { reconnect: true, fast: true, newToken: false, penalty: 0 });
  assert.deepEqual(closeAdvice(CloseCode.UNAUTHORIZED), { reconnect: true, fast: false, newToken: true, penalty: 0 });
  assert.deepEqual(closeAdvice(CloseCode.TOKEN_EXPIRED), { reconnect: true, fast: true, newToken: true, penalty: 0 });
  assert.equal(closeAdvice(CloseCode.POLICY_VIOLATION).penalty, 3);
  assert.equal(closeAdvice(CloseCode.TOO_MANY_CONNECTIONS).penalty, 2);
  for (const code of [1002, 1003, 1007, 1009]) assert.equal(closeAdvice(code).reconnect, false, `${code}`);
  for (const code of [1000, 1001, 1006, 1011]) {
    assert.deepEqual(closeAdvice(code), { reconnect: true, fast: false, newToken: false, penalty: 0 }, `${code}`);
  }
});

test('tokens are refreshed a quarter of their life before expiry, at most a minute before', () => {
  assert.equal(refreshDelay(300), 240_000);
  assert.equal(refreshDelay(3600), 3_540_000);
  assert.equal(refreshDelay(8), 6_000);
  assert.equal(refreshDelay(1), 1_000, 'never sooner than a second');
  assert.equal(refreshDelay(0), 1_000);
});

test('the offset tracker drops what is not newer and resumes from the last offset', () => {
  const t = new OffsetTracker();
  assert.equal(t.get('general'), undefined);
  assert.equal(t.accept('general', 5), true);
  assert.equal(t.accept('general', 9), true, 'offsets need not be contiguous');
  assert.equal(t.accept('general', 9), false, 'a repeat');
  assert.equal(t.accept('general', 7), false, 'an older one');
  assert.equal(t.accept('random', 1), true, 'rooms are independent');
  assert.equal(t.get('general'), 9);
  t.set('general', 3);
  assert.equal(t.accept('general', 4), true, 'set moves the resume point back (history reload)');
  t.delete('random');
  assert.equal(t.get('random'), undefined);
});

test('token expiry is read from the JWT payload; keys are unique', () => {
  const payload = Buffer.from(JSON.stringify({ sub: 'a', exp: 1764201234 })).toString('base64url');
  assert.equal(tokenExpiry(`h.${payload}.s`), 1764201234);
  assert.equal(tokenExpiry('not a token'), undefined);
  const keys = new Set(Array.from({ length: 1000 }, randomKey));
  assert.equal(keys.size, 1000);
  assert.match(randomKey(), /^[0-9a-f]{32}$/);
});

// ---- the Client against an in-memory server ---------------------------------

/** Sockets made by the client, newest last; each records the frames sent. */
function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.readyState = 3;
      this.closedWith = code;
    }
    // server side
    open() {
      this.readyState = 1;
      this.onopen?.();
    }
    push(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }
    drop(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    last(op) {
      return this.sent.filter((f) => f.op === op).at(-1);
    }
    /** Opens and answers `connect`. */
    accept(expiresIn = null) {
      this.open();
      const c = this.last('connect');
      this.push({ id: c.id, ok: { client: `c${sockets.length}`, node: 'gw-test', expires_in: expiresIn } });
    }
  }
  return { FakeSocket, sockets };
}

const tick = () => new Promise((r) => setTimeout(r, 0));
async function until(cond, what) {
  for (let i = 0; i < 400; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.fail(`timed out waiting for ${what}`);
}

const made = [];
after(() => made.forEach((c) => c.close()));

function makeClient(extra = {}) {
  const { FakeSocket, sockets } = fakeWebSocket();
  const tokens = [];
  const client = new Client('ws://gw.test/ws', {
    WebSocket: FakeSocket,
    token: async (ctx) => {
      tokens.push(ctx.reason);
      return `token-${tokens.length}`;
    },
    baseDelayMs: 20,
    fastDelayMs: 5,
    maxDelayMs: 50,
    ...extra,
  });
  made.push(client);
  return { client, sockets, tokens };
}

test('after a reconnect every full room resumes from its last offset; overlap is dropped', async () => {
  const { client, sockets } = makeClient();
  const seen = [];
  client.on('message', (m) => seen.push(`${m.room}:${m.offset}`));
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  assert.equal(client.state, 'connected');
  assert.deepEqual(sockets[0].protocols, ['gw.v1.json']);
  const p1 = client.subscribe('general');
  const p2 = client.subscribe('random', { mode: 'notify' });
  await until(() => sockets[0].last('subscribe'), 'subscribe');
  const sub = sockets[0].last('subscribe');
  assert.deepEqual(sub.rooms, [{ room: 'general' }, { room: 'random', mode: 'notify' }], 'one frame for one tick');
  sockets[0].push({ id: sub.id, ok: { rooms: [{ room: 'general', offset: 10 }, { room: 'random', offset: 3 }] } });
  assert.deepEqual(await p1, { room: 'general', offset: 10, mode: 'full' });
  assert.equal((await p2).mode, 'notify');
  assert.equal(client.offsets.get('general'), 10, 'without since, resuming starts at the subscribe offset');
  for (const offset of [11, 12, 14]) sockets[0].push({ op: 'message', room: 'general', offset, ts: 1, from: 'a', data: offset });
  sockets[0].drop(1006);
  assert.equal(client.state, 'disconnected');
  await until(() => sockets.length === 2, 'a reconnect');
  await tick();
  sockets[1].accept();
  await until(() => sockets[1].last('subscribe'), 'the resubscribe');
  const again = sockets[1].last('subscribe');
  assert.deepEqual(again.rooms, [{ room: 'general', since: 14 }, { room: 'random', mode: 'notify' }]);
  sockets[1].push({ id: again.id, ok: { rooms: [{ room: 'general', offset: 16, recovered: true }, { room: 'random', offset: 5 }] } });
  // Catch-up overlapping what was seen: 14 again, then 15 and 16.
  for (const offset of [14, 15, 16, 16]) sockets[1].push({ op: 'message', room: 'general', offset, ts: 1, from: 'a', data: offset });
  assert.deepEqual(seen, ['general:11', 'general:12', 'general:14', 'general:15', 'general:16']);
  assert.equal(client.connects, 2);
  client.close();
});

test('presence: the option rides in the subscribe entry (also after a reconnect) and pushes become presence events', async () => {
  const { client, sockets } = makeClient();
  const events = [];
  client.on('presence', (p) => events.push(p));
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  client.subscribe('team-7', { presence: true });
  await until(() => sockets[0].last('subscribe'), 'subscribe');
  const sub = sockets[0].last('subscribe');
  assert.deepEqual(sub.rooms, [{ room: 'team-7', presence: true }]);
  sockets[0].push({ id: sub.id, ok: { rooms: [{ room: 'team-7', offset: 1 }] } });
  sockets[0].push({ op: 'presence', room: 'team-7', count: 4, join: ['dave'], leave: [] });
  sockets[0].push({ op: 'presence', room: 'elsewhere', count: 1, join: ['x'], leave: [] });
  assert.deepEqual(events, [{ room: 'team-7', count: 4, join: ['dave'], leave: [] }], 'rooms not subscribed are ignored');
  sockets[0].drop(1006);
  await until(() => sockets.length === 2, 'a reconnect');
  await tick();
  sockets[1].accept();
  await until(() => sockets[1].last('subscribe'), 'the resubscribe');
  assert.deepEqual(sockets[1].last('subscribe').rooms, [{ room: 'team-7', presence: true, since: 1 }]);
  client.close();
});

test('recovered:false is surfaced and live delivery resumes from the reply offset', async () => {
  const { client, sockets } = makeClient();
  const events = [];
  client.on('subscribed', (s) => events.push(s));
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  client.subscribe('general', { since: 5 });
  await until(() => sockets[0].last('subscribe'), 'subscribe');
  const sub = sockets[0].last('subscribe');
  assert.deepEqual(sub.rooms, [{ room: 'general', since: 5 }]);
  sockets[0].push({ id: sub.id, ok: { rooms: [{ room: 'general', offset: 900, recovered: false }] } });
  await tick();
  assert.deepEqual(events, [{ room: 'general', offset: 900, mode: 'full', recovered: false }]);
  assert.equal(client.offsets.get('general'), 900);
  client.close();
});

test('a publish is retried after a reconnect with the same idempotency key', async () => {
  const { client, sockets } = makeClient();
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  const published = client.publish('general', { text: 'hi' });
  const first = sockets[0].last('publish');
  assert.match(first.key, /^[0-9a-f]{32}$/);
  sockets[0].drop(CloseCode.RESTARTING, 'node draining, reconnect');
  await until(() => sockets.length === 2, 'a reconnect');
  await tick();
  sockets[1].accept();
  await until(() => sockets[1].last('publish'), 'the retried publish');
  const retry = sockets[1].last('publish');
  assert.equal(retry.key, first.key);
  assert.deepEqual(retry.data, { text: 'hi' });
  sockets[1].push({ id: retry.id, ok: { offset: 77 } });
  assert.equal(await published, 77);
  const other = client.publish('general', 'x');
  assert.notEqual(sockets[1].last('publish').key, first.key, 'each publish has its own key');
  sockets[1].push({ id: sockets[1].last('publish').id, error: { code: 'forbidden', message: 'no' } });
  await assert.rejects(other, (e) => e.code === 'forbidden');
  client.close();
});

test('reconnect delays: fast after 1012, a new token after 4001, none after 1009', async () => {
  const { client, sockets, tokens } = makeClient({ baseDelayMs: 1000, fastDelayMs: 10, maxDelayMs: 60_000 });
  const states = [];
  client.on('state', (s) => states.push(s));
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  sockets[0].drop(CloseCode.RESTARTING);
  const after1012 = states.at(-1);
  assert.equal(after1012.state, 'disconnected');
  assert.ok(after1012.delayMs < 10, `fast: ${after1012.delayMs}`);
  await until(() => sockets.length === 2, 'a reconnect');
  await tick();
  assert.deepEqual(tokens, ['connect'], 'the cached token is reused');
  sockets[1].open();
  sockets[1].push({ id: sockets[1].last('connect').id, error: { code: 'unauthorized', message: 'bad token' } });
  sockets[1].drop(CloseCode.UNAUTHORIZED, 'unauthorized');
  assert.ok(states.at(-1).delayMs < 2000, 'second attempt: base 1000 ms, doubled once at most');
  client._reconnectNow(); // skip the wait
  await until(() => sockets.length === 3, 'a reconnect');
  assert.deepEqual(tokens, ['connect', 'connect'], 'a new token after 4001');
  assert.equal(sockets[2].sent.length, 0);
  sockets[2].accept();
  sockets[2].drop(CloseCode.TOO_LARGE, 'frame too large');
  assert.equal(client.state, 'closed');
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(sockets.length, 3, 'no reconnect after 1009');
  await assert.rejects(client.publish('general', 1), (e) => e.code === 'closed');
});

test('a silent connection is pinged and dropped when no answer comes', async () => {
  const { client, sockets } = makeClient({ pingIntervalMs: 20, pongTimeoutMs: 20 });
  const states = [];
  client.on('state', (s) => states.push(s.state));
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  await until(() => sockets[0].last('ping'), 'a ping');
  sockets[0].push({ op: 'pong' });
  const pings = () => sockets[0].sent.filter((f) => f.op === 'ping').length;
  await until(() => pings() === 2, 'a second ping after the pong');
  // No pong this time: the socket is given up and a new one opened.
  await until(() => sockets.length === 2, 'a reconnect after the missing pong');
  assert.equal(sockets[0].closedWith, 4000);
  assert.deepEqual(states.slice(0, 4), ['connecting', 'connected', 'disconnected', 'connecting']);
  client.close();
});

test('the token is refreshed before expiry without a new connection', async () => {
  const { client, sockets, tokens } = makeClient();
  let refreshed = null;
  client.on('refresh', (r) => (refreshed = r));
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept(1); // expires in 1 s: refreshed after 1 s (the floor)
  await until(() => sockets[0].last('refresh'), 'a refresh', 2000);
  const r = sockets[0].last('refresh');
  assert.equal(r.token, 'token-2');
  assert.deepEqual(tokens, ['connect', 'refresh']);
  sockets[0].push({ id: r.id, ok: { expires_in: 300 } });
  await until(() => refreshed, 'the refresh event');
  assert.equal(refreshed.expiresIn, 300);
  assert.equal(sockets.length, 1);
  client.close();
});

test('room tokens: asked per room, renewed before expiry, and once more after the server ends the grant', async () => {
  const { client, sockets } = makeClient();
  const jwt = (exp) => `h.${Buffer.from(JSON.stringify({ exp })).toString('base64url')}.s`;
  const asked = [];
  const roomToken = async ({ room }) => {
    asked.push(room);
    return jwt(Math.floor(Date.now() / 1000) + 1); // renewed after the 1 s floor
  };
  client.connect();
  await until(() => sockets.length === 1, 'a socket');
  await tick();
  sockets[0].accept();
  const done = client.subscribe('team-7', { token: roomToken });
  await until(() => sockets[0].last('subscribe'), 'subscribe');
  const first = sockets[0].last('subscribe');
  assert.equal(first.rooms[0].room, 'team-7');
  assert.equal(first.rooms[0].token, jwt(tokenExpiry(first.rooms[0].token)));
  sockets[0].push({ id: first.id, ok: { rooms: [{ room: 'team-7', offset: 4 }] } });
  await done;
  // Before the room token expires, the room is subscribed again with a new one.
  await until(() => sockets[0].sent.filter((f) => f.op === 'subscribe').length === 2, 'the renewal');
  const renewal = sockets[0].last('subscribe');
  assert.deepEqual(asked, ['team-7', 'team-7']);
  assert.equal(renewal.rooms[0].since, 4, 'resumes where it was');
  sockets[0].push({ id: renewal.id, ok: { rooms: [{ room: 'team-7', offset: 4 }] } });
  // The server ends the grant: one more try with a fresh token...
  sockets[0].push({ op: 'unsubscribed', room: 'team-7', error: { code: 'forbidden', message: 'room token expired' } });
  await until(() => sockets[0].sent.filter((f) => f.op === 'subscribe').length === 3, 'a retry');
  assert.equal(asked.length, 3);
  // ...and when that is refused too, the app is told.
  const gone = [];
  client.on('unsubscribed', (u) => gone.push(u));
  const retry = sockets[0].last('subscribe');
  sockets[0].push({ id: retry.id, ok: { rooms: [{ room: 'team-7', error: { code: 'forbidden', message: 'no' } }] } });
  await tick();
  assert.equal(gone.length, 1);
  assert.equal(gone[0].error.code, 'forbidden');
  assert.deepEqual(client.rooms(), []);
  client.close();
});
