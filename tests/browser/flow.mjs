// The dashboard in a real browser (SPEC §9), driven by tests/tests/browser.rs: headless Debian
// chromium through playwright-core (never a downloaded browser). Logs in (a wrong password first),
// filters the messages, opens a parked one, refuses an edit that is not JSON, resubmits a fixed one,
// waits for it to be resolved, visits every page, and checks that a payload with a <script> is
// shown as text. A full-page screenshot of every page goes to `screenshots`.
//
// Usage: node tests/browser/flow.mjs '<json>' with
//   {"base_url": "http://127.0.0.1:PORT", "user": "alice", "password": "…",
//    "message_id": "<the parked message to fix>", "service": "app",
//    "fix": {<fields merged into its JSON payload>},
//    "xss_message_id": "<a parked message whose payload holds <script>alert(1)</script>>",
//    "screenshots": "<directory>", "timeout_ms": 30000}
// Prints one line per step; exits 1 with the reason on the first failed expectation.

import { join } from 'node:path';
import { Failed, expect, launch, run, screenshots, stepper } from './common.mjs';

const XSS = '<script>alert(1)</script>';
const step = stepper('browser');

function parseConfig() {
  const raw = process.argv[2];
  if (!raw) throw new Failed('usage: node flow.mjs \'<json config>\'');
  const c = JSON.parse(raw);
  for (const k of ['base_url', 'user', 'password', 'message_id', 'xss_message_id', 'screenshots', 'service']) {
    if (typeof c[k] !== 'string' || c[k] === '') throw new Failed(`config: "${k}" is missing`);
  }
  return { fix: {}, timeout_ms: 30000, ...c };
}

/** The path of message `id`'s page, as the dashboard links it. */
function messagePath(id) {
  return `/messages/${encodeURIComponent(id)}`;
}

