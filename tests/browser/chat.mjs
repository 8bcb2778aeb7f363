// End-to-end test of the browser chat client (logic/web) in headless Chromium: two users in
// two browser contexts register, chat 1:1 (✓✓ once read; a second device's badge clears when
// the first reads; each sees the other's presence dot go green, grey and green again) and in a
// private group (with "typing…" and the member list's online dots), one blocks the other (the owner copies an invite
// link, the other opens it and joins; the group's id alone lets no one in), one goes away and comes back to
// unread counts and missed messages, a message that looks like HTML stays text, a third
// page's failed logins make its form wait (429, Retry-After) and come back, and, with bob's
// browser subscribed to Web Push and none of his pages open, alice's message reaches his push
// service encrypted for his browser and his service worker shows it as a notification.
//
//   IM_BASE_URL=http://127.0.0.1:18080 IM_OUT_DIR=/tmp/shots IM_PUSH_PORT=18099 node tests/browser/chat.mjs
//
// IM_PUSH_PORT is where this script plays bob's push service (the server must take
// http://127.0.0.1:<port>/push/ endpoints: --web-push-endpoints). Headless Chromium cannot
// subscribe at a real push service, so bob's page gets a subscription to this one (its
// PushManager is replaced), with keys only this script holds: the script checks the VAPID
// claim, decrypts the body (RFC 8291, with Node's crypto: an implementation other than the
// server's), and hands the payload to the service worker as Chromium's push service would
// (DevTools' ServiceWorker.deliverPushMessage).
//
// IM_BASE_URL serves the page and the REST API; the page finds the WebSocket from the login
// answer. IM_OUT_DIR receives alice.png and bob.png, alice-invite.png and bob-invite.png (the
// invite link made, the invitation seen), and failure-*.png when a step fails.
// CHROMIUM (default /usr/bin/chromium) is the browser binary: playwright-core downloads none.
//
// Prints "browser e2e: ok" and exits 0, or names the failed step and exits 1.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import {
  createDecipheriv, createECDH, createPublicKey, hkdfSync, randomBytes, verify,
} from 'node:crypto';
import http from 'node:http';
import path from 'node:path';

const BASE_URL = process.env.IM_BASE_URL;
const OUT_DIR = process.env.IM_OUT_DIR;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const PUSH_PORT = Number(process.env.IM_PUSH_PORT);
if (!BASE_URL || !OUT_DIR || !PUSH_PORT) {
  console.error('browser e2e: IM_BASE_URL, IM_OUT_DIR and IM_PUSH_PORT must be set');
  process.exit(2);
}
mkdirSync(OUT_DIR, { recursive: true });

const STEP_TIMEOUT_MS = 15_000;
const RUN_TIMEOUT_MS = 130_000;   // the whole run; a hang must not outlive CI's patience
const PASSWORD = `pw-${randomBytes(8).toString('hex')}`;
const suffix = randomBytes(4).toString('hex');
const ALICE = `alice-${suffix}`;
const BOB = `bob-${suffix}`;
const XSS = '<img src=x onerror="window.__xss=1">';

// What the pages said: console messages and uncaught errors, printed on failure.
const logs = [];
const pageErrors = [];
const pages = { alice: null, bob: null };
let step = 'launch';

