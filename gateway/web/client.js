// Browser and Node (22+) client for the gateway's protocol v1 (gw.v1.json).
// An ES module without dependencies; the gateway serves it at /client.js and
// the package in this folder installs it. Types: client.d.ts. Protocol:
// docs/protocol.md. Usage: docs/quickstart.md.

/** The JSON sub-protocol this client speaks. */
export const PROTOCOL = 'gw.v1.json';

/** Close codes of the protocol (docs/protocol.md, "Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  BAD_PAYLOAD: 1007,
  TOO_LARGE: 1009,
  RESTARTING: 1012,
  UNAUTHORIZED: 4001,
  POLICY_VIOLATION: 4008,
  SLOW_CONSUMER: 4009,
  TOKEN_EXPIRED: 4010,
  TOO_MANY_CONNECTIONS: 4029,
});

/** A room name: 1 to 128 characters from A-Z a-z 0-9 _ - : */
const ROOM = /^[A-Za-z0-9_:-]{1,128}$/;
/** Rooms per subscribe frame on (re)subscribe (the server takes 2,000 by default). */
const ROOMS_PER_FRAME = 500;
/** Error codes after which a request or a room is tried again later. */
const RETRYABLE = new Set(['unavailable', 'rate_limited', 'internal']);

/** An error answered by the gateway (`code` is the protocol's) or made by this client. */
export class GatewayError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{retryAfterMs?: number, room?: string}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'GatewayError';
    this.code = code;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
    if (extra.room !== undefined) this.room = extra.room;
  }
}

/** Thrown by a token provider to say "no token will ever come": the client stops reconnecting. */
export class UnauthorizedError extends Error {
  constructor(message = 'unauthorized') {
    super(message);
    this.name = 'UnauthorizedError';
  }
}

/**
 * Exponential backoff with full jitter: a uniformly random delay in
 * [0, min(maxMs, baseMs * 2^attempt)), in milliseconds.
 * @param {number} attempt 0 for the first retry
 * @param {number} baseMs
 * @param {number} maxMs
 * @param {() => number} [random] a source of [0, 1)
 */
export function backoffDelay(attempt, baseMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(random() * cap);
}

/**
 * What the client does after a close code.
 * `reconnect`: try again at all; `fast`: with the short base delay (still
 * jittered); `newToken`: ask the token provider first; `penalty`: extra
 * backoff steps (the server asked to back off).
 * @param {number} code
 */
export function closeAdvice(code) {
  switch (code) {
    case CloseCode.TOO_LARGE: // fix the client
    case CloseCode.PROTOCOL_ERROR:
    case CloseCode.BAD_PAYLOAD:
    case 1003: // unsupported data
      return { reconnect: false, fast: false, newToken: false, penalty: 0 };
    case CloseCode.RESTARTING:
    case CloseCode.SLOW_CONSUMER:
      return { reconnect: true, fast: true, newToken: false, penalty: 0 };
    case CloseCode.UNAUTHORIZED:
      return { reconnect: true, fast: false, newToken: true, penalty: 0 };
    case CloseCode.TOKEN_EXPIRED:
      return { reconnect: true, fast: true, newToken: true, penalty: 0 };
    case CloseCode.POLICY_VIOLATION:
      return { reconnect: true, fast: false, newToken: false, penalty: 3 };
    case CloseCode.TOO_MANY_CONNECTIONS:
      return { reconnect: true, fast: false, newToken: false, penalty: 2 };
    default:
      return { reconnect: true, fast: false, newToken: false, penalty: 0 };
  }
}

/**
 * When to refresh a token that expires in `expiresInSec` seconds: a quarter
 * of its life before expiry, at most 60 s before, never sooner than 1 s from
 * now. In milliseconds.
 * @param {number} expiresInSec
 */
export function refreshDelay(expiresInSec) {
  const life = expiresInSec * 1000;
  return Math.max(1000, life - Math.min(60_000, life / 4));
}

