// Two users chat through the demo page; a room in the background (notify
// mode) counts unread messages. config: {alice, bob} (base URLs; the same
// gateway or two gateways joined by NATS), screenshot (a PNG path or null).
import { assert, config, log, main, openDemo, say, shown, waitForText } from './harness.mjs';

await main(120_000, async (browser) => {
  const alice = await openDemo(browser, config.alice, 'alice');
  const bob = await openDemo(browser, config.bob, 'bob');
  log('both connected');
  await say(alice, 'hello bob');
  await waitForText(bob, 'hello bob', 'alice');
  await waitForText(alice, 'hello bob', 'alice');
  await say(bob, 'hi alice');
  await waitForText(alice, 'hi alice', 'bob');
  log('chatted in general');

  // Presence through the SDK: both users, cluster-wide (eventually
  // consistent across two gateways: polled, bounded).
  let who;
  for (let i = 0; i < 50; i++) {
    who = await alice.evaluate(() => window.demo.client.presence('general'));
    if (who.users?.length === 2) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.equal(who.count, 2);
  assert.deepEqual(who.users, ['alice', 'bob']);
  log('presence of general:', JSON.stringify(who));
  // Presence events: alice watches general; carol joins it.
  await alice.evaluate(async () => {
    window.presenceEvents = [];
    window.demo.client.on('presence', (p) => window.presenceEvents.push(p));
    await window.demo.client.subscribe('general', { presence: true });
  });
  const carol = await openDemo(browser, config.bob, 'carol');
  await alice.waitForFunction(() => window.presenceEvents.some((p) => p.join.includes('carol')), null, { timeout: 15_000 });
  const joined = await alice.evaluate(() => window.presenceEvents.find((p) => p.join.includes('carol')));
  assert.equal(joined.room, 'general');
  log('presence event:', JSON.stringify(joined));
  await carol.close();

  // Alice moves to #random and writes there; Bob stays in #general.
  await alice.click('li[data-room="random"]');
  await alice.waitForSelector('li.active[data-room="random"]');
  for (const text of ['one', 'two', 'three']) {
    await say(alice, text);
    await waitForText(alice, text, 'alice');
  }
  await bob.waitForSelector('li[data-room="random"] .unread[data-count="3"]');
  assert.equal(await bob.textContent('li[data-room="random"] .unread'), '3');
  assert.equal(await bob.getAttribute('li[data-room="general"] .unread', 'data-count'), '0');
  log('bob sees 3 unread in random');
  if (config.screenshot) {
    await bob.screenshot({ path: config.screenshot });
    log('screenshot', config.screenshot);
  }

  // Opening the room shows the three messages, in order, and clears the count.
  await bob.click('li[data-room="random"]');
  await waitForText(bob, 'three', 'alice');
  const texts = (await shown(bob)).map((m) => `${m.from}: ${m.text}`);
  assert.deepEqual(texts, ['alice: one', 'alice: two', 'alice: three']);
  assert.equal(await bob.getAttribute('li[data-room="random"] .unread', 'data-count'), '0');
  // And back in #general nothing was lost or repeated.
  await bob.click('li[data-room="general"]');
  await waitForText(bob, 'hi alice', 'bob');
  const general = (await shown(bob)).map((m) => `${m.from}: ${m.text}`);
  assert.deepEqual(general, ['alice: hello bob', 'bob: hi alice']);
});
