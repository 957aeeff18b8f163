// The dev-mode demo chat: served by the gateway at / (dev mode only).
// Pick a name, join rooms, chat. The room in view is subscribed in full
// mode; the others in notify mode (unread counts from activity pushes).
// URL parameters (for quick starts and tests): ?name=alice&rooms=general,random&ttl=300
import { Client } from '/client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;

/** room -> { messages: Message[], unread: number, loaded: boolean } */
const rooms = new Map();
let active = null;
let client = null;
let me = null;
/** What the page did, for people and tests reading window.demo. */
const stats = { tokens: 0, states: [], errors: [] };

async function fetchToken() {
  const q = new URLSearchParams({ sub: me });
  if (params.get('ttl')) q.set('ttl', params.get('ttl'));
  const res = await fetch(`/dev/token?${q}`, { cache: 'no-store' });
  if (!res.ok) throw new Error(`dev token: HTTP ${res.status}`);
  stats.tokens++;
  return (await res.json()).token;
}

function login(name) {
  me = name;
  localStorage.setItem('gateway-demo-name', name);
  $('login').hidden = true;
  $('chat').hidden = false;
  $('who').textContent = name;
  client = new Client(wsUrl, { token: fetchToken });
  client.on('state', (s) => {
    stats.states.push(s.state);
    $('state').textContent = s.state === 'disconnected' && s.delayMs !== undefined
      ? `disconnected (${s.code}), retrying`
      : s.state;
    $('state').dataset.state = s.state;
  });
  client.on('error', (e) => stats.errors.push(String(e?.message ?? e)));
  client.on('message', (m) => {
    const r = rooms.get(m.room);
    if (!r) return;
    r.messages.push(m);
    if (m.room === active) appendMessage(m);
    else {
      r.unread++;
      renderRooms();
    }
  });
  client.on('activity', (a) => {
    const r = rooms.get(a.room);
    if (!r || a.room === active) return;
    r.unread += a.count;
    renderRooms();
  });
  client.on('subscribed', (s) => {
    // The gateway could not replay what was missed: reload the history.
    if (s.recovered === false && rooms.has(s.room)) loadHistory(s.room);
  });
  client.on('unsubscribed', (u) => notice(`left ${u.room}: ${u.error?.message ?? 'unsubscribed'}`));
  client.connect();
  const initial = (params.get('rooms') ?? 'general,random').split(',').filter(Boolean);
  for (const room of initial) join(room);
  window.demo = { client, rooms, stats, get active() { return active; }, join, activate, send };
}

function join(room) {
  if (rooms.has(room)) return activate(room);
  rooms.set(room, { messages: [], unread: 0, loaded: false });
  if (active === null) return activate(room);
  renderRooms();
  return client.subscribe(room, { mode: 'notify' }).catch((e) => notice(`${room}: ${e.message}`));
}

async function activate(room) {
  const previous = active;
  active = room;
  const r = rooms.get(room);
  r.unread = 0;
  renderRooms();
  renderMessages();
  if (previous && previous !== room && rooms.has(previous)) {
    client.subscribe(previous, { mode: 'notify' }).catch((e) => notice(`${previous}: ${e.message}`));
  }
  try {
    if (!r.loaded) {
      r.loaded = true;
      const last = await loadHistory(room);
      // Everything after the page (or from the start) comes as catch-up.
      await client.subscribe(room, { mode: 'full', since: last ?? 0 });
    } else {
      // Resumes after the last message seen here: what came while the room
      // was in the background is replayed.
      await client.subscribe(room, { mode: 'full' });
    }
  } catch (e) {
    notice(`${room}: ${e.message}`);
  }
}

/** Replaces the room's messages with its latest page; returns the last offset. */
async function loadHistory(room) {
  const page = await client.history(room, { limit: 50 });
  const r = rooms.get(room);
  const known = new Set(r.messages.map((m) => m.offset));
  const merged = [...page.messages.filter((m) => !known.has(m.offset)), ...r.messages];
  merged.sort((a, b) => a.offset - b.offset);
  r.messages = merged;
  if (room === active) renderMessages();
  return page.messages.at(-1)?.offset;
}

async function send(text) {
  const room = active;
  try {
    await client.publish(room, { text });
  } catch (e) {
    notice(`not sent to ${room}: ${e.message}`);
  }
}

function notice(text) {
  $('notice').textContent = text;
  $('notice').hidden = false;
}

function renderRooms() {
  const ul = $('rooms');
  ul.replaceChildren(
    ...[...rooms].map(([room, r]) => {
      const li = document.createElement('li');
      li.dataset.room = room;
      li.className = room === active ? 'active' : '';
      const name = document.createElement('span');
      name.textContent = `# ${room}`;
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.dataset.count = String(r.unread);
      badge.textContent = String(r.unread);
      li.append(name, badge);
      li.addEventListener('click', () => activate(room));
      return li;
    }),
  );
  $('title').textContent = active ? `# ${active}` : '';
}

function renderMessages() {
  const r = rooms.get(active);
  $('messages').replaceChildren();
  for (const m of r?.messages ?? []) appendMessage(m);
}

function appendMessage(m) {
  const li = document.createElement('li');
  li.dataset.offset = String(m.offset);
  if (m.from === me) li.className = 'mine';
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = m.from;
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = typeof m.data?.text === 'string' ? m.data.text : JSON.stringify(m.data);
  li.append(from, text);
  const list = $('messages');
  list.append(li);
  list.scrollTop = list.scrollHeight;
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  login($('name').value.trim());
});
$('join').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const room = $('room').value.trim();
  $('room').value = '';
  join(room);
});
$('send').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = $('text').value;
  $('text').value = '';
  send(text);
});

$('name').value = params.get('name') ?? localStorage.getItem('gateway-demo-name') ?? '';
if (params.get('name')) login(params.get('name'));