function watch(page, who) {
  page.on('console', (m) => logs.push(`[${who}] console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => {
    pageErrors.push(`[${who}] ${e.message}`);
    logs.push(`[${who}] pageerror: ${e.stack || e.message}`);
  });
  page.on('requestfailed', (r) => {
    logs.push(`[${who}] request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText || ''}`);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/// Polls `probe` until it returns true; anything else it returns describes what it saw, and
/// goes into the error when time is up.
async function until(what, probe, timeoutMs = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  let seen;
  for (;;) {
    try {
      seen = await probe();
      if (seen === true) return;
    } catch (e) {
      seen = `error: ${e.message.split('\n')[0]}`;
    }
    if (Date.now() > deadline) {
      throw new Error(`${step}: timed out after ${timeoutMs} ms waiting for ${what}; last seen: ${JSON.stringify(seen)}`);
    }
    await sleep(100);
  }
}

function check(ok, what) {
  if (!ok) throw new Error(`${step}: ${what}`);
}

// Reading the page through its data-testid hooks.

const byTestId = (page, id) => page.locator(`[data-testid="${id}"]`);

async function text(page, id) {
  return (await byTestId(page, id).textContent()) ?? '';
}

/// The messages of the open conversation, top to bottom.
function messagesOf(page) {
  return page.$$eval('[data-testid="messages"] [data-testid="message"]', (els) =>
    els.map((e) => ({
      id: e.dataset.id,
      seq: e.dataset.seq === undefined ? null : Number(e.dataset.seq),
      state: e.dataset.state,
      text: e.querySelector('[data-testid="message-content"]')?.textContent ?? null,
    })));
}

async function openConvId(page) {
  return (await byTestId(page, 'messages').getAttribute('data-conv')) || '';
}

/// The unread badge of a conversation in the list: a number, or null when it is not listed.
function unreadOf(page, conv) {
  return page.evaluate((c) => {
    const item = [...document.querySelectorAll('[data-testid="conv-item"]')].find((e) => e.dataset.conv === c);
    if (!item) return null;
    const badge = item.querySelector('[data-testid="unread"]');
    return !badge || badge.hidden ? 0 : Number(badge.textContent);
  }, conv);
}

function convItem(page, conv) {
  return page.locator(`[data-testid="conv-item"][data-conv="${conv}"]`);
}

/// The presence dot of a two-person conversation in the list: "true", "false", or null.
function presenceOf(page, conv) {
  return page.evaluate((c) => {
    const item = [...document.querySelectorAll('[data-testid="conv-item"]')].find((e) => e.dataset.conv === c);
    const dot = item && item.querySelector('[data-testid="presence-dot"]');
    return dot ? dot.dataset.online : null;
  }, conv);
}

// Bob's push service.

/// Bob's browser's subscription keys, which the server encrypts for; the private half stays here.
const bobPush = (() => {
  const ecdh = createECDH('prime256v1');
  ecdh.generateKeys();
  return { ecdh, auth: randomBytes(16), endpoint: `http://127.0.0.1:${PUSH_PORT}/push/bob` };
})();
const pushed = [];   // what the push service received: {path, headers, body}

function startPushService() {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      pushed.push({ path: req.url, headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(201).end();
    });
  });
  return new Promise((resolve) => server.listen(PUSH_PORT, '127.0.0.1', () => resolve(server)));
}

/// What a push service checks: `vapid t=<ES256 JWT>, k=<public key>`, the JWT signed by k for
/// this origin. Returns k.
function checkVapid(authorization, audience) {
  const m = /^vapid t=([^,]+), k=(.+)$/.exec(authorization || '');
  if (!m) throw new Error(`not a VAPID Authorization: ${authorization}`);
  const [h, c, sig] = m[1].split('.');
  const k = Buffer.from(m[2], 'base64url');
  const key = createPublicKey({
    format: 'jwk',
    key: { kty: 'EC', crv: 'P-256', x: k.subarray(1, 33).toString('base64url'), y: k.subarray(33).toString('base64url') },
  });
  const ok = verify('sha256', Buffer.from(`${h}.${c}`), { key, dsaEncoding: 'ieee-p1363' }, Buffer.from(sig, 'base64url'));
  if (!ok) throw new Error('the VAPID signature does not verify');
  const claims = JSON.parse(Buffer.from(c, 'base64url').toString());
  if (claims.aud !== audience) throw new Error(`VAPID aud ${claims.aud}, not ${audience}`);
  return m[2];
}

/// RFC 8291 as the browser does it: the header's salt and sender key, ECDH with the
/// subscription's key, HKDF, AES-128-GCM, then the padding delimiter.
function decryptPush(body) {
  const salt = body.subarray(0, 16);
  const idlen = body[20];
  const asPublic = body.subarray(21, 21 + idlen);
  const sealed = body.subarray(21 + idlen);
  const uaPublic = bobPush.ecdh.getPublicKey();
  const secret = bobPush.ecdh.computeSecret(asPublic);
  const keyInfo = Buffer.concat([Buffer.from('WebPush: info\0'), uaPublic, asPublic]);
  const ikm = Buffer.from(hkdfSync('sha256', secret, bobPush.auth, keyInfo, 32));
  const cek = Buffer.from(hkdfSync('sha256', ikm, salt, Buffer.from('Content-Encoding: aes128gcm\0'), 16));
  const nonce = Buffer.from(hkdfSync('sha256', ikm, salt, Buffer.from('Content-Encoding: nonce\0'), 12));
  const d = createDecipheriv('aes-128-gcm', cek, nonce);
  d.setAuthTag(sealed.subarray(sealed.length - 16));
  const plain = Buffer.concat([d.update(sealed.subarray(0, sealed.length - 16)), d.final()]);
  let end = plain.length - 1;
  while (end >= 0 && plain[end] === 0) end--;
  if (plain[end] !== 2) throw new Error('no last-record delimiter');
  return plain.subarray(0, end).toString();
}

