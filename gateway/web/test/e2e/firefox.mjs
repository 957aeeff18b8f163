// The client SDK in Firefox (Debian's firefox-esr, driven by puppeteer-core
// over WebDriver BiDi): two users in two Firefox pages, each in its own
// browser context, served by the gateway in dev mode (same origin), chat
// through one gateway. Messages go both ways; a room in the background
// (notify mode) counts unread messages; the SDK's state events are the
// expected ones, through a gateway restart (the pages reconnect by
// themselves, fetching a new token after the new process refuses the old
// one with 4001) and a close by the app.
// config: {url: base URL of the gateway, screenshot: a PNG path or null}
import { assert, ask, config, launchFirefox, log, main } from './harness.mjs';

/** Opens the demo as `name` in a fresh browser context; waits for "connected". */
async function openDemo(browser, name) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport({ width: 1000, height: 640 });
  page.on('console', (m) => console.log(`[${name} console] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`[${name} pageerror] ${e.message}`));
  await page.goto(`${config.url}/?${new URLSearchParams({ name, rooms: 'general,random' })}`);
  await page.waitForSelector('#state[data-state="connected"]', { timeout: 30_000 });
  // Every state event with its details, from here on.
  await page.evaluate(() => {
    window.stateEvents = [];
    window.demo.client.on('state', (s) =>
      window.stateEvents.push({ state: s.state, previous: s.previous, code: s.code ?? null, retry: s.delayMs !== undefined }),
    );
  });
  return page;
}

/** Types `text` into the (empty) message box, key by key, and presses Enter. */
async function say(page, text) {
  const box = await page.waitForSelector('#text');
  await box.type(text);
  await box.press('Enter');
}

async function waitForText(page, text, from) {
  await page.waitForFunction(
    (t, f) =>
      [...document.querySelectorAll('#messages li')].some(
        (li) => li.querySelector('.text').textContent === t && li.querySelector('.from').textContent === f,
      ),
    { timeout: 30_000 },
    text,
    from,
  );
}

function shown(page) {
  return page.$$eval('#messages li', (lis) =>
    lis.map((li) => `${li.querySelector('.from').textContent}: ${li.querySelector('.text').textContent}`),
  );
}

const unread = (page, room) => page.$eval(`li[data-room="${room}"] .unread`, (e) => e.dataset.count);
const stats = (page) =>
  page.evaluate(() => ({
    states: window.demo.stats.states,
    errors: window.demo.stats.errors,
    tokens: window.demo.stats.tokens,
    connects: window.demo.client.connects,
    rooms: window.demo.client.rooms(),
    events: window.stateEvents,
  }));

await main(
  120_000,
  async (browser) => {
    const version = await browser.version();
    assert.match(version, /^firefox\/\d+/i, 'the browser is Firefox');
    const alice = await openDemo(browser, 'alice');
    const bob = await openDemo(browser, 'bob');
    const agent = await alice.evaluate(() => navigator.userAgent);
    assert.match(agent, /Firefox\/\d+/);
    log(`both connected in ${version} (${agent})`);

    // Messages both ways in #general.
    await say(alice, 'hello bob');
    await waitForText(bob, 'hello bob', 'alice');
    await waitForText(alice, 'hello bob', 'alice');
    await say(bob, 'hi alice ✓ ünïcode');
    await waitForText(alice, 'hi alice ✓ ünïcode', 'bob');
    log('chatted in general');

    // Alice moves to #random and writes there; Bob's #random is in notify mode.
    await alice.click('li[data-room="random"]');
    await alice.waitForSelector('li.active[data-room="random"]');
    let b = await stats(bob);
    assert.deepEqual(
      b.rooms.map((r) => `${r.room}:${r.mode}`).sort(),
      ['general:full', 'random:notify'],
    );
    for (const text of ['one', 'two', 'three']) {
      await say(alice, text);
      await waitForText(alice, text, 'alice');
    }
    await bob.waitForSelector('li[data-room="random"] .unread[data-count="3"]', { timeout: 30_000 });
    assert.equal(await unread(bob, 'general'), '0');
    log('bob sees 3 unread in random');
    if (config.screenshot) {
      await bob.screenshot({ path: config.screenshot });
      log('screenshot', config.screenshot);
    }
    // Opening the room shows the three, in order, and clears the count.
    await bob.click('li[data-room="random"]');
    await waitForText(bob, 'three', 'alice');
    assert.deepEqual(await shown(bob), ['alice: one', 'alice: two', 'alice: three']);
    assert.equal(await unread(bob, 'random'), '0');
    await bob.click('li[data-room="general"]');
    await waitForText(bob, 'hello bob', 'alice');
    assert.deepEqual(await shown(bob), ['alice: hello bob', 'bob: hi alice ✓ ünïcode']);

    // State events so far: one connect each, no errors.
    for (const page of [alice, bob]) {
      const s = await stats(page);
      assert.deepEqual(s.states, ['connecting', 'connected']);
      assert.deepEqual(s.errors, []);
      assert.equal(s.connects, 1);
    }

    // The gateway goes away (SIGKILL) and comes back on the same address:
    // each page reports "disconnected" (abnormal close, retrying), then
    // reconnects by itself.
    await ask('kill a');
    for (const page of [alice, bob]) {
      await page.waitForSelector('#state[data-state="disconnected"]', { timeout: 30_000 });
    }
    log('both pages saw the gateway go');
    await ask('restart a');
    for (const page of [alice, bob]) {
      await page.waitForFunction(() => window.demo.client.state === 'connected' && window.demo.client.connects === 2, {
        timeout: 30_000,
      });
      const s = await stats(page);
      assert.deepEqual(s.events[0], { state: 'disconnected', previous: 'connected', code: 1006, retry: true }, JSON.stringify(s.events));
      assert.equal(s.events.at(-1).state, 'connected', JSON.stringify(s.events));
      for (const e of s.events.slice(1, -1)) assert.ok(['connecting', 'disconnected'].includes(e.state), JSON.stringify(s.events));
      assert.ok(!s.states.includes('closed'));
      // Dev mode signs with a secret made up per process: the restarted node
      // refuses the old token (4001), so the SDK asks its provider again.
      assert.ok(s.events.some((e) => e.state === 'disconnected' && e.code === 4001), JSON.stringify(s.events));
      assert.ok(s.tokens >= 2, `tokens fetched: ${s.tokens}`);
      log('state events:', JSON.stringify(s.events));
    }
    log('both pages reconnected');
    // Chat goes on after the restart, both ways.
    await say(bob, 'after the restart');
    await waitForText(bob, 'after the restart', 'bob');
    await alice.waitForSelector('li[data-room="general"] .unread[data-count="1"]', { timeout: 30_000 });
    await say(alice, 'still in random');
    await waitForText(alice, 'still in random', 'alice');
    await bob.waitForSelector('li[data-room="random"] .unread[data-count="1"]', { timeout: 30_000 });
    log('chat works after the restart');

    // The app closes the client: a final "closed" state event, no reconnect.
    const closed = await alice.evaluate(() => {
      window.demo.client.close();
      return window.demo.client.state;
    });
    assert.equal(closed, 'closed');
    const s = await stats(alice);
    assert.deepEqual(s.events.at(-1), { state: 'closed', previous: 'connected', code: null, retry: false });
    log('alice closed');
  },
  launchFirefox,
);
