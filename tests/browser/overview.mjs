// The overview in a real browser (SPEC §9), driven by tests/tests/browser.rs: headless Debian
// chromium through playwright-core. Checks that every service's SVG chart is there, labelled (its
// accessible name and description), and shows the numbers `GET /api/overview` gives (each point,
// each series' total, the table of the numbers); the largest failure groups with their trend; the
// oldest hold. Then that the page refreshes itself: with JavaScript in place (a discard made in a
// second tab shows up, the page is not reloaded, an opened table stays open), and without
// JavaScript by a plain reload. Last, the tour of a rule from a fix: the draft on the fixed
// message's page, and the draft tried on the whole parked backlog from the rules page.
//
// Usage: node tests/browser/overview.mjs '<json>' with
//   {"base_url": "http://127.0.0.1:PORT", "user": "alice", "password": "…", "token": "<API token>",
//    "discard_id": "<a parked message to discard>", "draft_id": "<a message fixed by hand>",
//    "draft_contains": "<text its draft must hold (optional)>",
//    "service": "app", "screenshots": "<directory>", "timeout_ms": 20000}
// Prints one line per step; exits 1 with the reason on the first failed expectation.

import { Failed, expect, launch, run, screenshots, stepper } from './common.mjs';

const SERIES = ['parked', 'repaired', 'resolved', 'held'];
// The overview is asked to refresh itself this often (seconds).
const REFRESH = 2;
const step = stepper('overview');