async function main() {
  const cfg = parseConfig();
  const url = (path) => new URL(path, cfg.base_url).toString();
  const screenshot = screenshots(cfg.screenshots, step);

  const browser = await launch();
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    context.setDefaultTimeout(cfg.timeout_ms);
    page = await context.newPage();
    const dialogs = [];
    page.on('dialog', async (d) => {
      dialogs.push(`${d.type()}: ${d.message()}`);
      await d.dismiss().catch(() => {});
    });
    const pageErrors = [];
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    // The browser logs every answer >= 400 as a console error: the refused login (401) and edit
    // (422) are provoked; its own request for /favicon.ico (which the dashboard does not serve)
    // is only reported. Anything else fails the flow.
    const consoleErrors = [];
    let faviconNoted = false;
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      const at = m.location().url ? new URL(m.location().url).pathname : '';
      const status = /status of (\d+)/.exec(m.text())?.[1];
      if (at === '/login' && status === '401') return;
      if (at.endsWith('/resubmit') && status === '422') return;
      if (at === '/favicon.ico') {
        if (!faviconNoted) step(`note: the browser's GET /favicon.ico answered ${status}`);
        faviconNoted = true;
        return;
      }
      consoleErrors.push(`${m.text()} (${m.location().url})`);
    });

    const statusOf = async () => (await page.locator('h1 .status').innerText()).trim();
    const h1 = () => page.getByRole('heading', { level: 1 });

    // 1. Not logged in: the login page.
    let res = await page.goto(url('/'));
    expect(res && res.ok(), `GET / ended with ${res && res.status()}`);
    expect(new URL(page.url()).pathname === '/login', `/ did not lead to the login page but to ${page.url()}`);
    await h1().filter({ hasText: 'Log in' }).waitFor();
    step(`/ redirected to ${new URL(page.url()).pathname}${new URL(page.url()).search}`);
    await screenshot(page, 'login');

    // 2. A wrong password: refused with an error, still on the login page.
    await page.getByLabel('Name').fill(cfg.user);
    await page.getByLabel('Password').fill(`${cfg.password}-wrong`);
    const [wrong] = await Promise.all([
      page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === '/login'),
      page.getByRole('button', { name: 'Log in' }).click(),
    ]);
    await page.waitForLoadState();
    expect(wrong.status() === 401, `a wrong password answered ${wrong.status()}, not 401`);
    const loginAlert = page.getByRole('alert');
    await loginAlert.waitFor();
    const loginError = (await loginAlert.innerText()).trim();
    expect(/wrong name or password/i.test(loginError), `the login error says "${loginError}"`);
    expect(
      (await page.getByLabel('Name').inputValue()) === cfg.user,
      'the name typed was not kept after a failed login',
    );
    step(`wrong password refused (401): "${loginError}"`);
    await screenshot(page, 'login-error');

    // 3. The right password: the overview.
    await page.getByLabel('Password').fill(cfg.password);
    await page.getByRole('button', { name: 'Log in' }).click();
    await h1().filter({ hasText: 'Overview' }).waitFor();
    expect(new URL(page.url()).pathname === '/', `after logging in the page is ${page.url()}`);
    const who = (await page.locator('header .who').innerText()).trim();
    expect(who.includes(cfg.user), `the header does not name ${cfg.user}: "${who}"`);
    const parkedCard = (await page.locator('.card').first().innerText()).replace(/\s+/g, ' ').trim();
    expect(/^\d+ parked$/.test(parkedCard) && !parkedCard.startsWith('0 '), `the overview says "${parkedCard}"`);
    step(`logged in as "${who.split('\n')[0]}"; overview: ${parkedCard}`);
    await screenshot(page, 'overview');

    // 4. Messages, filtered with the form: parked messages of the service.
    await page.getByRole('navigation').getByRole('link', { name: 'Messages' }).click();
    await h1().filter({ hasText: 'Messages' }).waitFor();
    const filters = page.getByRole('search');
    await filters.getByLabel('Service').fill(cfg.service);
    await filters.getByLabel('Status').selectOption('parked');
    await filters.getByRole('button', { name: 'Filter' }).click();
    await page.waitForURL((u) => u.pathname === '/messages' && u.searchParams.get('status') === 'parked');
    const q = new URL(page.url()).searchParams;
    expect(q.get('service') === cfg.service, `the filter URL has service=${q.get('service')}`);
    expect(
      (await filters.getByLabel('Status').inputValue()) === 'parked',
      'the status select does not keep "parked" after filtering',
    );
    const rows = page.locator('table.messages tbody tr');
    const n = await rows.count();
    expect(n >= 2, `the filtered list has ${n} rows, expected at least the 2 parked messages`);
    for (let i = 0; i < n; i += 1) {
      const status = (await rows.nth(i).locator('.status').innerText()).trim();
      expect(status === 'parked', `row ${i} of the parked filter is ${status}`);
    }
    const link = page.getByRole('link', { name: cfg.message_id, exact: true });
    expect((await link.count()) === 1, `the filtered list does not link message ${cfg.message_id} once`);
    expect(
      (await page.getByRole('link', { name: cfg.xss_message_id, exact: true }).count()) === 1,
      `the filtered list does not link message ${cfg.xss_message_id}`,
    );
    step(`messages filtered by ${new URL(page.url()).search}: ${n} parked rows`);
    await screenshot(page, 'messages-filtered');

    // 5. The parked message.
    await link.click();
    await page.waitForURL((u) => u.pathname === messagePath(cfg.message_id));
    await h1().filter({ hasText: cfg.message_id }).waitFor();
    expect((await statusOf()) === 'parked', `message ${cfg.message_id} is ${await statusOf()}, not parked`);
    const textarea = page.getByLabel(/^Payload/);
    const original = await textarea.inputValue();
    let payload;
    try {
      payload = JSON.parse(original);
    } catch (e) {
      throw new Failed(`the edit form's payload is not JSON: ${e.message}\n${original}`);
    }
    const shown = await page.locator('pre.payload').innerText();
    expect(
      JSON.stringify(JSON.parse(shown)) === JSON.stringify(payload),
      `the payload shown differs from the one in the edit form:\n${shown}\n${original}`,
    );
    step(`message ${cfg.message_id} is parked; payload ${JSON.stringify(payload)}`);
    await screenshot(page, 'message-detail');

    // 6. An edit that is not JSON: refused (422) on the same page, nothing sent.
    const resubmitForm = page.locator('#resubmit');
    const broken = original.slice(0, original.lastIndexOf('}')).trimEnd() + ',\n';
    await textarea.fill(broken);
    await resubmitForm.getByLabel('Note').fill('first try');
    const isResubmit = (r) =>
      r.request().method() === 'POST' && new URL(r.url()).pathname === `${messagePath(cfg.message_id)}/resubmit`;
    const [refused] = await Promise.all([
      page.waitForResponse(isResubmit),
      resubmitForm.getByRole('button', { name: 'Resubmit' }).click(),
    ]);
    await page.waitForLoadState();
    expect(refused.status() === 422, `an edit that is not JSON answered ${refused.status()}, not 422`);
    const editAlert = resubmitForm.getByRole('alert');
    await editAlert.waitFor();
    const editError = (await editAlert.innerText()).trim();
    expect(/not valid JSON/i.test(editError), `the edit error says "${editError}"`);
    expect((await textarea.inputValue()) === broken, 'the refused text was not kept in the edit form');
    expect(
      (await resubmitForm.getByLabel('Note').inputValue()) === 'first try',
      'the note was not kept after a refused edit',
    );
    expect((await statusOf()) === 'parked', `after a refused edit the message is ${await statusOf()}`);
    step(`invalid JSON refused (422): "${editError}"`);
    await screenshot(page, 'edit-error');

    // Still parked when the page is loaded afresh.
    await page.goto(url(messagePath(cfg.message_id)));
    expect((await statusOf()) === 'parked', `after a refused edit the message page says ${await statusOf()}`);
    expect((await page.getByRole('alert').count()) === 0, 'the refused edit\'s error is still shown on a fresh load');
    step('reloaded: still parked');

    // 7. The fixed payload: resubmitted, back on the message's page.
    const fixed = { ...payload, ...cfg.fix };
    await textarea.fill(JSON.stringify(fixed, null, 2));
    await resubmitForm.getByLabel('Note').fill('fixed the account in the browser');
    const [accepted] = await Promise.all([
      page.waitForResponse(isResubmit),
      resubmitForm.getByRole('button', { name: 'Resubmit' }).click(),
    ]);
    expect(accepted.status() === 303, `the fixed edit answered ${accepted.status()}, not 303`);
    await page.waitForURL(
      (u) => u.pathname === messagePath(cfg.message_id) && u.searchParams.get('done') === 'resubmitted',
    );
    const flash = (await page.getByRole('status').innerText()).trim();
    expect(/^Resubmitted/.test(flash), `the flash after resubmitting says "${flash}"`);
    const after = await statusOf();
    expect(after === 'resubmitted' || after === 'resolved', `after resubmitting the message is ${after}`);
    expect((await page.locator('#resubmit').count()) === 0, 'the resubmit form is still offered after resubmitting');
    step(`resubmitted with ${JSON.stringify(cfg.fix)}: status ${after}; "${flash}"`);
    await screenshot(page, 'resubmitted');

    // 8. Resolved once the service took it: reload until it says so.
    const deadline = Date.now() + cfg.timeout_ms;
    let reloads = 0;
    for (;;) {
      const status = await statusOf();
      if (status === 'resolved') break;
      expect(status === 'resubmitted', `while waiting for resolved the message became ${status}`);
      expect(Date.now() < deadline, `message ${cfg.message_id} not resolved within ${cfg.timeout_ms} ms`);
      await page.waitForTimeout(200);
      await page.reload();
      reloads += 1;
    }
    const timeline = await page.locator('table').last().innerText();
    expect(/\bresolved\b/.test(timeline), `the timeline has no resolved event:\n${timeline}`);
    step(`resolved (after ${reloads} reloads)`);
    await screenshot(page, 'resolved');

    // 9. The other pages.
    const visit = async (name, heading, check) => {
      await page.getByRole('navigation').getByRole('link', { name }).click();
      await h1().filter({ hasText: heading }).waitFor();
      const current = page.getByRole('navigation').locator('[aria-current=page]');
      expect((await current.innerText()).trim() === name, `the navigation does not mark ${name} as current`);
      const text = await page.locator('main').innerText();
      await check(text);
      await screenshot(page, name.toLowerCase());
    };
    await visit('Groups', 'Failure groups', async () => {
      // Only the message with the script is still parked: one group of one.
      const groups = page.locator('main section.group');
      expect((await groups.count()) === 1, `the groups page lists ${await groups.count()} groups, not 1`);
      const heading = (await groups.first().getByRole('heading').innerText()).trim();
      expect(/^1 parked\b/.test(heading), `the group's heading says "${heading}"`);
      step(`groups: "${heading}"`);
    });
    await visit('Holds', 'Held keys', async () => {
      // The key of the message with the script is held by its parked head.
      const row = page.locator('main table tbody tr').filter({
        has: page.getByRole('link', { name: cfg.xss_message_id, exact: true }),
      });
      expect((await row.count()) === 1, `the holds page does not list the hold headed by ${cfg.xss_message_id}`);
      const held = await page.locator('main table tbody tr').count();
      step(`holds: ${held} held key(s), one headed by ${cfg.xss_message_id}`);
    });
    await visit('Rules', 'Repair rules', async () => {
      await page.getByRole('heading', { name: 'Dry-run' }).waitFor();
      step('rules: the dry-run form is shown');
    });
    await visit('Jobs', 'Bulk jobs', async (text) => {
      expect(/No bulk job has run/.test(text), `the jobs page lists jobs nobody started:\n${text}`);
      step('jobs: no bulk job');
    });
    await visit('Audit', 'Audit log', async (text) => {
      expect(text.includes('edit_and_resubmit'), `the audit log has no edit_and_resubmit:\n${text}`);
      expect(text.includes(cfg.message_id), `the audit log does not name ${cfg.message_id}`);
      expect(text.includes('fixed the account in the browser'), 'the audit log does not show the note');
      const details = page.locator('main details').first();
      await details.locator('summary').click();
      const diff = await details.innerText();
      for (const [k, v] of Object.entries(cfg.fix)) {
        expect(diff.includes(JSON.stringify(v)), `the audit's "after" does not show ${k} = ${JSON.stringify(v)}:\n${diff}`);
      }
      for (const [k, v] of Object.entries(payload)) {
        if (k in cfg.fix) {
          expect(diff.includes(JSON.stringify(v)), `the audit's "before" does not show ${k} = ${JSON.stringify(v)}:\n${diff}`);
        }
      }
      step(`audit: ${cfg.user} edit_and_resubmit of ${cfg.message_id} with the payload before and after`);
    });

    // 10. A payload with a script is text, never run.
    res = await page.goto(url(messagePath(cfg.xss_message_id)));
    const csp = res.headers()['content-security-policy'] ?? '';
    expect(/script-src|default-src/.test(csp), `the message page has no script policy: "${csp}"`);
    await h1().filter({ hasText: cfg.xss_message_id }).waitFor();
    const pre = page.locator('pre.payload');
    await pre.waitFor();
    const preText = await pre.innerText();
    expect(preText.includes(XSS), `the payload shown does not contain ${XSS} as text:\n${preText}`);
    expect(await pre.getByText(XSS).isVisible(), `${XSS} is not visible in the payload`);
    expect((await page.locator('script').count()) === 0, 'the message page has a <script> element');
    expect((await pre.locator('*').count()) === 0, 'the payload <pre> has child elements');
    // A dialog, if one were opened, comes as an event: give the page its load to finish first.
    await page.waitForLoadState('load');
    expect(dialogs.length === 0, `a dialog was opened: ${dialogs.join('; ')}`);
    step(`payload with ${XSS} shown as text, no dialog`);
    await screenshot(page, 'script-payload');

    expect(dialogs.length === 0, `a dialog was opened: ${dialogs.join('; ')}`);
    expect(pageErrors.length === 0, `errors in the pages: ${pageErrors.join('; ')}`);
    expect(consoleErrors.length === 0, `errors in the console: ${consoleErrors.join('; ')}`);
    step('done');
  } catch (e) {
    if (page) {
      const file = join(cfg.screenshots, 'failed.png');
      await page.screenshot({ path: file, fullPage: true }).catch(() => {});
      console.error(`[browser] the page at the failure (${page.url()}): ${file}`);
    }
    throw e;
  } finally {
    await browser.close();
  }
}

run(main);
