// Shared parts of the browser scenarios: Chromium through playwright-core,
// Firefox ESR through puppeteer-core over WebDriver BiDi (all installed by
// scripts/ensure-web.sh), the demo page, and a line
// protocol with the Rust test that owns the gateway processes: a scenario
// prints "@@ <request>" and reads one line back once it is done.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import readline from 'node:readline';

/** The scenario's settings, from the Rust test. */
export const config = JSON.parse(process.env.E2E_CONFIG ?? '{}');
if (!process.env.E2E_TOOLS) throw new Error('E2E_TOOLS (the folder holding node_modules/playwright-core) is not set');
const require = createRequire(`${process.env.E2E_TOOLS}/`);
const { chromium } = require('playwright-core');

/** Headless Debian Chromium with the flags that work on these machines (docs: ../shared/TOOLING.md). */
export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/**
 * Headless Debian Firefox ESR driven by puppeteer-core over WebDriver BiDi
 * (Playwright needs its own patched Firefox build; puppeteer speaks the
 * standard protocol stock Firefox ships). Its pages have puppeteer's API,
 * not Playwright's: the Firefox scenario has its own page helpers.
 */
export function launchFirefox() {
  const puppeteer = require('puppeteer-core');
  return puppeteer.launch({
    browser: 'firefox',
    executablePath: process.env.FIREFOX ?? '/usr/bin/firefox-esr',
    headless: true,
  });
}

const input = readline.createInterface({ input: process.stdin });
const answers = [];
input.on('line', (line) => answers.shift()?.(line));

/** Asks the Rust side to act on the gateways ("kill a", "restart a"); resolves when it has. */
export function ask(request) {
  process.stdout.write(`@@ ${request}\n`);
  return new Promise((resolve) => answers.push(resolve));
}

export function log(...args) {
  console.log(new Date().toISOString().slice(11, 23), ...args);
}

/** Opens the demo as `name` in a fresh context and waits for "connected". */
export async function openDemo(browser, base, name, { rooms = 'general,random', ttl, ignoreHTTPSErrors = false } = {}) {
  const context = await browser.newContext({ ignoreHTTPSErrors, viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  page.on('console', (m) => console.log(`[${name} console] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`[${name} pageerror] ${e.message}`));
  const q = new URLSearchParams({ name, rooms });
  if (ttl) q.set('ttl', String(ttl));
  await page.goto(`${base}/?${q}`);
  await connected(page);
  return page;
}

export async function connected(page, timeout = 30_000) {
  await page.waitForSelector('#state[data-state="connected"]', { timeout });
}

/** The messages the page shows in the room in view: [{from, text, offset}]. */
export function shown(page) {
  return page.$$eval('#messages li', (lis) =>
    lis.map((li) => ({
      from: li.querySelector('.from').textContent,
      text: li.querySelector('.text').textContent,
      offset: Number(li.dataset.offset),
    })),
  );
}

/** Types `text` into the message box and sends it. */
export async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

/** Waits until the page shows a message with `text` (from `from`). */
export async function waitForText(page, text, from, timeout = 30_000) {
  await page.waitForFunction(
    ([t, f]) =>
      [...document.querySelectorAll('#messages li')].some(
        (li) => li.querySelector('.text').textContent === t && (!f || li.querySelector('.from').textContent === f),
      ),
    [text, from],
    { timeout },
  );
}

/**
 * Runs a scenario with an overall limit; exit status 0 only when it passed.
 * `start` launches the browser (Chromium unless told otherwise).
 */
export async function main(limitMs, scenario, start = launch) {
  const timer = setTimeout(() => {
    console.error(`scenario did not finish within ${limitMs} ms`);
    process.exit(2);
  }, limitMs);
  let browser;
  try {
    browser = await start();
    await scenario(browser);
    console.log('PASS');
    clearTimeout(timer);
    await browser.close();
    process.exit(0);
  } catch (e) {
    console.error('FAIL', e);
    process.exit(1);
  }
}

export { assert };
