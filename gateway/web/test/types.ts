// Compiled by `tsc -p gateway/web` (no output): uses every declared API the
// way an application does, so a declaration that does not fit fails the test.
import {
  Client,
  CloseCode,
  GatewayError,
  OffsetTracker,
  UnauthorizedError,
  backoffDelay,
  closeAdvice,
  refreshDelay,
  type Message,
  type StateEvent,
} from '../client.js';

const client = new Client('wss://chat.example.com/ws', {
  token: async ({ reason }) => {
    if (reason === 'refresh') return 'refreshed';
    throw new UnauthorizedError('signed out');
  },
  maxDelayMs: 10_000,
});
const off: () => void = client.on('message', (m: Message) => {
  const room: string = m.room;
  const offset: number = m.offset;
  console.log(room, offset, m.from, m.ts, m.data);
});
off();
client.on('state', (s: StateEvent) => console.log(s.state, s.previous, s.code, s.delayMs, s.resumed));
client.on('activity', (a) => console.log(a.room, a.count + 1, a.offset));
client.on('presence', (p) => console.log(p.room, p.count + 1, p.join.concat(p.leave).length));
client.on('subscribed', (s) => {
  if (s.recovered === false) console.log('reload', s.room, s.offset);
});
client.on('unsubscribed', (u) => console.log(u.room, u.error?.code));
client.on('refresh', (r) => console.log(r.expiresIn));
client.on('error', (e) => {
  if (e instanceof GatewayError) console.log(e.code, e.retryAfterMs, e.room);
});
client.connect();

async function use(): Promise<void> {
  const sub = await client.subscribe('general', { since: 120 });
  const mode: 'full' | 'notify' = sub.mode;
  await client.subscribe('random', { mode: 'notify', presence: true });
  await client.subscribe('team-7', { token: async ({ room }) => `token-for-${room}` });
  const offset: number = await client.publish('general', { text: 'hi' }, { key: 'k-1' });
  const page = await client.history('general', { limit: 50, before: offset });
  const more: boolean = page.more;
  const first: Message | undefined = page.messages[0];
  const who = await client.presence('general');
  const n: number = who.count;
  await client.unsubscribe('random');
  console.log(mode, more, first, n, client.state, client.connects, client.offsets.get('general'));
  client.close();
}
void use;

const t = new OffsetTracker();
const fresh: boolean = t.accept('general', 1);
const delay: number = backoffDelay(3, 1000, 30_000, () => 0.5);
const advice = closeAdvice(CloseCode.RESTARTING);
const fast: boolean = advice.fast;
const refreshIn: number = refreshDelay(300);
console.log(fresh, delay, fast, refreshIn);
