// A short-lived token (config.ttl seconds; the gateway adds its 5 s leeway)
// is refreshed over the open connection, several times, past the first
// token's expiry: no disconnect, the same connection id, and chat still works.
// config: {url}
import { assert, config, log, main, openDemo, say, waitForText } from './harness.mjs';

await main(120_000, async (browser) => {
  const ttl = config.ttl ?? 6;
  const page = await openDemo(browser, config.url, 'erin', { rooms: 'general', ttl });
  const first = await page.evaluate(() => window.demo.client.clientId);
  const start = Date.now();
  // The first token is dead (exp + leeway) after ttl + 5 s; wait past that
  // and for at least three refreshes.
  await page.waitForFunction(() => window.demo.stats.tokens >= 4, null, { timeout: 60_000 });
  await page.waitForTimeout(Math.max(0, (ttl + 6) * 1000 - (Date.now() - start)));
  const seen = await page.evaluate(() => ({
    id: window.demo.client.clientId,
    connects: window.demo.client.connects,
    states: window.demo.stats.states,
    tokens: window.demo.stats.tokens,
    errors: window.demo.stats.errors,
  }));
  log('after', Date.now() - start, 'ms:', JSON.stringify(seen));
  assert.equal(seen.id, first, 'the same connection');
  assert.equal(seen.connects, 1);
  assert.deepEqual(seen.states, ['connecting', 'connected'], 'never disconnected');
  assert.deepEqual(seen.errors, []);
  await say(page, 'still here');
  await waitForText(page, 'still here', 'erin');
});
