// Type declarations of client.js (the gateway's browser and Node client).

/** The JSON sub-protocol the client speaks. */
export declare const PROTOCOL: 'gw.v1.json';

/** Close codes of the protocol. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  PROTOCOL_ERROR: 1002;
  ABNORMAL: 1006;
  BAD_PAYLOAD: 1007;
  TOO_LARGE: 1009;
  RESTARTING: 1012;
  UNAUTHORIZED: 4001;
  POLICY_VIOLATION: 4008;
  SLOW_CONSUMER: 4009;
  TOKEN_EXPIRED: 4010;
  TOO_MANY_CONNECTIONS: 4029;
}>;

/** The protocol's error codes, and the client's own (`timeout`, `closed`, `unsubscribed`, `bad_frame`). */
export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'rate_limited'
  | 'too_large'
  | 'limit_exceeded'
  | 'unavailable'
  | 'internal'
  | 'timeout'
  | 'closed'
  | 'unsubscribed'
  | 'bad_frame'
  | (string & {});

/** An error answered by the gateway or made by the client. */
export declare class GatewayError extends Error {
  constructor(code: ErrorCode, message: string, extra?: { retryAfterMs?: number; room?: string });
  readonly code: ErrorCode;
  /** With `rate_limited`: when to try again, in milliseconds. */
  readonly retryAfterMs?: number;
  /** The room a subscribe error is about. */
  readonly room?: string;
}

/** Thrown by a token provider to stop reconnecting for good. */
export declare class UnauthorizedError extends Error {
  constructor(message?: string);
}

/** What the client does after a close code. */
export interface CloseAdvice {
  /** Reconnect at all (false after 1002, 1003, 1007, 1009: the client must be fixed). */
  reconnect: boolean;
  /** Use the short base delay (1012, 4009, 4010), still jittered. */
  fast: boolean;
  /** Ask the token provider for a new token first (4001, 4010). */
  newToken: boolean;
  /** Extra backoff steps (4008: 3, 4029: 2). */
  penalty: number;
}

/** Full-jitter exponential backoff: uniform in [0, min(maxMs, baseMs * 2^attempt)), milliseconds. */
export declare function backoffDelay(attempt: number, baseMs: number, maxMs: number, random?: () => number): number;
export declare function closeAdvice(code: number): CloseAdvice;
/** Milliseconds until a token that expires in `expiresInSec` seconds is refreshed. */
export declare function refreshDelay(expiresInSec: number): number;
/** A random 128-bit idempotency key, hex. */
export declare function randomKey(): string;
/** The unverified `exp` claim of a JWT, in seconds since the epoch. */
export declare function tokenExpiry(token: string): number | undefined;

/** The last offset seen per room; offsets at or below it are duplicates. */
export declare class OffsetTracker {
  constructor();
  /** Records the offset; false when it is not newer than the last one. */
  accept(room: string, offset: number): boolean;
  get(room: string): number | undefined;
  set(room: string, offset: number): void;
  delete(room: string): void;
}

/** Why the connection token provider is called. */
export interface TokenContext {
  reason: 'connect' | 'refresh';
}

/** Returns a connection token (a JWT). Throw `UnauthorizedError` to stop for good. */
export type TokenProvider = (ctx: TokenContext) => Promise<string>;
/** Returns a room token for `room`. */
export type RoomTokenProvider = (ctx: { room: string }) => Promise<string>;

export interface ClientOptions {
  /** A token, or an async function called at connect, before expiry (refresh), and after 4001 or 4010. */
  token: string | TokenProvider;
  /** Base of the backoff after a lost connection, ms (default 1000). */
  baseDelayMs?: number;
  /** Base of the backoff after 1012 (restart) and 4009 (slow consumer), ms (default 200). */
  fastDelayMs?: number;
  /** Longest backoff, ms (default 30000). */
  maxDelayMs?: number;
  /** A `ping` is sent after this long without a frame, ms (default 20000). */
  pingIntervalMs?: number;
  /** The connection is dropped and reopened when nothing arrives this long after a ping, ms (default 10000). */
  pongTimeoutMs?: number;
  /** Longest wait for the socket to open and `connect` to be answered, ms (default 10000). */
  connectTimeoutMs?: number;
  /** Longest a publish, history or presence request waits, across reconnects, ms (default 30000). */
  requestTimeoutMs?: number;
  /** A WebSocket constructor (default: the global one). */
  WebSocket?: unknown;
}

export type ConnectionState = 'disconnected' | 'connecting' | 'connected' | 'closed';

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** With `connected`. */
  client?: string;
  node?: string;
  /** With `connected`: true after a reconnect. */
  resumed?: boolean;
  /** With `disconnected` and `closed`: the close code (1006 when the socket just ended). */
  code?: number;
  reason?: string;
  /** With `disconnected`: when the next attempt starts. */
  delayMs?: number;
}

export interface Message<T = unknown> {
  room: string;
  offset: number;
  /** Server time, ms since the epoch. */
  ts: number;
  /** `sub` of the publisher, set by the server. */
  from: string;
  data: T;
}

export interface Activity {
  room: string;
  offset: number;
  /** Messages since the previous activity event of the room. */
  count: number;
}

/** Users who joined and left a room watched with `presence: true`, at most one event per room per presence interval. */
export interface PresenceEvent {
  room: string;
  /** Connections subscribed on every gateway. */
  count: number;
  join: string[];
  leave: string[];
}

export interface Subscribed {
  room: string;
  offset: number;
  mode: 'full' | 'notify';
  /** Present when `since` was sent: false means messages were missed and the app should reload history. */
  recovered?: boolean;
}

export interface Unsubscribed {
  room: string;
  error?: { code: ErrorCode; message: string };
}

export interface ClientEvents {
  state: StateEvent;
  message: Message;
  activity: Activity;
  presence: PresenceEvent;
  subscribed: Subscribed;
  unsubscribed: Unsubscribed;
  refresh: { expiresIn: number | null };
  error: Error;
}

export interface SubscribeOptions {
  /** `full` (default): messages; `notify`: coalesced activity only. */
  mode?: 'full' | 'notify';
  /** Resume after this offset (e.g. the last one of a history page). Default: the last offset seen. */
  since?: number;
  /** A room token, or a function returning one, for rooms the connection token does not grant. */
  token?: string | RoomTokenProvider;
  /** Ask for `presence` events (joins and leaves) of this room; only rooms within the gateway's presence-list bound get them. */
  presence?: boolean;
}

export interface HistoryPage {
  messages: Message[];
  more: boolean;
}

export declare class Client {
  constructor(url: string, options: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** The current connection's id and node (after `connected`). */
  readonly clientId: string | undefined;
  readonly node: string | undefined;
  /** Successful connects so far. */
  readonly connects: number;
  /** The last offset seen per room (the resume points). */
  readonly offsets: OffsetTracker;
  on<K extends keyof ClientEvents>(event: K, fn: (value: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, fn: (value: ClientEvents[K]) => void): void;
  connect(): void;
  close(): void;
  subscribe(room: string, options?: SubscribeOptions): Promise<Subscribed>;
  unsubscribe(room: string): Promise<void>;
  rooms(): { room: string; mode: 'full' | 'notify'; state: 'pending' | 'subscribed' }[];
  /** Resolves with the offset the message was stored at. */
  publish(room: string, data: unknown, options?: { key?: string; timeoutMs?: number }): Promise<number>;
  history(room: string, options?: { limit?: number; before?: number; timeoutMs?: number }): Promise<HistoryPage>;
  presence(room: string): Promise<{ count: number; age_ms: number; users?: string[] }>;
}