/**
 * The last offset seen per room. Offsets only grow within a room, so a
 * message at or below the last one is a duplicate (a catch-up overlapping
 * live delivery) and is dropped.
 */
export class OffsetTracker {
  constructor() {
    /** @type {Map<string, number>} */
    this.offsets = new Map();
  }
  /** Records `offset` for `room`; false when it is not newer (a duplicate). */
  accept(room, offset) {
    const last = this.offsets.get(room);
    if (last !== undefined && offset <= last) return false;
    this.offsets.set(room, offset);
    return true;
  }
  /** The last offset seen in `room`, or undefined. */
  get(room) {
    return this.offsets.get(room);
  }
  /** Sets the resume point of `room` (after a history load or a reset). */
  set(room, offset) {
    this.offsets.set(room, offset);
  }
  delete(room) {
    this.offsets.delete(room);
  }
}

/** A random idempotency key (128 bits, hex). */
export function randomKey() {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/** The `exp` claim of a JWT (seconds), read without verifying; undefined when absent. */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(globalThis.atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')));
    return typeof claims.exp === 'number' ? claims.exp : undefined;
  } catch {
    return undefined;
  }
}

const DEFAULTS = {
  baseDelayMs: 1000,
  fastDelayMs: 200,
  maxDelayMs: 30_000,
  pingIntervalMs: 20_000,
  pongTimeoutMs: 10_000,
  connectTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
};

/**
 * A connection to a gateway that stays connected: reconnects with backoff,
 * resubscribes every room with `since`, refreshes tokens and retries
 * publishes with the same idempotency key.
 */
export class Client {
  /**
   * @param {string} url `ws://host:port/ws` or `wss://…`
   * @param {object} options see client.d.ts (`ClientOptions`)
   */
  constructor(url, options = {}) {
    if (!options.token) throw new TypeError('options.token (a token or an async function) is required');
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    /** @type {'disconnected'|'connecting'|'connected'|'closed'} */
    this.state = 'disconnected';
    /** The connection id and node of the current connection. */
    this.clientId = undefined;
    this.node = undefined;
    /** Successful connects so far (1 after the first; more after reconnects). */
    this.connects = 0;
    this.offsets = new OffsetTracker();
    this._listeners = new Map();
    this._rooms = new Map(); // room -> subscription entry
    this._pending = new Map(); // id -> request (sent on this socket)
    this._queue = []; // requests waiting for a connection
    this._nextId = 1;
    this._attempt = 0;
    this._ws = null;
    this._token = undefined;
    this._timers = { reconnect: null, refresh: null, ping: null, pong: null, connect: null, flush: null };
    this._toSubscribe = new Set();
    this._generation = 0;
    this._onOnline = () => {
      if (this.state === 'disconnected' && this._timers.reconnect) this._reconnectNow();
    };
  }

