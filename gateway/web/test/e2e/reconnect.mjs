// The page's gateway is killed (SIGKILL) and started again while messages
// keep being published on another gateway: the page reconnects by itself and
// shows every message once, in order. The publisher is the client SDK itself,
// running in Node (global WebSocket, Node 22+).
// config: {page: base URL of gateway A, publisher: base URL of gateway B, total: N}
import { Client } from '../../client.js';
import { assert, ask, config, log, main, openDemo, shown, waitForText } from './harness.mjs';

const wsUrl = (base) => `${base.replace(/^http/, 'ws')}/ws`;

await main(240_000, async (browser) => {
  const total = config.total ?? 60;
  const page = await openDemo(browser, config.page, 'carol', { rooms: 'general' });
  const publisher = new Client(wsUrl(config.publisher), {
    token: async () => (await (await fetch(`${config.publisher}/dev/token?sub=dan`)).json()).token,
  });
  publisher.connect();
  const text = (i) => `m-${String(i).padStart(3, '0')}`;
  const killAt = Math.floor(total / 4);
  const restartAt = Math.floor(total * 2 / 3);
  for (let i = 1; i <= total; i++) {
    const offset = await publisher.publish('general', { text: text(i) });
    assert.ok(offset > 0);
    if (i === killAt) {
      await waitForText(page, text(i), 'dan');
      log(`page saw ${text(i)}; killing its gateway`);
      await ask('kill a');
    }
    if (i === restartAt) {
      log(`published up to ${text(i)} while the page's gateway was down; starting it again`);
      await ask('restart a');
    }
    await new Promise((r) => setTimeout(r, 30));
  }
  log(`published ${total}`);
  await waitForText(page, text(total), 'dan', 60_000);
  const got = (await shown(page)).map((m) => m.text);
  const want = Array.from({ length: total }, (_, i) => text(i + 1));
  assert.deepEqual(got, want, 'every message once, in order');
  const offsets = (await shown(page)).map((m) => m.offset);
  assert.ok(offsets.every((o, i) => i === 0 || o > offsets[i - 1]), 'offsets grow');
  const states = await page.evaluate(() => window.demo.stats.states);
  const connects = await page.evaluate(() => window.demo.client.connects);
  log('page states', states.join(','), 'connects', connects);
  assert.ok(states.includes('disconnected'), 'the page noticed the kill');
  assert.ok(connects >= 2, 'and reconnected by itself');
  publisher.close();
});