/// In bob's pages: a PushManager whose subscription is to the script's push service, with the
/// script's keys (it survives reloads, as a real one does).
function fakePushManager({ endpoint, p256dh, auth }) {
  if (!('PushManager' in window)) return;
  const sub = () => ({
    endpoint,
    expirationTime: null,
    toJSON: () => ({ endpoint, expirationTime: null, keys: { p256dh, auth } }),
    unsubscribe: async () => { localStorage.removeItem('test.push'); return true; },
  });
  PushManager.prototype.subscribe = async function subscribe(options) {
    if (!options || !options.applicationServerKey) throw new Error('no applicationServerKey');
    localStorage.setItem('test.push', '1');
    return sub();
  };
  PushManager.prototype.getSubscription = async function getSubscription() {
    return localStorage.getItem('test.push') ? sub() : null;
  };
}

// Actions.

async function waitConnected(page, who) {
  await until(`${who}'s conn-state to be "connected"`, async () => {
    const t = await text(page, 'conn-state');
    return t === 'connected' || t;
  });
}

async function register(page, who, username) {
  await page.goto(BASE_URL, { waitUntil: 'domcontentloaded' });
  await byTestId(page, 'login-username').fill(username);
  await byTestId(page, 'login-password').fill(PASSWORD);
  await byTestId(page, 'register-submit').click();
  await until(`${who} to be logged in as ${username}`, async () => {
    const me = byTestId(page, 'me');
    if (await me.isVisible() && (await me.textContent()) === username) return true;
    return `me="${await me.textContent()}", error="${await text(page, 'error')}"`;
  });
  await waitConnected(page, who);
}

async function openConversation(page, who, conv) {
  await convItem(page, conv).click();
  await until(`${who} to open ${conv}`, async () => (await openConvId(page)) === conv || openConvId(page));
}

/// Sends `content` in the open conversation and waits for the server's `sent` (the pending
/// marker gone, a seq shown).
async function send(page, who, content) {
  await byTestId(page, 'compose-input').fill(content);
  await byTestId(page, 'compose-send').click();
  await until(`${who}'s "${content}" to be sent`, async () => {
    const all = await messagesOf(page);
    const mine = all.filter((m) => m.text === content);
    const ok = mine.length === 1 && mine[0].state === 'sent' && mine[0].seq > 0 && !all.some((m) => m.state !== 'sent');
    return ok || { matching: mine, error: await text(page, 'error') };
  });
}

async function waitMessage(page, who, content) {
  await until(`${who} to see "${content}"`, async () => {
    const all = await messagesOf(page);
    return all.some((m) => m.text === content && m.state === 'sent') || all.map((m) => m.text);
  });
}

async function newUserPage(context, who) {
  const page = await context.newPage();
  watch(page, who);
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  pages[who] = page;
  return page;
}

async function main() {
  const pushService = await startPushService();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
  try {
    await scenario(browser);
  } catch (e) {
    await failureReport(e);
    await browser.close().catch(() => {});
    process.exit(1);
  }
  await browser.close();
  pushService.close();
  console.log('browser e2e: ok');
  process.exit(0);
}