function parseConfig() {
  const raw = process.argv[2];
  if (!raw) throw new Failed('usage: node overview.mjs \'<json config>\'');
  const c = JSON.parse(raw);
  for (const k of ['base_url', 'user', 'password', 'token', 'discard_id', 'draft_id', 'service', 'screenshots']) {
    if (typeof c[k] !== 'string' || c[k] === '') throw new Failed(`config: "${k}" is missing`);
  }
  return { timeout_ms: 20000, ...c };
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

async function main() {
  const cfg = parseConfig();
  const url = (path) => new URL(path, cfg.base_url).toString();
  const api = async (path) => {
    const res = await fetch(url(path), { headers: { Authorization: `Bearer ${cfg.token}` } });
    expect(res.ok, `GET ${path} answered ${res.status}`);
    return res.json();
  };
  const screenshot = screenshots(cfg.screenshots, step);
  const login = async (page) => {
    await page.goto(url('/login'));
    await page.getByLabel('Name').fill(cfg.user);
    await page.getByLabel('Password').fill(cfg.password);
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/'),
      page.getByRole('button', { name: 'Log in' }).click(),
    ]);
  };

  const browser = await launch();
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    context.setDefaultTimeout(cfg.timeout_ms);
    page = await context.newPage();
    const pageErrors = [];
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    const consoleErrors = [];
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      if (m.location().url && new URL(m.location().url).pathname === '/favicon.ico') return;
      consoleErrors.push(`${m.text()} (${m.location().url})`);
    });

    // 1. The overview, asked to refresh every REFRESH seconds.
    await login(page);
    await page.goto(url(`/?refresh=${REFRESH}`));
    const o = await api('/api/overview');
    expect(o.hourly && Array.isArray(o.hourly.services), 'the API gives no hourly series');
    expect(o.hourly.services.length >= 2, `the API has ${o.hourly.services.length} services with hours`);
    step(`API: ${o.hourly.services.map((s) => s.service).join(', ')} with hours; ${o.top_groups.length} top groups`);

    // 2. Each service's chart: labelled, each point and total as the API says, the table too.
    const charts = page.locator('svg.hours');
    expect(
      (await charts.count()) === o.hourly.services.length,
      `${await charts.count()} charts for ${o.hourly.services.length} services`,
    );
    for (const s of o.hourly.services) {
      const title = `${s.service}: parked, repaired, resolved and held per hour, last 24 hours`;
      const img = page.getByRole('img', { name: title });
      expect((await img.count()) === 1, `no chart labelled "${title}"`);
      const svg = page.locator(`svg.hours[data-service="${s.service}"]`);
      const drawn = await svg.evaluate((el) => {
        const out = {};
        for (const g of el.querySelectorAll('g.line')) {
          const dots = [...g.querySelectorAll('circle')];
          out[g.dataset.series] = {
            total: Number(g.dataset.total),
            hours: dots.map((c) => Number(c.dataset.hour)),
            counts: dots.map((c) => Number(c.dataset.count)),
            titled: dots.every((c) => (c.querySelector('title')?.textContent ?? '').includes(g.dataset.series)),
            points: (g.querySelector('polyline')?.getAttribute('points') ?? '').trim().split(/\s+/).length,
          };
        }
        return { lines: out, desc: el.querySelector('desc')?.textContent ?? '' };
      });
      for (const kind of SERIES) {
        const line = drawn.lines[kind];
        expect(line, `${s.service}: no ${kind} line`);
        expect(same(line.hours, [...Array(24).keys()]), `${s.service} ${kind}: hours ${line.hours}`);
        expect(same(line.counts, s[kind]), `${s.service} ${kind}: drawn ${line.counts}, API ${s[kind]}`);
        const total = s[kind].reduce((a, b) => a + b, 0);
        expect(line.total === total, `${s.service} ${kind}: total ${line.total}, API ${total}`);
        expect(line.titled, `${s.service} ${kind}: a point without its tooltip`);
        expect(line.points === 24, `${s.service} ${kind}: ${line.points} points in the line`);
        expect(drawn.desc.includes(`${total} ${kind}`), `${s.service}: the description "${drawn.desc}" lacks ${total} ${kind}`);
      }
      // The text alternative: the numbers hour by hour, newest first.
      const rows = await page.locator(`table.hours-table[data-service="${s.service}"] tbody tr`).evaluateAll((trs) =>
        trs.map((tr) => [...tr.querySelectorAll('td')].slice(1).map((td) => Number(td.textContent))));
      expect(rows.length === 24, `${s.service}: ${rows.length} rows in the table`);
      for (const [i, kind] of SERIES.entries()) {
        const column = rows.map((r) => r[i]).reverse();
        expect(same(column, s[kind]), `${s.service} ${kind}: the table says ${column}, the API ${s[kind]}`);
      }
      step(`${s.service}: chart and table match the API (${SERIES.map((k) => `${k} ${s[k].reduce((a, b) => a + b, 0)}`).join(', ')})`);
    }

    // 3. The largest failure groups, with their trend; the oldest hold.
    const groups = await page.locator('table.top-groups tbody tr').evaluateAll((trs) =>
      trs.map((tr) => ({
        id: tr.dataset.group,
        parked: Number(tr.querySelector('td.num').textContent),
        trend: tr.querySelector('td.trend').textContent.trim(),
        spark: tr.querySelector('svg.spark')?.getAttribute('aria-label') ?? '',
        role: tr.querySelector('svg.spark')?.getAttribute('role') ?? '',
      })));
    expect(groups.length === o.top_groups.length && groups.length > 0, `${groups.length} groups shown, API ${o.top_groups.length}`);
    for (const [i, g] of o.top_groups.entries()) {
      const shown = groups[i];
      expect(shown.id === g.id && shown.parked === g.parked, `group ${i}: shown ${JSON.stringify(shown)}, API ${JSON.stringify(g)}`);
      expect(shown.trend.endsWith(g.trend), `group ${g.id}: trend "${shown.trend}", API ${g.trend}`);
      const total = g.parkings_per_hour.reduce((a, b) => a + b, 0);
      expect(shown.role === 'img' && shown.spark.startsWith(`${total} parkings`), `group ${g.id}: sparkline "${shown.spark}"`);
    }
    step(`${groups.length} groups as the API has them: ${groups.map((g) => `${g.parked} ${g.trend}`).join('; ')}`);
    const hold = (await page.locator('#oldest-hold').innerText()).trim();
    expect(o.oldest_hold, 'the API shows no oldest hold');
    expect(hold.includes(o.oldest_hold.key) && hold.includes(o.oldest_hold.service), `the oldest hold card says "${hold}"`);
    step(`oldest hold: ${hold.replace(/\s+/g, ' ')}`);
    await screenshot(page, 'overview-charts');

    // 4. Live: a discard made in a second tab shows up here without a reload.
    const discardedBefore = Number(await page.locator(`table.counts tr[data-service="${cfg.service}"] td.discarded`).innerText());
    await page.evaluate(() => {
      window.mendStayed = 'this very page';
      window.mendRefreshed = 0;
      document.addEventListener('mend:refreshed', () => { window.mendRefreshed += 1; });
    });
    await page.locator('details#chart-0-numbers > summary').click();
    const other = await context.newPage();
    await other.goto(url(`/messages/${encodeURIComponent(cfg.discard_id)}`));
    await other.locator('#discard').getByLabel('Note').fill('seen from the overview test');
    await Promise.all([
      other.waitForURL((u) => u.searchParams.get('done') !== null),
      other.locator('#discard').getByRole('button', { name: 'Discard' }).click(),
    ]);
    step(`discarded ${cfg.discard_id} in a second tab`);
    await page.waitForFunction(
      ([svc, n]) => Number(document.querySelector(`table.counts tr[data-service="${svc}"] td.discarded`)?.textContent) === n,
      [cfg.service, discardedBefore + 1],
      { timeout: REFRESH * 5000 },
    );
    const state = await page.evaluate(() => ({
      stayed: window.mendStayed,
      refreshed: window.mendRefreshed,
      open: document.querySelector('details#chart-0-numbers').open,
    }));
    expect(state.stayed === 'this very page', 'the page was reloaded, not refreshed in place');
    expect(state.refreshed >= 1, 'no refresh in place was seen');
    expect(state.open, 'the table opened before the refresh was closed by it');
    step(`the discard shows up in place (discarded ${discardedBefore} → ${discardedBefore + 1}, ${state.refreshed} refreshes, the opened table still open)`);
    await other.close();

    // 5. Without JavaScript: the same charts, and the page reloads itself.
    const plain = await browser.newContext({ viewport: { width: 1280, height: 900 }, javaScriptEnabled: false });
    plain.setDefaultTimeout(cfg.timeout_ms);
    const bare = await plain.newPage();
    await login(bare);
    let loads = 0;
    bare.on('load', () => { loads += 1; });
    await bare.goto(url(`/?refresh=${REFRESH}`));
    expect((await bare.locator('svg.hours').count()) === o.hourly.services.length, 'without JavaScript the charts are missing');
    const deadline = Date.now() + REFRESH * 5000;
    while (loads < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(loads >= 2, `without JavaScript the page loaded ${loads} time(s) in ${REFRESH * 5} s: no reload`);
    step(`without JavaScript the page reloads itself (${loads} loads)`);
    await plain.close();

    // 6. The tour: the fixed message's rule draft, then the draft tried on the parked backlog.
    await page.goto(url(`/messages/${encodeURIComponent(cfg.draft_id)}`));
    const draft = (await page.locator('#rule-draft pre').innerText()).trim();
    expect(draft.includes('[[rule]]') && draft.includes('[[rule.test]]'), `the draft is "${draft}"`);
    if (cfg.draft_contains) expect(draft.includes(cfg.draft_contains), `the draft lacks ${cfg.draft_contains}: "${draft}"`);
    await screenshot(page, 'fixed-message');
    await screenshot(page.locator('#rule-draft'), 'rule-draft', { element: true });
    await page.goto(url('/rules'));
    await page.getByLabel('the whole parked backlog').check();
    await page.getByLabel('of service').fill(cfg.service);
    await page.locator('textarea#rules').fill(draft);
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/rules/try'),
      page.getByRole('button', { name: 'Try', exact: true }).click(),
    ]);
    const summary = (await page.locator('#summary').innerText()).trim();
    expect(/would repair \d+ of \d+/.test(summary), `the backlog try says "${summary}"`);
    step(`the draft on the backlog: ${summary}`);
    await screenshot(page, 'backlog-try');

    expect(pageErrors.length === 0, `errors in the page: ${pageErrors.join('; ')}`);
    expect(consoleErrors.length === 0, `console errors: ${consoleErrors.join('; ')}`);
    step('done');
  } catch (e) {
    if (page) await screenshot(page, 'failed').catch(() => {});
    throw e;
  } finally {
    await browser.close();
  }
}

run(main);
