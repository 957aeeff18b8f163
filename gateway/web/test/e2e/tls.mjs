// The demo over https:// and wss:// with a self-signed certificate, the
// browser told to accept it (ignoreHTTPSErrors). config: {url: https://...}
import { assert, config, main, openDemo, say, waitForText } from './harness.mjs';

await main(90_000, async (browser) => {
  assert.match(config.url, /^https:\/\//);
  const page = await openDemo(browser, config.url, 'frank', { rooms: 'general', ignoreHTTPSErrors: true });
  const url = await page.evaluate(() => window.demo.client.url);
  assert.match(url, /^wss:\/\//);
  await say(page, 'over tls');
  await waitForText(page, 'over tls', 'frank');
});