async function scenario(browser) {
  const viewport = { width: 1100, height: 720 };
  // Alice copies an invite link: her page may write the clipboard, and the test reads it.
  const aliceCtx = await browser.newContext({ viewport, permissions: ['clipboard-read', 'clipboard-write'] });
  const bobCtx = await browser.newContext({ viewport, permissions: ['notifications'] });
  await bobCtx.addInitScript(fakePushManager, {
    endpoint: bobPush.endpoint,
    p256dh: bobPush.ecdh.getPublicKey().toString('base64url'),
    auth: bobPush.auth.toString('base64url'),
  });
  const alice = await newUserPage(aliceCtx, 'alice');
  let bob = await newUserPage(bobCtx, 'bob');

  step = 'a. register and log in';
  await Promise.all([register(alice, 'alice', ALICE), register(bob, 'bob', BOB)]);

  step = 'b. 1:1 conversation';
  await byTestId(alice, 'open-user-input').fill(BOB);
  await byTestId(alice, 'open-user-submit').click();
  await until('alice to open the conversation with bob', async () => {
    const conv = await openConvId(alice);
    return conv.startsWith('p:') || `open: "${conv}", error: "${await text(alice, 'error')}"`;
  });
  const pair = await openConvId(alice);
  await until('alice\'s header to name bob', async () => (await text(alice, 'conv-title')) === BOB || text(alice, 'conv-title'));
  await send(alice, 'alice', 'hello bob');
  await until('bob\'s list to show the conversation with unread 1 (live)', async () =>
    (await unreadOf(bob, pair)) === 1 || { unread: await unreadOf(bob, pair) });
  await until('bob\'s list to name alice', async () => {
    const t = await convItem(bob, pair).locator('.conv-name').textContent();
    return t === ALICE || t;
  });
  await openConversation(bob, 'bob', pair);
  await waitMessage(bob, 'bob', 'hello bob');
  await until('bob\'s badge to clear once the conversation is open', async () =>
    (await unreadOf(bob, pair)) === 0 || { unread: await unreadOf(bob, pair) });
  await until('alice to see ✓✓ on "hello bob" once bob has read it', async () => {
    const mine = await alice.$$eval('[data-testid="message"].mine', (els) => els.map((e) => ({
      text: e.querySelector('[data-testid="message-content"]').textContent,
      read: e.dataset.read,
      status: e.querySelector('[data-testid="message-status"]').textContent,
    })));
    return mine.some((m) => m.text === 'hello bob' && m.read === 'yes' && m.status === '✓✓') || mine;
  });
  await send(bob, 'bob', 'hi alice');
  await waitMessage(alice, 'alice', 'hi alice');
  await until('alice to see bob online (a green dot, "online" in the header)', async () => {
    const dot = await presenceOf(alice, pair);
    const header = await text(alice, 'peer-presence');
    return (dot === 'true' && header === 'online') || { dot, header };
  });

  step = 'c. group';
  await byTestId(alice, 'group-create-name').fill(`team-${suffix}`);
  await byTestId(alice, 'group-create-submit').click();
  await until('alice to see the new group\'s id', async () => {
    const id = await text(alice, 'group-id');
    return /^[0-9]+$/.test(id) || `group-id: "${id}", error: "${await text(alice, 'error')}"`;
  });
  const groupId = await text(alice, 'group-id');
  const group = `g:${groupId}`;
  await until('alice to have the group open and listed', async () =>
    ((await openConvId(alice)) === group && (await convItem(alice, group).count()) === 1) || openConvId(alice));
  check((await text(alice, 'group-kind')) === 'Private', `a new group is "${await text(alice, 'group-kind')}"`);
  // An outsider cannot join a private group by its id: it does not exist for him.
  await byTestId(bob, 'group-join-id').fill(groupId);
  await byTestId(bob, 'group-join-submit').click();
  await until('bob to be told there is no such group', async () => {
    const t = await text(bob, 'error');
    return t.includes('no such group') || t;
  });
  await byTestId(bob, 'group-join-id').fill('');
  await byTestId(alice, 'invite-create').click();
  await until('alice to get an invite link', async () => {
    const v = await byTestId(alice, 'invite-link').inputValue();
    return /#invite=[0-9a-f]{32}$/.test(v) || `link: "${v}", error: "${await text(alice, 'error')}"`;
  });
  const link = await byTestId(alice, 'invite-link').inputValue();
  await byTestId(alice, 'invite-copy').click();
  await until('alice\'s copy to say so', async () => (await text(alice, 'invite-note')) === 'Copied' || text(alice, 'invite-note'));
  await alice.screenshot({ path: path.join(OUT_DIR, 'alice-invite.png') });
  const copied = await alice.evaluate(() => navigator.clipboard.readText());
  check(copied === link, `the clipboard holds "${copied}", not the link "${link}"`);
  // Bob opens the link in a new tab: the page says where it leads, and he joins.
  await bob.close();
  bob = await newUserPage(bobCtx, 'bob');
  await bob.goto(link, { waitUntil: 'domcontentloaded' });
  await waitConnected(bob, 'bob (invite link)');
  await until('bob to see the invitation', async () => {
    const banner = byTestId(bob, 'invite-banner');
    const t = await banner.textContent();
    return ((await banner.isVisible()) && t.includes(`team-${suffix}`) && t.includes('1 member')) || `banner: "${t}", error: "${await text(bob, 'error')}"`;
  });
  await bob.screenshot({ path: path.join(OUT_DIR, 'bob-invite.png') });
  await byTestId(bob, 'invite-accept').click();
  await until('bob to have joined by the link and opened the group', async () => {
    const open = await openConvId(bob);
    const shown = await text(bob, 'group-id');
    const listed = await convItem(bob, group).count();
    const banner = await byTestId(bob, 'invite-banner').isVisible();
    return (open === group && shown === groupId && listed === 1 && !banner) || { open, shown, listed, banner, error: await text(bob, 'error') };
  });
  check(!(await bob.evaluate(() => location.hash)), 'the invite stays in bob\'s address bar');
  check(!(await byTestId(bob, 'invite-create').isVisible()), 'bob, not the owner, is offered to make invites');
  // Alice types: bob sees it, and it ends when her message arrives.
  await byTestId(alice, 'compose-input').fill('hello gr');
  await until('bob to see that alice is typing', async () => {
    const t = await text(bob, 'typing');
    return t === `${ALICE} is typing…` || t;
  });
  await send(alice, 'alice', 'hello group');
  await waitMessage(bob, 'bob', 'hello group');
  await until('bob\'s "typing…" to end with her message', async () =>
    !(await byTestId(bob, 'typing').isVisible()) || text(bob, 'typing'));
  // The group's members, with who is online.
  await byTestId(alice, 'members-toggle').click();
  await until('alice to see both members online in the member list', async () => {
    const items = await alice.$$eval('[data-testid="member-item"]', (els) =>
      els.map((e) => ({ name: e.textContent, online: e.dataset.online })));
    const ok = items.length === 2 && items.every((m) => m.online === 'true')
      && items.some((m) => m.name === BOB);
    return ok || items;
  });

  step = 'd. offline and back';
  await bob.close();
  pages.bob = null;
  await openConversation(alice, 'alice', pair);
  await until('alice to see bob go offline (after the 2 s debounce)', async () => {
    const dot = await presenceOf(alice, pair);
    const header = await text(alice, 'peer-presence');
    return (dot === 'false' && header === 'offline') || { dot, header };
  });
  await send(alice, 'alice', 'while you were away 1');
  await send(alice, 'alice', 'while you were away 2');
  await openConversation(alice, 'alice', group);
  await send(alice, 'alice', 'group while you were away');
  bob = await newUserPage(bobCtx, 'bob');
  await bob.goto(BASE_URL, { waitUntil: 'domcontentloaded' });
  await waitConnected(bob, 'bob (new page)');
  await until('alice to see bob back online (pushed)', async () =>
    (await presenceOf(alice, pair)) === 'true' || presenceOf(alice, pair));
  check((await text(bob, 'me')) === BOB, `the new page shows "${await text(bob, 'me')}" logged in, not ${BOB}`);
  await until('bob\'s 1:1 conversation to show unread 2', async () =>
    (await unreadOf(bob, pair)) === 2 || { unread: await unreadOf(bob, pair) });
  await until('bob\'s group conversation to show unread 1', async () =>
    (await unreadOf(bob, group)) === 1 || { unread: await unreadOf(bob, group) });
  // A second device of bob's: reading on the first clears its badge too, live.
  const bob2 = await newUserPage(bobCtx, 'bob2');
  await bob2.goto(BASE_URL, { waitUntil: 'domcontentloaded' });
  await waitConnected(bob2, 'bob2');
  await until('bob\'s second device to show unread 2', async () =>
    (await unreadOf(bob2, pair)) === 2 || { unread: await unreadOf(bob2, pair) });
  await until('bob\'s first device to say he is online on 2 devices', async () =>
    (await text(bob, 'devices')) === '· online on 2 devices' || text(bob, 'devices'));
  await openConversation(bob, 'bob', pair);
  await until('bob\'s second device to clear its badge (a read event)', async () =>
    (await unreadOf(bob2, pair)) === 0 || { unread: await unreadOf(bob2, pair) });
  await bob2.close();
  pages.bob2 = null;
  await until('bob to see the missed messages after the earlier ones, in order', async () => {
    const texts = (await messagesOf(bob)).map((m) => m.text);
    const want = ['hello bob', 'hi alice', 'while you were away 1', 'while you were away 2'];
    return JSON.stringify(texts) === JSON.stringify(want) || texts;
  });
  const seqs = (await messagesOf(bob)).map((m) => m.seq);
  check(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `messages are not in seq order: ${seqs}`);
  await until('bob\'s badge to clear', async () => (await unreadOf(bob, pair)) === 0 || { unread: await unreadOf(bob, pair) });

  step = 'e. HTML in a message stays text';
  await openConversation(alice, 'alice', pair);
  await send(alice, 'alice', XSS);
  await waitMessage(bob, 'bob', XSS);
  for (const [who, page] of [['alice', alice], ['bob', bob]]) {
    const images = await page.locator('[data-testid="messages"] img').count();
    check(images === 0, `${who}'s message pane holds ${images} img element(s)`);
    const flag = await page.evaluate(() => typeof window.__xss);
    check(flag === 'undefined', `window.__xss is set on ${who}'s page: the message ran as HTML`);
  }

  step = 'f. failed logins make the form wait, counting down';
  const mallory = await newUserPage(await browser.newContext({ viewport }), 'mallory');
  await mallory.goto(BASE_URL, { waitUntil: 'domcontentloaded' });
  const submit = byTestId(mallory, 'login-submit');
  for (let i = 1; i <= 6; i++) {
    await until(`the login button to be enabled for attempt ${i}`, async () => (await submit.isEnabled()) || 'disabled');
    await byTestId(mallory, 'login-username').fill(ALICE);
    await byTestId(mallory, 'login-password').fill(`wrong-${i}-${PASSWORD}`);
    await submit.click();
    const want = i <= 5 ? 'invalid username or password' : 'try again in';
    await until(`attempt ${i} to show "${want}"`, async () => {
      const t = await text(mallory, 'error');
      return (t.includes(want) && (i <= 5 || !(await submit.isEnabled()))) || t;
    });
    // The next attempt must not read this attempt's message as its own.
    await mallory.evaluate(() => { document.getElementById('error').textContent = ''; });
  }
  await until('the login button to come back after the wait', async () => (await submit.isEnabled()) || 'disabled', 5_000);

  step = 'g. blocking';
  await openConversation(bob, 'bob', pair);
  await byTestId(bob, 'block-toggle').click();
  await until('bob\'s button to offer unblocking', async () => (await text(bob, 'block-toggle')) === 'Unblock' || text(bob, 'block-toggle'));
  await openConversation(alice, 'alice', pair);
  await byTestId(alice, 'compose-input').fill('are you there?');
  await byTestId(alice, 'compose-send').click();
  await until('alice to be told bob does not accept her messages', async () => {
    const t = await text(alice, 'error');
    return t.includes('does not accept your messages') || t;
  });
  await until('alice to see bob as offline while he blocks her', async () =>
    (await text(alice, 'peer-presence')) === 'offline' || text(alice, 'peer-presence'));
  await byTestId(bob, 'block-toggle').click();
  await until('bob\'s button to offer blocking again', async () => (await text(bob, 'block-toggle')) === 'Block' || text(bob, 'block-toggle'));
  await until('alice to see bob online again once he unblocks her', async () =>
    (await text(alice, 'peer-presence')) === 'online' || text(alice, 'peer-presence'));

  step = 'h. screenshots';
  await alice.screenshot({ path: path.join(OUT_DIR, 'alice.png') });
  await bob.screenshot({ path: path.join(OUT_DIR, 'bob.png') });

  step = 'i. notifications (Web Push) while bob has no page open';
  await until('bob\'s page to offer notifications', async () => (await byTestId(bob, 'push-toggle').isVisible()) || 'hidden');
  await byTestId(bob, 'push-toggle').click();
  await until('bob\'s notifications to be on', async () =>
    (await text(bob, 'push-toggle')) === 'Notifications: on' || `${await text(bob, 'push-toggle')} / ${await text(bob, 'error')}`);
  await bob.close();
  pages.bob = null;
  await until('alice to see bob offline', async () =>
    (await text(alice, 'peer-presence')) === 'offline' || text(alice, 'peer-presence'));
  // (Not `send`: the message refused while bob blocked her stays failed in her list.)
  await byTestId(alice, 'compose-input').fill('are you asleep?');
  await byTestId(alice, 'compose-send').click();
  await until('alice\'s "are you asleep?" to be sent', async () => {
    const mine = (await messagesOf(alice)).filter((m) => m.text === 'are you asleep?');
    return (mine.length === 1 && mine[0].state === 'sent') || mine;
  });
  await until('bob\'s push service to get a push', async () => pushed.length > 0 || 'nothing yet');
  const push = pushed[0];
  check(push.path === '/push/bob', `pushed to ${push.path}`);
  check(push.headers['content-encoding'] === 'aes128gcm', `Content-Encoding ${push.headers['content-encoding']}`);
  const k = checkVapid(push.headers.authorization, `http://127.0.0.1:${PUSH_PORT}`);
  const payload = decryptPush(push.body);
  const p = JSON.parse(payload);
  check(p.type === 'message' && p.preview === 'are you asleep?' && p.from_name === ALICE && p.conv === pair,
    `the payload: ${payload}`);
  // The service worker, with no page of the client open: a page of the origin that is not the
  // client (it opens no socket) drives DevTools.
  const probe = await newUserPage(bobCtx, 'bob-probe');
  await probe.goto(`${BASE_URL}/healthz`);
  const key = await probe.evaluate(async () => {
    const r = await fetch('/api/v1/push/vapid', { headers: { Authorization: `Bearer ${JSON.parse(localStorage.getItem('im.session')).token}` } });
    return (await r.json()).public_key;
  });
  check(k === key, 'the push is signed with the key browsers subscribe with');
  const cdp = await bobCtx.newCDPSession(probe);
  const registrations = [];
  cdp.on('ServiceWorker.workerRegistrationUpdated', (e) => registrations.push(...e.registrations));
  await cdp.send('ServiceWorker.enable');
  await until('bob\'s service worker registration', async () =>
    registrations.some((r) => r.scopeURL === `${BASE_URL}/` && !r.isDeleted) || registrations);
  const reg = registrations.find((r) => r.scopeURL === `${BASE_URL}/` && !r.isDeleted);
  await cdp.send('ServiceWorker.deliverPushMessage', { origin: BASE_URL, registrationId: reg.registrationId, data: payload });
  await until('bob\'s service worker to show alice\'s message as a notification', async () => {
    const shown = await probe.evaluate(async () => {
      const r = await navigator.serviceWorker.getRegistration();
      return (await r.getNotifications()).map((n) => ({ title: n.title, body: n.body, tag: n.tag }));
    });
    return shown.some((n) => n.title === ALICE && n.body === 'are you asleep?' && n.tag === pair) || shown;
  });
  check(pushed.length === 1, `${pushed.length} pushes for one message`);
  check(pageErrors.length === 0, `uncaught errors in the pages:\n  ${pageErrors.join('\n  ')}`);
}

async function failureReport(e) {
  console.error(`browser e2e: FAILED in step ${step}`);
  console.error(e && e.stack ? e.stack : String(e));
  for (const [who, page] of Object.entries(pages)) {
    if (!page || page.isClosed()) continue;
    const file = path.join(OUT_DIR, `failure-${who}.png`);
    try {
      await page.screenshot({ path: file, timeout: 5_000 });
      console.error(`  screenshot: ${file}`);
    } catch (err) {
      console.error(`  no screenshot of ${who}: ${err.message.split('\n')[0]}`);
    }
  }
  console.error(logs.length ? `console and page errors (${logs.length}):` : 'no console output from the pages');
  for (const line of logs) console.error(`  ${line}`);
}

const watchdog = setTimeout(async () => {
  await failureReport(new Error(`${step}: the whole run took longer than ${RUN_TIMEOUT_MS} ms`));
  process.exit(1);
}, RUN_TIMEOUT_MS);
watchdog.unref();

main().catch(async (e) => {
  await failureReport(e);
  process.exit(1);
});
