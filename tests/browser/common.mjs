// What the browser flows share: Debian's chromium and its flags, a failed expectation, numbered
// steps on stdout, and numbered full-page screenshots.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = '/usr/bin/chromium';
export const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** An expectation of the flow that did not hold: reported as `FAILED: <what>`. */
export class Failed extends Error {}

export function expect(cond, what) {
  if (!cond) throw new Failed(what);
}

/** A step printer: `[<name> 1.2s] 03 <text>`. */
export function stepper(name) {
  const started = Date.now();
  let n = 0;
  return (text) => {
    n += 1;
    const secs = ((Date.now() - started) / 1000).toFixed(1);
    console.log(`[${name} ${secs}s] ${String(n).padStart(2, '0')} ${text}`);
  };
}

/**
 * Screenshots into `dir`, numbered in the order taken: `shoot(page, name)` takes the whole page,
 * `shoot(locator, name, { element: true })` one element.
 */
export function screenshots(dir, step) {
  mkdirSync(dir, { recursive: true });
  let n = 0;
  return async (target, name, { element = false } = {}) => {
    n += 1;
    const file = join(dir, `${String(n).padStart(2, '0')}-${name}.png`);
    await target.screenshot(element ? { path: file } : { path: file, fullPage: true });
    step(`screenshot ${file}`);
  };
}

/** Debian's chromium on a fresh temporary profile of its own, removed when it closes. */
export function launch() {
  return chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
}

/** Runs `main`, and exits 1 with the reason when it fails. */
export function run(main) {
  main().catch((e) => {
    console.error(e instanceof Failed ? `FAILED: ${e.message}` : e);
    process.exit(1);
  });
}