  // ---- events -------------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }
  _emit(event, value) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try {
        fn(value);
      } catch (e) {
        if (event !== 'error') this._emit('error', e);
      }
    }
  }
  _setState(state, extra = {}) {
    if (this.state === state && !extra.force) return;
    const previous = this.state;
    this.state = state;
    delete extra.force;
    this._emit('state', { state, previous, ...extra });
  }

  // ---- connection ---------------------------------------------------------

  /** Starts connecting (and keeps reconnecting until `close()`). */
  connect() {
    if (this.state === 'connecting' || this.state === 'connected') return;
    if (this._timers.reconnect) return;
    globalThis.addEventListener?.('online', this._onOnline);
    this._stopped = false;
    this._open();
  }

  /** Closes the connection for good (code 1000); pending requests fail with code `closed`. */
  close() {
    this._stopped = true;
    globalThis.removeEventListener?.('online', this._onOnline);
    this._clearTimers();
    this._generation++;
    if (this._ws) {
      this._detach(this._ws);
      try {
        this._ws.close(1000);
      } catch {}
      this._ws = null;
    }
    const closed = new GatewayError('closed', 'the client was closed');
    for (const r of [...this._pending.values(), ...this._queue]) this._settle(r, closed);
    this._pending.clear();
    this._queue = [];
    for (const e of this._rooms.values()) {
      clearTimeout(e.timer);
      this._rejectWaiters(e, closed);
    }
    this._setState('closed');
  }

  async _open() {
    const gen = ++this._generation;
    this._setState('connecting');
    let token;
    try {
      token = await this._connectionToken(false, 'connect');
    } catch (e) {
      if (gen !== this._generation) return;
      return this._tokenFailed(e);
    }
    if (gen !== this._generation || this._stopped) return;
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(this.url, [PROTOCOL]);
    } catch (e) {
      this._emit('error', e);
      return this._lost(CloseCode.ABNORMAL, String(e?.message ?? e));
    }
    this._ws = ws;
    this._timers.connect = setTimeout(() => this._dead('connect timeout'), this.options.connectTimeoutMs);
    ws.onopen = () => {
      this._heard();
      const id = this._id();
      this._pending.set(id, { op: 'connect', internal: true, id, resolve: (ok) => this._connected(ok), reject: () => {} });
      this._send({ id, op: 'connect', token });
    };
    ws.onmessage = (ev) => this._frame(ev.data);
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._lost(ev.code, ev.reason);
    };
  }

  _connected(ok) {
    clearTimeout(this._timers.connect);
    this._attempt = 0;
    this.clientId = ok.client;
    this.node = ok.node;
    this.connects++;
    this._scheduleRefresh(ok.expires_in);
    this._setState('connected', { client: ok.client, node: ok.node, resumed: this.connects > 1 });
    // Rooms first, then the requests that waited, in one go.
    for (const room of this._rooms.keys()) this._toSubscribe.add(room);
    this._flushSubscribes();
    const queued = this._queue;
    this._queue = [];
    for (const r of queued) this._dispatch(r);
  }

  /** The socket ended (or never opened) with `code`. */
  _lost(code, reason) {
    const ws = this._ws;
    if (ws) this._detach(ws);
    this._ws = null;
    this._clearTimers();
    // Whatever still waits for this socket's answers sees a new generation.
    this._generation++;
    // Requests in flight go back to the queue: sent again after the reconnect;
    // the connection's own (connect, subscribe, refresh) end here.
    const gone = new GatewayError('unavailable', 'connection lost');
    for (const r of this._pending.values()) {
      if (r.internal) this._settle(r, gone);
      else this._queue.push(r);
    }
    this._pending.clear();
    this._queue.sort((a, b) => a.seq - b.seq);
    for (const e of this._rooms.values()) e.state = 'pending';
    if (this._stopped) return;
    const advice = closeAdvice(code);
    if (!advice.reconnect) {
      this._emit('error', new GatewayError('closed', `closed by the server with ${code} (${reason || 'no reason'}); not reconnecting`));
      const err = new GatewayError('closed', `connection closed with ${code}`);
      for (const r of this._queue) this._settle(r, err);
      this._queue = [];
      for (const e of this._rooms.values()) {
        clearTimeout(e.timer);
        this._rejectWaiters(e, err);
      }
      this._stopped = true;
      this._setState('closed', { code, reason });
      return;
    }
    if (advice.newToken) this._token = undefined;
    this._attempt += advice.penalty;
    const delay = backoffDelay(
      this._attempt,
      advice.fast ? this.options.fastDelayMs : this.options.baseDelayMs,
      this.options.maxDelayMs,
    );
    this._attempt++;
    this._setState('disconnected', { code, reason, delayMs: delay, force: true });
    this._timers.reconnect = setTimeout(() => this._reconnectNow(), delay);
  }

  _reconnectNow() {
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    if (!this._stopped) this._open();
  }

  /** No answer in time: the socket is dead whatever its state says. */
  _dead(why) {
    const ws = this._ws;
    if (!ws) return;
    this._detach(ws);
    try {
      ws.close(4000, why);
    } catch {}
    this._emit('error', new GatewayError('timeout', `connection lost: ${why}`));
    this._lost(CloseCode.ABNORMAL, why);
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  _clearTimers() {
    for (const k of Object.keys(this._timers)) {
      clearTimeout(this._timers[k]);
      this._timers[k] = null;
    }
  }

  _tokenFailed(e) {
    this._emit('error', e);
    if (e instanceof UnauthorizedError) {
      this._stopped = true;
      const err = new GatewayError('unauthorized', e.message);
      for (const r of this._queue) this._settle(r, err);
      this._queue = [];
      this._setState('closed', { code: CloseCode.UNAUTHORIZED, reason: e.message });
      return;
    }
    this._lost(CloseCode.ABNORMAL, `token provider failed: ${e?.message ?? e}`);
  }

  /** The connection token: the cached one unless `fresh` or it expires within 10 s. */
  async _connectionToken(fresh, reason) {
    const t = this.options.token;
    if (typeof t === 'string') return t;
    const exp = this._token && tokenExpiry(this._token);
    const stale = exp !== undefined && exp * 1000 - Date.now() < 10_000;
    if (fresh || !this._token || stale) this._token = await t({ reason });
    if (typeof this._token !== 'string' || !this._token) throw new Error('the token provider returned no token');
    return this._token;
  }

  _scheduleRefresh(expiresIn) {
    clearTimeout(this._timers.refresh);
    this._timers.refresh = null;
    if (typeof expiresIn !== 'number' || typeof this.options.token !== 'function') return;
    this._timers.refresh = setTimeout(() => this._refresh(0), refreshDelay(expiresIn));
  }

  async _refresh(failures) {
    const gen = this._generation;
    try {
      const token = await this._connectionToken(true, 'refresh');
      if (gen !== this._generation || this.state !== 'connected') return;
      const ok = await this._request({ op: 'refresh', token }, { internal: true });
      this._scheduleRefresh(ok.expires_in);
      this._emit('refresh', { expiresIn: ok.expires_in });
    } catch (e) {
      if (gen !== this._generation) return;
      this._emit('error', e);
      if (e instanceof UnauthorizedError) return;
      // Try again soon; if the token expires first the server closes with
      // 4010 and the reconnect asks for a new one.
      const delay = backoffDelay(failures, this.options.baseDelayMs, 10_000);
      this._timers.refresh = setTimeout(() => this._refresh(failures + 1), delay);
    }
  }

  // ---- liveness -----------------------------------------------------------

  /** Something arrived: the connection is alive. Arms the next ping. */
  _heard() {
    clearTimeout(this._timers.pong);
    this._timers.pong = null;
    clearTimeout(this._timers.ping);
    this._timers.ping = setTimeout(() => this._ping(), this.options.pingIntervalMs);
  }

  _ping() {
    if (!this._ws || this._ws.readyState !== 1) return;
    this._send({ op: 'ping' });
    this._timers.pong = setTimeout(() => this._dead('no pong'), this.options.pongTimeoutMs);
  }

  // ---- frames -------------------------------------------------------------

  _id() {
    const id = this._nextId;
    this._nextId = id >= 0xffffffff ? 1 : id + 1;
    return id;
  }

  _send(obj) {
    this._ws.send(JSON.stringify(obj));
  }

  _frame(data) {
    this._heard();
    let m;
    try {
      m = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      this._emit('error', new GatewayError('bad_frame', 'a frame that is not JSON'));
      return;
    }
    if (m.id !== undefined && m.id !== null) {
      const r = this._pending.get(m.id);
      if (!r) return;
      this._pending.delete(m.id);
      if (m.error) this._failed(r, m.error);
      else r.resolve(m.ok ?? {});
      return;
    }
    switch (m.op) {
      case 'message':
        // Not (or no longer) subscribed here: a frame that crossed an unsubscribe.
        if (!this._rooms.has(m.room)) break;
        if (this.offsets.accept(m.room, m.offset)) {
          this._emit('message', { room: m.room, offset: m.offset, ts: m.ts, from: m.from, data: m.data });
        }
        break;
      case 'activity':
        this._emit('activity', { room: m.room, offset: m.offset, count: m.count });
        break;
      case 'presence':
        if (!this._rooms.has(m.room)) break;
        this._emit('presence', { room: m.room, count: m.count, join: m.join ?? [], leave: m.leave ?? [] });
        break;
      case 'unsubscribed':
        this._unsubscribedByServer(m.room, m.error);
        break;
      case 'pong':
        break;
      default:
        break;
    }
  }

  // ---- requests -----------------------------------------------------------

  /**
   * Sends `cmd` now or once connected; kept across reconnects until answered
   * or `timeoutMs` passes. Resolves with the reply's `ok` object.
   */
  _request(cmd, { internal = false, timeoutMs = this.options.requestTimeoutMs } = {}) {
    if (this.state === 'closed') return Promise.reject(new GatewayError('closed', 'the client is closed'));
    return new Promise((resolve, reject) => {
      const r = { cmd, internal, resolve, reject, seq: this._nextSeq = (this._nextSeq ?? 0) + 1, timer: null, done: false };
      r.timer = setTimeout(() => {
        this._forget(r);
        this._settle(r, new GatewayError('timeout', `no answer to ${cmd.op} within ${timeoutMs} ms`));
      }, timeoutMs);
      const wrap = (fn) => (v) => {
        clearTimeout(r.timer);
        if (!r.done) {
          r.done = true;
          fn(v);
        }
      };
      r.resolve = wrap(resolve);
      r.reject = wrap(reject);
      if (this.state === 'connected') this._dispatch(r);
      else if (internal) r.reject(new GatewayError('unavailable', 'not connected'));
      else this._queue.push(r);
    });
  }

  _dispatch(r) {
    if (r.done) return;
    if (this.state !== 'connected' || !this._ws) {
      this._queue.push(r);
      return;
    }
    const id = this._id();
    r.id = id;
    this._pending.set(id, r);
    this._send({ id, ...r.cmd });
  }

  _forget(r) {
    if (r.id !== undefined && this._pending.get(r.id) === r) this._pending.delete(r.id);
    this._queue = this._queue.filter((q) => q !== r);
  }

  _settle(r, err) {
    clearTimeout(r.timer);
    r.reject(err);
  }

  _failed(r, error) {
    const err = new GatewayError(error.code, error.message, { retryAfterMs: error.retry_after_ms });
    // A publish or read that the server could not take now is sent again
    // (a publish with the same key, so it is stored once).
    if (!r.internal && r.cmd.op !== 'connect' && RETRYABLE.has(error.code)) {
      const delay = error.retry_after_ms ?? backoffDelay(r.retries ?? 0, this.options.baseDelayMs, 5_000);
      r.retries = (r.retries ?? 0) + 1;
      setTimeout(() => this._dispatch(r), delay);
      return;
    }
    r.reject(err);
  }

  /**
   * Publishes `data` (any JSON value) to `room`. Resolves with the offset
   * the message was stored at. The idempotency key is made here (or taken
   * from `options.key`) and reused on every retry.
   */
  publish(room, data, options = {}) {
    if (!ROOM.test(room)) return Promise.reject(new GatewayError('bad_request', `not a room name: ${room}`));
    const key = options.key ?? randomKey();
    return this._request({ op: 'publish', room, data, key }, { timeoutMs: options.timeoutMs }).then((ok) => ok.offset);
  }

  /** One page of a room's history, oldest first: `{messages, more}`. */
  history(room, options = {}) {
    if (!ROOM.test(room)) return Promise.reject(new GatewayError('bad_request', `not a room name: ${room}`));
    const cmd = { op: 'history', room };
    if (options.limit !== undefined) cmd.limit = options.limit;
    if (options.before !== undefined) cmd.before = options.before;
    return this._request(cmd, { timeoutMs: options.timeoutMs });
  }

  /** Members of a room across the cluster: `{count, age_ms, users?}`. */
  presence(room) {
    if (!ROOM.test(room)) return Promise.reject(new GatewayError('bad_request', `not a room name: ${room}`));
    return this._request({ op: 'presence', room });
  }

  // ---- rooms --------------------------------------------------------------

  /**
   * Subscribes to `room` (again: a second call changes the mode or renews
   * its room token). Resolves with `{room, offset, recovered?}` once the
   * gateway confirms; after every reconnect the room is resubscribed with
   * `since` = the last offset seen. Calls made in the same tick go in one frame.
   */
  subscribe(room, options = {}) {
    if (!ROOM.test(room)) return Promise.reject(new GatewayError('bad_request', `not a room name: ${room}`));
    if (this.state === 'closed') return Promise.reject(new GatewayError('closed', 'the client is closed'));
    const mode = options.mode ?? 'full';
    if (mode !== 'full' && mode !== 'notify') return Promise.reject(new GatewayError('bad_request', `mode: ${mode}`));
    if (typeof options.since === 'number') this.offsets.set(room, options.since);
    let e = this._rooms.get(room);
    if (!e) {
      e = { room, waiters: [], state: 'pending', retries: 0, roomToken: undefined, timer: null };
      this._rooms.set(room, e);
    }
    e.mode = mode;
    e.presence = options.presence === true;
    if (options.token !== undefined) e.tokenSource = options.token;
    const p = new Promise((resolve, reject) => e.waiters.push({ resolve, reject }));
    this._toSubscribe.add(room);
    this._scheduleFlush();
    return p;
  }

  /** Leaves `room`; forgets its offset. */
  unsubscribe(room) {
    const e = this._rooms.get(room);
    if (e) {
      clearTimeout(e.timer);
      this._rejectWaiters(e, new GatewayError('unsubscribed', 'unsubscribed'));
      this._rooms.delete(room);
    }
    this._toSubscribe.delete(room);
    this.offsets.delete(room);
    if (this.state !== 'connected') return Promise.resolve();
    return this._request({ op: 'unsubscribe', rooms: [room] }).then(() => undefined);
  }

  /** The rooms subscribed (or being subscribed) and their modes. */
  rooms() {
    return [...this._rooms.values()].map((e) => ({ room: e.room, mode: e.mode, state: e.state }));
  }

  _scheduleFlush() {
    if (this._timers.flush || this.state !== 'connected') return;
    this._timers.flush = setTimeout(() => {
      this._timers.flush = null;
      this._flushSubscribes();
    }, 0);
  }

  async _flushSubscribes() {
    const gen = this._generation;
    const rooms = [...this._toSubscribe].map((r) => this._rooms.get(r)).filter(Boolean);
    this._toSubscribe.clear();
    if (rooms.length === 0) return;
    const entries = [];
    for (const e of rooms) {
      const entry = { room: e.room };
      if (e.presence) entry.presence = true;
      if (e.mode === 'notify') entry.mode = 'notify';
      else {
        const since = this.offsets.get(e.room);
        if (since !== undefined) entry.since = since;
      }
      if (e.tokenSource !== undefined) {
        try {
          entry.token = await this._roomToken(e, e.renew === true);
          e.renew = false;
        } catch (err) {
          this._roomFailed(e, new GatewayError('unauthorized', `room token for ${e.room}: ${err?.message ?? err}`));
          continue;
        }
      }
      entries.push(entry);
    }
    if (gen !== this._generation || this.state !== 'connected') {
      for (const e of rooms) this._toSubscribe.add(e.room);
      return;
    }
    for (let i = 0; i < entries.length; i += ROOMS_PER_FRAME) {
      const chunk = entries.slice(i, i + ROOMS_PER_FRAME);
      this._request({ op: 'subscribe', rooms: chunk }, { internal: true }).then(
        (ok) => this._subscribed(chunk, ok.rooms ?? []),
        (err) => {
          if (gen !== this._generation) return; // resubscribed after the reconnect
          for (const c of chunk) {
            const e = this._rooms.get(c.room);
            if (e) this._retryRoom(e, err);
          }
        },
      );
    }
  }

  _subscribed(sent, results) {
    const byRoom = new Map(sent.map((s) => [s.room, s]));
    for (const res of results) {
      const e = this._rooms.get(res.room);
      const asked = byRoom.get(res.room);
      if (!e || !asked) continue;
      if (res.error) {
        const err = new GatewayError(res.error.code, res.error.message, { room: res.room });
        if (RETRYABLE.has(res.error.code)) this._retryRoom(e, err);
        else this._roomFailed(e, err);
        continue;
      }
      e.state = 'subscribed';
      e.retries = 0;
      // Without `since` (or when the gap could not be filled) live delivery
      // starts after `offset`: that is where a later resume starts.
      if (e.mode === 'full' && (asked.since === undefined || res.recovered === false)) {
        this.offsets.set(res.room, res.offset);
      }
      const value = { room: res.room, offset: res.offset, mode: e.mode };
      if (res.recovered !== undefined) value.recovered = res.recovered;
      if (e.tokenSource !== undefined) this._scheduleRoomTokenRenewal(e);
      for (const w of e.waiters.splice(0)) w.resolve(value);
      this._emit('subscribed', value);
    }
  }

  _retryRoom(e, err) {
    this._emit('error', err);
    clearTimeout(e.timer);
    const delay = backoffDelay(e.retries++, this.options.baseDelayMs, this.options.maxDelayMs);
    e.timer = setTimeout(() => {
      if (this._rooms.get(e.room) !== e) return;
      this._toSubscribe.add(e.room);
      this._scheduleFlush();
    }, delay);
  }

  _roomFailed(e, err) {
    clearTimeout(e.timer);
    this._rooms.delete(e.room);
    this._rejectWaiters(e, err);
    this._emit('unsubscribed', { room: e.room, error: { code: err.code, message: err.message } });
  }

  _rejectWaiters(e, err) {
    for (const w of e.waiters.splice(0)) w.reject(err);
  }

  _unsubscribedByServer(room, error) {
    const e = this._rooms.get(room);
    // An expired room token: one more try with a fresh one.
    if (e && e.tokenSource !== undefined && !e.renewedAfterLoss) {
      e.renewedAfterLoss = true;
      e.roomToken = undefined;
      this._toSubscribe.add(room);
      this._scheduleFlush();
      return;
    }
    if (e) {
      clearTimeout(e.timer);
      this._rooms.delete(room);
    }
    this._emit('unsubscribed', { room, error });
  }

  async _roomToken(e, fresh) {
    const src = e.tokenSource;
    if (typeof src === 'string') return src;
    const exp = e.roomToken && tokenExpiry(e.roomToken);
    const stale = exp !== undefined && exp * 1000 - Date.now() < 10_000;
    if (fresh || !e.roomToken || stale) e.roomToken = await src({ room: e.room });
    return e.roomToken;
  }

  /** Subscribes again with a fresh room token before the current one expires. */
  _scheduleRoomTokenRenewal(e) {
    clearTimeout(e.timer);
    e.renewedAfterLoss = false;
    if (typeof e.tokenSource !== 'function') return;
    const exp = tokenExpiry(e.roomToken ?? '');
    if (exp === undefined) return;
    const delay = refreshDelay(exp - Date.now() / 1000);
    e.timer = setTimeout(() => {
      if (this._rooms.get(e.room) !== e) return;
      e.renew = true;
      this._toSubscribe.add(e.room);
      this._scheduleFlush();
    }, delay);
  }
}
