// The browser chat client of im: plain ES2020, no framework, no build step, nothing fetched
// from anywhere but this origin and the gateway's WebSocket.
//
// The file reads top to bottom:
//   1. settings and state — one object holds the session, the conversation list, the open
//      conversation and the sends still waiting for their `sent`;
//   2. session storage    — the session lives in localStorage, so a reload stays logged in;
//   3. REST               — fetch helpers; a 401 refreshes the token once, else back to login;
//   4. socket             — one WebSocket: heartbeat, reconnect with backoff, resend of
//                           unacknowledged sends with the same cid (the server drops duplicates);
//   5. conversations and messages — what REST answers and server frames do to the state;
//   6. render             — DOM built with createElement/textContent only: user content is
//                           never parsed as HTML;
//   7. wiring             — event handlers and start-up.
//
// Ids (users, groups, messages) are decimal strings: 64-bit values do not fit a JS number.
// Seqs are JSON numbers; they count messages of one conversation and stay far below 2^53.

'use strict';

// ---------------------------------------------------------------------------------------------
// 1. Settings and state

const API = '/api/v1';
const STORAGE_KEY = 'im.session';
const PAGE_SIZE = 30;                 // history page when opening or scrolling up
const SYNC_LIMIT = 500;               // the protocol's largest `sync` page
const SYNC_ROUNDS_MAX = 4;            // further behind than this: reload the newest page instead
const PING_INTERVAL_MS = 25_000;      // below the server's 90 s idle timeout, with margin
const SILENT_SOCKET_MS = 70_000;      // no frame at all (not even a pong) for this long: dead
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const STABLE_CONNECTION_MS = 10_000;  // a connection that lived this long resets the backoff
const TOKEN_REFRESH_MARGIN_MS = 30_000;
const SEND_RETRY_MS = 3_000;          // after a retryable (5xxx) error for a send
const SEND_ATTEMPTS_MAX = 5;
const CONTENT_BYTES_MAX = 32 * 1024;
const ERROR_VISIBLE_MS = 10_000;
const SESSION_EXPIRED = 'Your session has expired; please log in again.';
const LOOKUP_RETRY_MS = 30_000;       // a failed user/group name lookup is tried again after this
const TYPING_SEND_EVERY_MS = 3_000;   // while typing, a `typing` frame at most this often
const TYPING_SHOW_MS = 5_000;         // "typing…" lasts this long after the last frame
const PRESENCE_ASK_MAX = 50;          // peers whose presence is asked for after a connect
const MEMBERS_SHOWN_MAX = 100;        // a group's member list shows this many
const PUSH_SUPPORTED = 'serviceWorker' in navigator && 'PushManager' in window
  && 'Notification' in window;

const state = {
  session: null,          // {token, refresh_token, user_id, username, ws_url}
  convs: new Map(),       // conv id → {conv, kind, peer, group, maxSeq, readSeq, unread, last}
  open: null,             // the open conversation, see openConversation()
  pending: new Map(),     // cid → a send not yet acknowledged (Map keeps sending order)
  readSent: new Map(),    // conv id → highest read seq reported to the server
  typing: new Map(),      // conv id → Map(user id → when their "typing…" ends)
  blocked: new Set(),     // user ids this user blocks
  online: new Map(),      // user id → true/false: a peer's presence, as last heard
  pushes: new Map(),      // user id → presence frames heard about them (an older answer loses)
  contacts: new Set(),    // peers whose presence the server showed us (contacts: both wrote)
  devices: [],            // this user's devices online (their device ids), as last heard
  members: null,          // the open group's member list while shown: {group, items}
  push: { key: null, subscribed: false },  // Web Push: the server's VAPID key, and this browser's state
  typingSent: new Map(),  // conv id → when this device last sent `typing` for it
  users: new Map(),       // user id → profile {user_id, username, nickname, avatar}
  groups: new Map(),      // group id → {group_id, name, ...}
  lookups: new Map(),     // 'u:<id>' or 'g:<id>' → in-flight or finished lookup, so each runs once
  listRequests: 0,        // conversation-list answers can overtake each other: keep the newest
  listApplied: 0,
  socket: {
    ws: null,
    connecting: false,
    connected: false,
    generation: 0,        // bumped on every open: tells a REST answer that a reconnect happened
    attempts: 0,
    openedAt: 0,
    lastFrameAt: 0,
    retryAt: 0,
    retryTimer: null,
    countdownTimer: null,
    pingTimer: null,
    repick: false,        // ask REST which gateway to use before the next connect
  },
};

// Elements, looked up once (the page is static; only lists change).
const $ = (id) => document.getElementById(id);
const el = {};

// ---------------------------------------------------------------------------------------------
// 2. Session storage

function loadStoredSession() {
  try {
    const s = JSON.parse(localStorage.getItem(STORAGE_KEY) || 'null');
    return s && typeof s.token === 'string' && typeof s.user_id === 'string' ? s : null;
  } catch {
    return null;
  }
}

function saveSession(session) {
  state.session = session;
  if (session) localStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  else localStorage.removeItem(STORAGE_KEY);
}

/// The token's `exp` in ms, or null when it cannot be read (the server decides anyway).
function tokenExpiryMs(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function me() {
  return state.session ? state.session.user_id : null;
}

// ---------------------------------------------------------------------------------------------
// 3. REST

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;   // HTTP status; 0 when the request did not get an answer
    this.code = code;       // the server's numeric code (4xxx/5xxx), 0 if none
    this.retryAfter = 0;    // seconds from a Retry-After header (429, 503), 0 if none
  }
}

/// One HTTP request; JSON in and out. Throws ApiError with the server's message.
async function request(method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, 0, `the server cannot be reached (${e.message})`);
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const message = data && typeof data.message === 'string' ? data.message : `HTTP ${res.status}`;
    const err = new ApiError(res.status, (data && data.code) || 0, message);
    err.retryAfter = Number.parseInt(res.headers.get('Retry-After') || '0', 10) || 0;
    throw err;
  }
  return data;
}

/// An authenticated request. A 401 refreshes the token once and retries; when the refresh
/// token is refused too, the session ends and the login form shows.
async function api(method, path, body) {
  const session = state.session;
  if (!session) throw new ApiError(401, 4010, 'not logged in');
  try {
    return await request(method, path, body, session.token);
  } catch (e) {
    if (e.status !== 401) throw e;
    await refreshSession(session.token);
    return request(method, path, body, state.session.token);
  }
}

// Refresh tokens are single use: concurrent 401s must share one refresh, or all but the
// first would present a spent token and end the session.
let refreshing = null;

function refreshSession(staleToken) {
  if (!refreshing) {
    refreshing = doRefresh(staleToken).finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

async function doRefresh(staleToken) {
  const session = state.session;
  if (!session) throw new ApiError(401, 4010, 'not logged in');
  // Another tab of this browser may have refreshed already and stored the new pair.
  const stored = loadStoredSession();
  if (stored && stored.user_id === session.user_id && stored.token !== staleToken) {
    state.session = stored;
    return;
  }
  if (!session.refresh_token) {
    endSession(SESSION_EXPIRED);
    throw new ApiError(401, 4010, SESSION_EXPIRED);
  }
  try {
    const t = await request('POST', '/auth/refresh', { refresh_token: session.refresh_token });
    saveSession({
      ...session,
      token: t.token,
      refresh_token: t.refresh_token,
      user_id: t.user_id,
      ws_url: t.ws_url || session.ws_url,
    });
  } catch (e) {
    // Only a refused refresh token ends the session; a network error may pass.
    if (e.status === 401 || e.status === 400) {
      endSession(SESSION_EXPIRED);
      throw new ApiError(401, 4010, SESSION_EXPIRED);
    }
    throw e;
  }
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// 4. Socket

function wsUrl() {
  let base = state.session.ws_url;
  if (!base) {
    // Older servers might not say; the gateway's default port on this host.
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    base = `${scheme}://${location.hostname}:8090/ws`;
  }
  return `${base}${base.includes('?') ? '&' : '?'}token=${enc(state.session.token)}`;
}

async function connect() {
  const sock = state.socket;
  if (!state.session || sock.ws || sock.connecting) return;
  clearTimeout(sock.retryTimer);
  clearInterval(sock.countdownTimer);
  sock.connecting = true;
  renderConnState('connecting');
  // A browser cannot see why an upgrade failed (a 401 looks like any other failure), so an
  // access token about to expire is renewed first rather than found out by a refused upgrade.
  const exp = tokenExpiryMs(state.session.token);
  if (exp !== null && exp - Date.now() < TOKEN_REFRESH_MARGIN_MS) {
    try {
      await refreshSession(state.session.token);
    } catch {
      sock.connecting = false;
      if (state.session) scheduleReconnect();
      return;
    }
  }
  if (sock.repick && state.session) {
    // The gateway drains (1012) or is unreachable: login's choice again, from the live ones.
    sock.repick = false;
    try {
      const r = await api('GET', '/gateways/pick');
      if (state.session && r.ws_url) saveSession({ ...state.session, ws_url: r.ws_url });
    } catch {
      // keep the one we had
    }
  }
  sock.connecting = false;
  if (!state.session || sock.ws) return;

  const ws = new WebSocket(wsUrl());
  sock.ws = ws;
  ws.onopen = () => {
    if (sock.ws !== ws) return;
    sock.connected = true;
    sock.generation += 1;
    sock.openedAt = Date.now();
    sock.lastFrameAt = Date.now();
    renderConnState('connected');
    sock.pingTimer = setInterval(heartbeat, PING_INTERVAL_MS);
    afterConnect();
  };
  ws.onmessage = (ev) => {
    if (sock.ws !== ws) return;
    sock.lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      console.warn('im: a frame that is not JSON', ev.data);
      return;
    }
    onFrame(frame);
  };
  // `error` is always followed by `close`; everything happens there.
  ws.onclose = (ev) => {
    if (sock.ws !== ws) return;
    socketGone(ev.code);
  };
}

/// The socket is closed (or given up on): forget it and plan the next attempt.
function socketGone(code) {
  const sock = state.socket;
  const wasOpen = sock.connected;
  const lived = wasOpen ? Date.now() - sock.openedAt : 0;
  if (sock.ws) {
    sock.ws.onopen = sock.ws.onmessage = sock.ws.onclose = null;
    try {
      sock.ws.close();
    } catch {
      // already closed
    }
  }
  sock.ws = null;
  sock.connected = false;
  clearInterval(sock.pingTimer);
  if (!state.session) return;
  if (lived >= STABLE_CONNECTION_MS) sock.attempts = 0;
  // Refused before opening (maybe a revoked or expired token) or closed by policy (1008:
  // logged out elsewhere, or rate limited): ask REST, whose 401 handling refreshes the token
  // or ends the session.
  if (!wasOpen || code === 1008) {
    api('GET', '/users/profile').catch(() => {});
  }
  // 1012: this gateway drains (it spreads its closes over a window, so come back at once,
  // elsewhere). A gateway that refused us, or was unreachable, may be gone: ask again too.
  if (code === 1012 || !wasOpen) sock.repick = true;
  if (code === 1012) sock.attempts = 0;
  scheduleReconnect();
}

function scheduleReconnect() {
  const sock = state.socket;
  clearTimeout(sock.retryTimer);
  clearInterval(sock.countdownTimer);
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** sock.attempts);
  sock.attempts += 1;
  // Jitter spreads the reconnects of many clients after a gateway restart.
  const delay = Math.round(ceiling * (0.5 + Math.random() * 0.5));
  sock.retryAt = Date.now() + delay;
  sock.retryTimer = setTimeout(connect, delay);
  sock.countdownTimer = setInterval(() => renderConnState('reconnecting'), 1000);
  renderConnState('reconnecting');
}

function reconnectNow() {
  const sock = state.socket;
  if (!state.session || sock.ws || sock.connecting) return;
  clearTimeout(sock.retryTimer);
  clearInterval(sock.countdownTimer);
  connect();
}

function closeSocket() {
  const sock = state.socket;
  clearTimeout(sock.retryTimer);
  clearInterval(sock.countdownTimer);
  clearInterval(sock.pingTimer);
  if (sock.ws) {
    sock.ws.onopen = sock.ws.onmessage = sock.ws.onclose = null;
    sock.ws.close(1000, 'bye');
  }
  sock.ws = null;
  sock.connected = false;
  sock.attempts = 0;
}

function heartbeat() {
  const sock = state.socket;
  // A half-open TCP connection never reports its death; the missing pongs do.
  if (Date.now() - sock.lastFrameAt > SILENT_SOCKET_MS) {
    socketGone(1006);
    return;
  }
  sendFrame({ type: 'ping' });
}

/// Sends a frame if the socket is open; false otherwise (the caller keeps what must be retried).
function sendFrame(frame) {
  const ws = state.socket.ws;
  if (!state.socket.connected || !ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

/// After each (re)connect: catch up on what was missed while away, then resend.
function afterConnect() {
  // Presence frames only say what changed: what changed while away is asked for again.
  state.online = new Map();
  state.contacts = new Set();
  loadConversations().catch((e) => showError(`Conversations: ${e.message}`));
  const open = state.open;
  if (open && open.loaded) startSync(open);
  for (const p of state.pending.values()) {
    if (p.state === 'pending') transmit(p);
  }
  renderOpenPending();
}

function onFrame(f) {
  switch (f.type) {
    case 'msg':
      onMessage(f);
      break;
    case 'sent':
      onSent(f);
      break;
    case 'sync':
      onSync(f);
      break;
    case 'read':
      onReadEvent(f);
      break;
    case 'receipt':
      onReceipt(f);
      break;
    case 'typing':
      onTyping(f);
      break;
    case 'presence':
      onPresence(f);
      break;
    case 'error':
      onErrorFrame(f);
      break;
    case 'pong':
      break;
    default:
      console.warn('im: unknown frame type', f.type);
  }
}

// ---------------------------------------------------------------------------------------------
// 5. Conversations and messages

/// What a conversation id alone says: its kind, and the peer or the group.
function convInfo(conv) {
  if (conv.startsWith('g:')) return { kind: 'group', peer: null, group: conv.slice(2) };
  const [, a, b] = conv.split(':');
  return { kind: 'p2p', peer: a === me() ? b : a, group: null };
}

function ensureConv(conv) {
  let entry = state.convs.get(conv);
  if (!entry) {
    entry = { conv, ...convInfo(conv), maxSeq: 0, readSeq: 0, unread: 0, last: null, peerRead: 0 };
    state.convs.set(conv, entry);
    if (entry.kind === 'p2p' && entry.peer && state.session) askPresence(entry.peer);
  }
  return entry;
}

/// Records a message as the conversation's latest if it is; true when it was new.
function noteLatest(entry, m) {
  if (m.seq <= entry.maxSeq) return false;
  entry.maxSeq = m.seq;
  entry.last = m;
  return true;
}

async function loadConversations() {
  const n = ++state.listRequests;
  const list = await api('GET', '/conversations');
  if (n < state.listApplied || !state.session) return;
  state.listApplied = n;
  const next = new Map();
  for (const c of Array.isArray(list) ? list : []) {
    const info = convInfo(c.conv);
    const entry = {
      conv: c.conv,
      kind: c.kind === 'group' || info.kind === 'group' ? 'group' : 'p2p',
      peer: c.peer || info.peer,
      group: c.group || info.group,
      maxSeq: c.max_seq || 0,
      readSeq: c.read_seq || 0,
      unread: c.unread || 0,
      last: c.last_message || null,
      peerRead: c.peer_read_seq || 0,
    };
    // A live message may have overtaken this answer: keep what is newer.
    const old = state.convs.get(c.conv);
    if (old) entry.peerRead = Math.max(entry.peerRead, old.peerRead || 0);
    if (old && old.maxSeq > entry.maxSeq) {
      entry.maxSeq = old.maxSeq;
      entry.last = old.last;
      entry.unread = old.unread;
    }
    next.set(c.conv, entry);
  }
  // A conversation opened a moment ago may not be listed yet; it stays while it is open.
  const open = state.open;
  if (open && !next.has(open.conv) && state.convs.has(open.conv)) {
    next.set(open.conv, state.convs.get(open.conv));
  }
  state.convs = next;
  loadPresence();
  for (const entry of next.values()) {
    // A read position the server did not keep (its answer raced ours, or was lost): again.
    const sent = state.readSent.get(entry.conv) || 0;
    if (sent > entry.readSeq) putRead(entry.conv, sent);
    if (open && open.conv === entry.conv) entry.unread = 0;
  }
  renderConvList();
}

/// Marks the conversation read up to `seq` (REST: it works whatever the WebSocket does).
function markRead(conv, seq) {
  const entry = state.convs.get(conv);
  if (entry) {
    entry.unread = 0;
    entry.readSeq = Math.max(entry.readSeq, seq);
  }
  if (!seq || (state.readSent.get(conv) || 0) >= seq) return;
  state.readSent.set(conv, seq);
  putRead(conv, seq);
}

function putRead(conv, seq) {
  api('PUT', `/conversations/${enc(conv)}`, { read_seq: seq }).catch((e) => {
    // Forget it so that the next markRead or list reload tries again.
    if (state.readSent.get(conv) === seq) state.readSent.delete(conv);
    console.warn('im: read position not saved:', e.message);
  });
}

function markOpenRead() {
  const open = state.open;
  if (open && open.loaded) markRead(open.conv, open.maxSeq);
  renderConvList();
}

/// Opens a conversation: the newest page of history, then live messages as they come.
async function openConversation(conv) {
  const entry = ensureConv(conv);
  const open = {
    conv,
    kind: entry.kind,
    peer: entry.peer,
    group: entry.group,
    byId: new Map(),     // message id → message: the same message may come by `sent`,
                         // `msg` and `sync`; it is shown once
    minSeq: 0,           // smallest seq shown (the `before_seq` of the next older page)
    maxSeq: 0,           // largest seq shown (the `after` of the next sync)
    more: false,         // older history exists
    loaded: false,
    loadingOlder: false,
    syncing: false,
    syncRounds: 0,
  };
  state.open = open;
  entry.unread = 0;
  renderChat();
  renderConvList();
  el.composeInput.focus();
  const generation = state.socket.generation;
  try {
    const page = await api('GET', `/messages/history?conv=${enc(conv)}&limit=${PAGE_SIZE}`);
    if (state.open !== open) return;
    open.loaded = true;
    open.more = Boolean(page.more);
    addMessages(open, page.messages || [], { scroll: 'bottom' });
    renderOlderButton();
    // A reconnect while the page was on its way: what it missed is not in the page.
    if (state.socket.generation !== generation && state.socket.connected) startSync(open);
    markOpenRead();
  } catch (e) {
    if (state.open === open) showError(`Could not load the conversation: ${e.message}`);
  }
}

/// The next older page, keeping what is on screen where it is.
async function loadOlder() {
  const open = state.open;
  if (!open || !open.loaded || !open.more || open.loadingOlder || !open.minSeq) return;
  open.loadingOlder = true;
  renderOlderButton();
  try {
    const page = await api(
      'GET',
      `/messages/history?conv=${enc(open.conv)}&before_seq=${open.minSeq}&limit=${PAGE_SIZE}`,
    );
    if (state.open !== open) return;
    const pane = el.messages;
    const heightBefore = pane.scrollHeight;
    const topBefore = pane.scrollTop;
    addMessages(open, page.messages || [], { scroll: 'keep' });
    pane.scrollTop = topBefore + (pane.scrollHeight - heightBefore);
    open.more = Boolean(page.more);
  } catch (e) {
    showError(`Could not load older messages: ${e.message}`);
  } finally {
    open.loadingOlder = false;
    renderOlderButton();
  }
}

function startSync(open) {
  open.syncRounds = 0;
  requestSync(open);
}

function requestSync(open) {
  open.syncing = sendFrame({ type: 'sync', conv: open.conv, after: open.maxSeq, limit: SYNC_LIMIT });
}

function onSync(f) {
  const open = state.open;
  if (!open || open.conv !== f.conv) return;
  const before = open.maxSeq;
  const messages = Array.isArray(f.messages) ? f.messages : [];
  addMessages(open, messages);
  const entry = ensureConv(f.conv);
  for (const m of messages) noteLatest(entry, m);
  if (f.more && open.maxSeq > before) {
    open.syncRounds += 1;
    if (open.syncRounds >= SYNC_ROUNDS_MAX) {
      // Far behind: the newest page is what the reader wants; older pages load on scroll.
      open.syncing = false;
      openConversation(open.conv);
      return;
    }
    requestSync(open);
    return;
  }
  open.syncing = false;
  markOpenRead();
}

/// When `sync` is refused (a deployment without it): the newest history page instead.
async function catchUpByHistory(open) {
  try {
    const page = await api('GET', `/messages/history?conv=${enc(open.conv)}&limit=${PAGE_SIZE}`);
    if (state.open !== open) return;
    const messages = page.messages || [];
    const oldest = messages.length ? messages[messages.length - 1].seq : 0;
    if (page.more && oldest > open.maxSeq + 1) {
      openConversation(open.conv);   // a gap between what is shown and this page
      return;
    }
    addMessages(open, messages);
    const entry = ensureConv(open.conv);
    for (const m of messages) noteLatest(entry, m);
    markOpenRead();
  } catch (e) {
    showError(`Could not catch up: ${e.message}`);
  }
}

/// A `msg` frame: a message for us, or ours from another device.
function onMessage(m) {
  stopTyping(m.conv, m.from);
  const entry = ensureConv(m.conv);
  if (entry.kind === 'p2p' && entry.peer) askPresence(entry.peer, true);
  const isNew = noteLatest(entry, m);
  const open = state.open;
  if (open && open.conv === m.conv) {
    addMessages(open, [m]);
    if (open.loaded) markRead(m.conv, open.maxSeq);
  } else if (isNew && m.from !== me()) {
    entry.unread += 1;
  }
  renderConvList();
}

/// This user read `conv` up to `seq` on another device: the badge here follows.
function onReadEvent(f) {
  if (typeof f.conv !== 'string' || !Number.isFinite(f.seq)) return;
  const entry = ensureConv(f.conv);
  if (f.seq <= entry.readSeq) return;
  entry.readSeq = f.seq;
  entry.unread = Math.max(0, Math.min(entry.unread, entry.maxSeq - f.seq));
  renderConvList();
}

/// The peer of a two-person conversation read it up to `seq`: ✓✓ on what they have read.
function onReceipt(f) {
  if (typeof f.conv !== 'string' || !Number.isFinite(f.seq)) return;
  const entry = ensureConv(f.conv);
  if (f.seq <= entry.peerRead) return;
  entry.peerRead = f.seq;
  if (state.open && state.open.conv === f.conv) renderReceipts();
}

/// The ticks of the open two-person conversation's own messages: ✓ stored, ✓✓ read.
function renderReceipts() {
  const open = state.open;
  if (!open || open.kind !== 'p2p') return;
  const read = (state.convs.get(open.conv) || {}).peerRead || 0;
  for (const node of el.messageList.querySelectorAll('.message.mine[data-state="sent"]')) {
    const isRead = Number(node.dataset.seq) <= read;
    const status = node.querySelector('.status');
    status.textContent = isRead ? '✓✓' : '✓';
    status.title = isRead ? 'read' : 'delivered to the server';
    node.dataset.read = isRead ? 'yes' : 'no';
  }
}

// Typing indicators: sent while the user types (at most every 3 s), shown for 5 s after the
// last one heard, or until that user's message arrives. Never stored by the server.

function noteTyping() {
  const open = state.open;
  if (!open || !el.composeInput.value) return;
  const now = Date.now();
  if (now - (state.typingSent.get(open.conv) || 0) < TYPING_SEND_EVERY_MS) return;
  if (sendFrame({ type: 'typing', conv: open.conv })) state.typingSent.set(open.conv, now);
}

function onTyping(f) {
  if (typeof f.conv !== 'string' || typeof f.from !== 'string' || f.from === me()) return;
  let who = state.typing.get(f.conv);
  if (!who) {
    who = new Map();
    state.typing.set(f.conv, who);
  }
  who.set(f.from, Date.now() + TYPING_SHOW_MS);
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOW_MS + 50);
}

function stopTyping(conv, from) {
  const who = state.typing.get(conv);
  if (who && who.delete(from)) renderTyping();
}

/// "x is typing…" under the open conversation's title.
function renderTyping() {
  const open = state.open;
  const who = open && state.typing.get(open.conv);
  const now = Date.now();
  const names = [];
  if (who) {
    for (const [user, until] of who) {
      if (until > now) names.push(userLabel(user));
      else who.delete(user);
    }
  }
  el.typingLine.hidden = names.length === 0;
  el.typingLine.textContent = names.length === 0 ? ''
    : names.length === 1 ? `${names[0]} is typing…`
      : `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]} are typing…`;
}

// Presence: a dot per two-person conversation, "online" in its header, a group's member
// list. The server pushes changes of contacts; the state at connect is asked for.

/// Asks for the presence of the peers not heard of yet (at most PRESENCE_ASK_MAX at once).
function loadPresence() {
  const peers = [...state.convs.values()]
    .filter((e) => e.kind === 'p2p' && e.peer && !state.online.has(e.peer))
    .map((e) => e.peer)
    .slice(0, PRESENCE_ASK_MAX);
  for (const peer of peers) askPresence(peer);
}

/// Asks the server for a peer's presence; `again`: even if asked before, until it answers
/// (a peer becomes a contact once both have written: a message either way asks again).
function askPresence(peer, again = false) {
  if (state.online.has(peer) && !(again && !state.contacts.has(peer))) return;
  state.online.set(peer, false);     // asked: not again until the next connect
  const pushed = state.pushes.get(peer) || 0;
  api('GET', `/users/${enc(peer)}/presence`)
    .then((p) => {
      // A frame that came while the answer was on its way is newer than it.
      if ((state.pushes.get(peer) || 0) !== pushed) return;
      if (!p || p.user !== peer) return;
      state.contacts.add(peer);
      notePresence(peer, Boolean(p.online));
    })
    .catch(() => {});                // 404: not someone whose presence we may see
}

function onPresence(f) {
  if (f.user === me()) {
    state.devices = Array.isArray(f.devices) ? f.devices : [];
    const n = state.devices.length;
    el.devices.textContent = n > 1 ? `· online on ${n} devices` : '';
    return;
  }
  state.pushes.set(f.user, (state.pushes.get(f.user) || 0) + 1);
  notePresence(f.user, Boolean(f.online));
}

function notePresence(user, online) {
  state.online.set(user, online);
  renderConvList();
  renderPeerPresence();
  if (state.members) {
    for (const item of state.members.items) {
      if (item.dataset.user === user) item.dataset.online = String(online);
    }
  }
}

function renderPeerPresence() {
  const open = state.open;
  if (!open || open.kind !== 'p2p') return;
  const online = state.online.get(open.peer) === true;
  el.peerPresence.dataset.online = String(online);
  el.peerPresence.textContent = online ? 'online' : 'offline';
}

/// Shows or hides the open group's members, each with a presence dot.
async function toggleMembers() {
  const open = state.open;
  if (!open || open.kind !== 'group') return;
  if (state.members && state.members.group === open.group) {
    state.members = null;
    el.memberList.hidden = true;
    return;
  }
  const group = open.group;
  const [page, presence] = await Promise.all([
    api('GET', `/groups/${enc(group)}/members?limit=${MEMBERS_SHOWN_MAX}`),
    api('GET', `/groups/${enc(group)}/presence`),
  ]);
  if (!state.open || state.open.group !== group) return;
  const online = new Set(presence.online || []);
  const items = (page.members || []).map((m) => {
    state.users.set(m.user_id, { user_id: m.user_id, username: m.username, nickname: m.nickname });
    return h('li', {
      class: 'member-item',
      'data-testid': 'member-item',
      dataset: { user: m.user_id, online: String(online.has(m.user_id)) },
    },
    h('span', { class: 'dot' }),
    h('span', { text: m.nickname || m.username }));
  });
  if (page.more) items.push(h('li', { class: 'muted', text: '…and more' }));
  state.members = { group, items };
  el.memberList.replaceChildren(...items);
  el.memberList.hidden = false;
}

// Blocking: no two-person messages, receipts or typing between the two, either way.

async function loadBlocked() {
  const { users } = await api('GET', '/users/blocked');
  state.blocked = new Set(Array.isArray(users) ? users : []);
  renderChatHeader();
}

async function toggleBlock(peer) {
  const blocking = !state.blocked.has(peer);
  try {
    await api(blocking ? 'PUT' : 'DELETE', `/users/${enc(peer)}/block`);
  } catch (e) {
    // Lifted on another device already: the same outcome.
    if (blocking || !(e instanceof ApiError && e.status === 404)) throw e;
  }
  if (blocking) state.blocked.add(peer);
  else state.blocked.delete(peer);
  renderChatHeader();
}

function newCid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // randomUUID needs a secure context; getRandomValues does not.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function sendMessage(content) {
  const open = state.open;
  if (!open || !content.trim()) return false;
  if (new TextEncoder().encode(content).length > CONTENT_BYTES_MAX) {
    showError(`The message is longer than ${CONTENT_BYTES_MAX / 1024} KiB.`);
    return false;
  }
  // The message ends "typing…" at the other end; typing on starts it again.
  state.typingSent.delete(open.conv);
  const p = {
    cid: newCid(),
    conv: open.conv,
    target: open.kind === 'group' ? { group: open.group } : { to: open.peer },
    content,
    state: 'pending',
    attempts: 0,
    error: null,
    ts: Date.now(),
    retryTimer: null,
  };
  state.pending.set(p.cid, p);
  transmit(p);
  renderPending(p, { scroll: true });
  return true;
}

/// Sends (or resends, with the same cid) a pending message if the socket is open; otherwise
/// it goes out from afterConnect().
function transmit(p) {
  clearTimeout(p.retryTimer);
  if (sendFrame({ type: 'send', cid: p.cid, ...p.target, content: p.content })) p.attempts += 1;
}

/// A `sent`: our message is durable, with its id and seq.
function onSent(f) {
  const p = state.pending.get(f.cid);
  if (!p) return;   // a duplicate acknowledgement of a resend
  state.pending.delete(f.cid);
  const sentTo = state.convs.get(f.conv);
  if (sentTo && sentTo.kind === 'p2p' && sentTo.peer) askPresence(sentTo.peer, true);
  clearTimeout(p.retryTimer);
  const m = {
    type: 'msg',
    id: f.id,
    conv: f.conv,
    seq: f.seq,
    from: me(),
    ...p.target,
    content: p.content,
    content_type: 'text',
    ts: f.ts,
  };
  const entry = ensureConv(f.conv);
  noteLatest(entry, m);
  const open = state.open;
  if (open && open.conv === f.conv) {
    removePendingEl(p.cid);
    addMessages(open, [m]);
    // Our own message is read by us: without this it would count as unread on other devices.
    if (open.loaded) markRead(f.conv, open.maxSeq);
  } else if (entry.unread === 0) {
    markRead(f.conv, f.seq);
  }
  renderConvList();
}

function onErrorFrame(f) {
  const message = `${f.message || 'error'} (${f.code})`;
  const p = f.cid ? state.pending.get(f.cid) : null;
  if (p) {
    // 5xxx: ours or a dependency's; the same cid is safe to send again.
    if (f.code >= 5000 && p.attempts < SEND_ATTEMPTS_MAX) {
      p.error = `${message}; retrying`;
      p.retryTimer = setTimeout(() => {
        if (state.pending.get(p.cid) === p) transmit(p);
      }, SEND_RETRY_MS);
    } else {
      p.state = 'failed';
      p.error = message;
    }
    renderPending(p);
    showError(`Message not sent: ${message}`);
    return;
  }
  const open = state.open;
  if (open && open.syncing && !f.cid && f.code >= 5000) {
    // Most likely the answer to our sync: fall back to REST history.
    open.syncing = false;
    catchUpByHistory(open);
    return;
  }
  showError(message);
}

// Name lookups: each user and group is asked for once, answers are cached.

function lookup(key, path, cache, id) {
  if (state.lookups.has(key)) return;
  const done = api('GET', path).then(
    (v) => {
      cache.set(id, v);
      renderNames(id);
    },
    (e) => {
      console.warn(`im: lookup ${path} failed:`, e.message);
      setTimeout(() => state.lookups.delete(key), LOOKUP_RETRY_MS);
    },
  );
  state.lookups.set(key, done);
}

function userLabel(id) {
  if (id === me()) return state.session.username || 'me';
  const u = state.users.get(id);
  if (u) return u.username;
  lookup(`u:${id}`, `/users/${enc(id)}`, state.users, id);
  return `user ${id}`;
}

function groupLabel(id) {
  const g = state.groups.get(id);
  if (g) return g.name;
  lookup(`g:${id}`, `/groups/${enc(id)}`, state.groups, id);
  return `group ${id}`;
}

function convLabel(entry) {
  return entry.kind === 'group' ? `# ${groupLabel(entry.group)}` : userLabel(entry.peer);
}

// Actions of the sidebar forms.

async function openUserByName(name) {
  // Usernames are case-insensitive; the server keeps them lower-case.
  const profile = await api('GET', `/users/by-name/${enc(name.toLowerCase())}`);
  state.users.set(profile.user_id, profile);
  const { conv } = await api('POST', '/conversations/create', { user_id: profile.user_id });
  ensureConv(conv);
  await openConversation(conv);
}

async function createGroup(name) {
  // Private (the server's default): people join by an invite link from the header.
  const { group_id: groupId } = await api('POST', '/groups/create', { name });
  state.groups.set(groupId, {
    group_id: groupId, name, owner_id: me(), visibility: 'private', member: true,
  });
  await reloadAndOpen(`g:${groupId}`);
}

/// What the join box holds: an invite link (or its bare token), or a public group's id.
function parseJoinInput(text) {
  const invite = text.match(/(?:^|[#&?]invite=)([0-9a-f]{32})$/);
  if (invite) return { token: invite[1] };
  if (/^[0-9]+$/.test(text)) return { groupId: text };
  return null;
}

async function joinGroup(groupId) {
  await api('POST', `/groups/${enc(groupId)}/join`);
  await reloadAndOpen(`g:${groupId}`);
}

async function joinByInvite(token) {
  const { group_id: groupId } = await api('POST', `/invites/${enc(token)}/join`);
  state.lookups.delete(`g:${groupId}`);
  state.groups.delete(groupId);
  await reloadAndOpen(`g:${groupId}`);
}

/// The owner's "Make an invite link": a week, any number of uses. The token is shown once
/// by the server, so the link lives in this box until another conversation is opened.
async function createInvite(groupId) {
  const inv = await api('POST', `/groups/${enc(groupId)}/invites`, {});
  if (!state.open || state.open.group !== groupId) return;
  el.inviteLink.value = `${location.origin}${location.pathname}#invite=${inv.token}`;
  el.inviteNote.textContent = `valid until ${new Date(inv.expires_ms).toLocaleString()}`;
  el.inviteLine.hidden = false;
  el.inviteLink.select();
}

async function copyInvite() {
  const link = el.inviteLink.value;
  try {
    await navigator.clipboard.writeText(link);
  } catch {
    // No clipboard permission (plain http, an old browser): select it for Ctrl+C.
    el.inviteLink.select();
    if (!document.execCommand('copy')) {
      el.inviteNote.textContent = 'Press Ctrl+C to copy';
      return;
    }
  }
  el.inviteNote.textContent = 'Copied';
}

// An invite link opened in the browser (`#invite=<token>`): once logged in, say where it
// leads and ask. The token stays in the address bar through the login form.
let pendingInvite = null;

function inviteInLocation() {
  const m = location.hash.match(/^#invite=([0-9a-f]{32})$/);
  return m ? m[1] : null;
}

function forgetInviteInLocation() {
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);
}

async function offerInvite() {
  const token = inviteInLocation();
  if (!token || !state.session || pendingInvite === token) return;
  pendingInvite = token;
  try {
    const { group } = await api('GET', `/invites/${enc(token)}`);
    if (pendingInvite !== token) return;
    const n = group.member_count === 1 ? '1 member' : `${group.member_count} members`;
    el.inviteText.textContent = `You are invited to join “${group.name}” (${n}).`;
    el.inviteBanner.hidden = false;
  } catch (e) {
    if (pendingInvite !== token) return; // another link was opened meanwhile
    pendingInvite = null;
    // Only a dead invite is forgotten; after a network error or a 5xx the link stays in the
    // address bar, and reloading the page asks again.
    if (e instanceof ApiError && e.status === 404) forgetInviteInLocation();
    showError(`Invite: ${e.message}`);
  }
}

function closeInviteBanner() {
  pendingInvite = null;
  el.inviteBanner.hidden = true;
  forgetInviteInLocation();
}

async function reloadAndOpen(conv) {
  try {
    await loadConversations();
  } catch (e) {
    showError(`Conversations: ${e.message}`);
  }
  ensureConv(conv);
  await openConversation(conv);
}

// ---------------------------------------------------------------------------------------------
// 6. Render

/// createElement with properties and children; text children become text nodes, so no
/// string ever reaches the HTML parser.
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'hidden') node.hidden = Boolean(v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c);   // append() treats strings as text
  }
  return node;
}

let errorTimer = null;

function showError(message) {
  console.warn('im:', message);
  el.error.textContent = message;
  el.errorBar.hidden = false;
  clearTimeout(errorTimer);
  // The bar goes; the text stays as the last error shown.
  errorTimer = setTimeout(() => {
    el.errorBar.hidden = true;
  }, ERROR_VISIBLE_MS);
}

function renderConnState(kind) {
  const sock = state.socket;
  let text = kind;
  if (kind === 'reconnecting') {
    const s = Math.max(0, Math.ceil((sock.retryAt - Date.now()) / 1000));
    text = s > 0 ? `reconnecting in ${s} s` : 'reconnecting…';
  } else if (kind === 'connecting') {
    text = 'connecting…';
  }
  el.connState.textContent = text;
  el.connState.dataset.state = kind;
}

function timeOf(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

function previewOf(entry) {
  const m = entry.last;
  if (!m) return entry.kind === 'group' ? `group ${entry.group}` : 'no messages yet';
  const who = m.from === me() ? 'You: ' : entry.kind === 'group' ? `${userLabel(m.from)}: ` : '';
  const body = m.content_type && m.content_type !== 'text' ? `[${m.content_type}]` : m.content;
  return who + String(body).replace(/\s+/g, ' ').slice(0, 120);
}

function renderConvList() {
  const entries = [...state.convs.values()].sort(
    (a, b) => ((b.last && b.last.ts) || 0) - ((a.last && a.last.ts) || 0) || a.conv.localeCompare(b.conv),
  );
  const openConv = state.open && state.open.conv;
  const items = entries.map((entry) =>
    h('li', {},
      h('button', {
        type: 'button',
        class: `conv-item${entry.conv === openConv ? ' active' : ''}`,
        'data-testid': 'conv-item',
        dataset: { conv: entry.conv },
      },
      h('span', { class: 'conv-name' },
        entry.kind === 'p2p' ? h('span', {
          class: 'dot',
          'data-testid': 'presence-dot',
          dataset: { online: String(state.online.get(entry.peer) === true) },
          title: state.online.get(entry.peer) === true ? 'online' : 'offline',
        }) : null,
        convLabel(entry)),
      h('span', {
        class: 'badge',
        'data-testid': 'unread',
        text: String(entry.unread),
        hidden: entry.unread === 0,
      }),
      h('span', { class: 'conv-preview muted', text: previewOf(entry) }))));
  if (items.length === 0) items.push(h('li', { class: 'muted empty', text: 'No conversations yet.' }));
  el.convList.replaceChildren(...items);
}

/// The open conversation's header, compose box and (empty) message pane.
function renderChat() {
  const open = state.open;
  el.messageList.replaceChildren();
  el.messages.dataset.conv = open ? open.conv : '';
  el.placeholder.hidden = Boolean(open);
  el.composeInput.disabled = !open;
  el.composeSend.disabled = !open;
  el.inviteLine.hidden = true;
  el.inviteLink.value = '';
  el.inviteNote.textContent = '';
  renderChatHeader();
  renderTyping();
  renderOlderButton();
  renderOpenPending();
}

function renderChatHeader() {
  const open = state.open;
  if (!open) {
    el.convTitle.textContent = 'No conversation open';
    el.groupLine.hidden = true;
    el.peerLine.hidden = true;
    el.inviteLine.hidden = true;
    el.memberList.hidden = true;
    state.members = null;
    return;
  }
  const entry = state.convs.get(open.conv) || ensureConv(open.conv);
  el.convTitle.textContent = convLabel(entry);
  el.groupLine.hidden = open.kind !== 'group';
  el.peerLine.hidden = open.kind !== 'p2p';
  // The member list belongs to the group it was opened for.
  if (!state.members || state.members.group !== open.group) {
    state.members = null;
    el.memberList.hidden = true;
  }
  if (open.kind !== 'group') {
    el.inviteLine.hidden = true;
    el.blockToggle.textContent = state.blocked.has(open.peer) ? 'Unblock' : 'Block';
    renderPeerPresence();
    return;
  }
  el.groupId.textContent = open.group;
  const g = state.groups.get(open.group);
  const owner = Boolean(g && g.owner_id === me());
  const isPublic = Boolean(g && g.visibility === 'public');
  el.groupKind.textContent = g ? (isPublic ? 'Public' : 'Private') : '';
  el.groupHint.textContent = !g ? ''
    : isPublic ? '— anyone can join it by this id.'
      : owner ? '— people join by an invite link.' : '— its owner can invite people.';
  el.inviteCreate.hidden = !owner;
}

function renderOlderButton() {
  const open = state.open;
  el.loadOlder.hidden = !(open && open.loaded && open.more);
  el.loadOlder.disabled = Boolean(open && open.loadingOlder);
  el.loadOlder.textContent = open && open.loadingOlder ? 'Loading…' : 'Load older messages';
}

/// After a name lookup: labels that showed the bare id.
function renderNames(id) {
  renderConvList();
  renderChatHeader();
  for (const span of el.messageList.querySelectorAll(`[data-user="${CSS.escape(id)}"]`)) {
    span.textContent = userLabel(id);
  }
}

function isNearBottom() {
  const p = el.messages;
  return p.scrollHeight - p.scrollTop - p.clientHeight < 60;
}

function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function messageEl(m, { mine, pending }) {
  const meta = h('div', { class: 'meta' },
    h('span', { class: 'author', dataset: { user: m.from }, text: userLabel(m.from) }),
    h('time', { text: timeOf(m.ts) }),
    h('span', { class: 'status', 'data-testid': 'message-status', text: pending ? 'sending…' : '' }));
  const typeLabel = m.content_type && m.content_type !== 'text' ? `[${m.content_type}] ` : '';
  return h('li', {
    class: `message${mine ? ' mine' : ''}`,
    'data-testid': 'message',
    dataset: pending ? { cid: m.cid, state: 'pending' } : { id: m.id, seq: String(m.seq), state: 'sent' },
  },
  meta,
  h('div', { class: 'content', 'data-testid': 'message-content', text: typeLabel + m.content }));
}

/// Message elements are kept in seq order; pending ones (no seq yet) stay at the bottom.
function insertBySeq(node, seq) {
  const list = el.messageList;
  let before = null;
  for (let c = list.lastElementChild; c; c = c.previousElementSibling) {
    if (c.dataset.seq === undefined || Number(c.dataset.seq) > seq) {
      before = c;
      continue;
    }
    break;
  }
  list.insertBefore(node, before);
}

/// Adds messages to the open conversation, each id once.
function addMessages(open, messages, { scroll = 'auto' } = {}) {
  if (state.open !== open) return;
  const atBottom = isNearBottom();
  let mineAdded = false;
  for (const m of messages) {
    if (!m || typeof m.id !== 'string' || open.byId.has(m.id)) continue;
    open.byId.set(m.id, m);
    open.maxSeq = Math.max(open.maxSeq, m.seq);
    open.minSeq = open.minSeq ? Math.min(open.minSeq, m.seq) : m.seq;
    const mine = m.from === me();
    mineAdded = mineAdded || mine;
    insertBySeq(messageEl(m, { mine, pending: false }), m.seq);
  }
  renderReceipts();
  if (scroll === 'bottom' || (scroll === 'auto' && (atBottom || mineAdded))) scrollToBottom();
  // A first page too short to scroll cannot be scrolled to the top: fetch older right away.
  if (scroll === 'bottom' && open.more && el.messages.scrollHeight <= el.messages.clientHeight) {
    setTimeout(loadOlder, 0);
  }
}

function pendingStatus(p) {
  if (p.state === 'failed') return `not sent: ${p.error}`;
  if (p.error) return p.error;
  return state.socket.connected ? 'sending…' : 'waiting for the connection…';
}

/// Shows (or updates) a pending send of the open conversation.
function renderPending(p, { scroll = false } = {}) {
  const open = state.open;
  if (!open || open.conv !== p.conv) return;
  let node = el.messageList.querySelector(`[data-cid="${CSS.escape(p.cid)}"]`);
  if (!node) {
    node = messageEl({ cid: p.cid, from: me(), content: p.content, ts: p.ts }, { mine: true, pending: true });
    el.messageList.append(node);
  }
  node.dataset.state = p.state;
  node.classList.toggle('failed', p.state === 'failed');
  node.querySelector('.status').textContent = pendingStatus(p);
  if (scroll) scrollToBottom();
}

function renderOpenPending() {
  for (const p of state.pending.values()) renderPending(p);
}

function removePendingEl(cid) {
  const node = el.messageList.querySelector(`[data-cid="${CSS.escape(cid)}"]`);
  if (node) node.remove();
}

function showView(loggedIn) {
  el.loginView.hidden = loggedIn;
  el.appView.hidden = !loggedIn;
}

// ---------------------------------------------------------------------------------------------
// Notifications (Web Push): while none of the user's devices is online, the server wakes the
// browsers they turned notifications on in; the service worker (/sw.js) shows them.

function base64UrlBytes(text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/');
  const raw = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

async function pushRegistration() {
  await navigator.serviceWorker.register('/sw.js');
  return navigator.serviceWorker.ready;
}

/// After login: is Web Push on at the server, and is this browser subscribed? A subscription
/// this browser has is handed to the server again (another account may have had it).
async function setupPush() {
  el.pushToggle.hidden = true;
  if (!PUSH_SUPPORTED) return;
  let vapid;
  try {
    vapid = await api('GET', '/push/vapid');
  } catch {
    return;   // 404: not configured on this server
  }
  state.push.key = vapid.public_key;
  renderPush();
  const reg = await pushRegistration();
  let sub = await reg.pushManager.getSubscription();
  if (sub && !sameKey(sub, state.push.key)) {
    // Made with a key the server no longer has: it would never deliver.
    await sub.unsubscribe().catch(() => {});
    sub = null;
  }
  if (sub && Notification.permission === 'granted') {
    await api('POST', '/push/subscriptions', sub.toJSON());
    state.push.subscribed = true;
    renderPush();
  }
}

/// Whether a subscription was made with `key` (base64url); unknown counts as the same.
function sameKey(sub, key) {
  const made = sub.options && sub.options.applicationServerKey;
  if (!made) return true;
  const a = new Uint8Array(made);
  const b = base64UrlBytes(key);
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function togglePush() {
  if (!state.push.subscribed && Notification.permission !== 'granted') {
    // First, while the click still counts as the user's gesture (Safari, Firefox).
    if (await Notification.requestPermission() !== 'granted') {
      showError('Notifications are blocked for this site in the browser\'s settings.');
      return;
    }
  }
  const reg = await pushRegistration();
  if (state.push.subscribed) {
    const sub = await reg.pushManager.getSubscription();
    if (sub) {
      await api('DELETE', '/push/subscriptions', { endpoint: sub.endpoint }).catch(() => {});
      await sub.unsubscribe();
    }
    state.push.subscribed = false;
    renderPush();
    return;
  }
  const sub = await reg.pushManager.subscribe({
    userVisibleOnly: true,
    applicationServerKey: base64UrlBytes(state.push.key),
  });
  await api('POST', '/push/subscriptions', sub.toJSON());
  state.push.subscribed = true;
  renderPush();
}

/// On logout this browser stops being woken for the account.
async function dropPush(token) {
  if (!PUSH_SUPPORTED || !state.push.subscribed) return;
  const reg = await navigator.serviceWorker.getRegistration();
  const sub = reg && await reg.pushManager.getSubscription();
  if (!sub) return;
  await request('DELETE', '/push/subscriptions', { endpoint: sub.endpoint }, token).catch(() => {});
  await sub.unsubscribe().catch(() => {});
}

function renderPush() {
  el.pushToggle.hidden = !state.push.key;
  el.pushToggle.textContent = state.push.subscribed ? 'Notifications: on' : 'Notifications: off';
  el.pushToggle.dataset.on = String(state.push.subscribed);
}

/// A notification clicked while a tab is open (the service worker's message), or one that
/// opened this tab (`#conv=`).
function openNotified(conv) {
  if (typeof conv === 'string' && state.convs.has(conv)) {
    openConversation(conv).catch((e) => showError(e.message));
  }
}

function convInLocation() {
  const m = location.hash.match(/^#conv=([^&]+)$/);
  if (!m) return null;
  history.replaceState(null, '', location.pathname + location.search);
  return decodeURIComponent(m[1]);
}

// ---------------------------------------------------------------------------------------------
// 7. Wiring

function startApp() {
  showView(true);
  el.me.textContent = state.session.username || '';
  renderChat();
  renderConvList();
  const notified = convInLocation();
  loadConversations()
    .then(() => openNotified(notified))
    .catch((e) => showError(`Conversations: ${e.message}`));
  connect();
  offerInvite();
  setupPush().catch((e) => console.warn('im: notifications not set up:', e.message));
  loadBlocked().catch((e) => console.warn('im: blocked users not loaded:', e.message));
}

/// Back to the login form, forgetting everything of this session.
function endSession(reason) {
  saveSession(null);
  closeSocket();
  for (const p of state.pending.values()) clearTimeout(p.retryTimer);
  state.convs = new Map();
  state.open = null;
  state.pending = new Map();
  state.readSent = new Map();
  state.users = new Map();
  state.groups = new Map();
  state.lookups = new Map();
  state.typing = new Map();
  state.typingSent = new Map();
  state.blocked = new Set();
  state.online = new Map();
  state.contacts = new Set();
  state.devices = [];
  el.devices.textContent = '';
  state.members = null;
  state.push = { key: null, subscribed: false };
  el.pushToggle.hidden = true;
  pendingInvite = null;
  el.inviteBanner.hidden = true;
  renderConnState('offline');
  showView(false);
  renderChat();
  renderConvList();
  if (reason) showError(reason);
  el.loginPassword.value = '';
  el.loginUsername.focus();
}

async function logIn(username, password) {
  const t = await request('POST', '/auth/login', { username, password });
  const session = {
    token: t.token,
    refresh_token: t.refresh_token,
    user_id: t.user_id,
    ws_url: t.ws_url,
    username: username.toLowerCase(),   // how the server stores it; the profile says for sure
  };
  saveSession(session);
  try {
    const profile = await request('GET', '/users/profile', undefined, t.token);
    saveSession({ ...session, username: profile.username });
  } catch {
    // the lower-cased name is right for every valid username
  }
  el.loginPassword.value = '';
  startApp();
}

/// Runs a form action with its buttons disabled, showing any error.
/// Runs `action` with the form's buttons disabled. An answer that says when to try again
/// (429 after failed logins, Retry-After) keeps them disabled that long, counting down.
async function busy(form, action) {
  const buttons = form.querySelectorAll('button');
  buttons.forEach((b) => { b.disabled = true; });
  let waitS = 0;
  try {
    await action();
    return true;
  } catch (e) {
    waitS = e instanceof ApiError && e.status === 429 ? e.retryAfter : 0;
    showError(waitS > 0 ? `${e.message} (try again in ${waitS} s)` : e.message);
    return false;
  } finally {
    if (waitS > 0) {
      const until = Date.now() + waitS * 1000;
      const tick = setInterval(() => {
        const left = Math.ceil((until - Date.now()) / 1000);
        if (left > 0) {
          form.dataset.wait = String(left);
          return;
        }
        clearInterval(tick);
        delete form.dataset.wait;
        buttons.forEach((b) => { b.disabled = false; });
      }, 250);
      form.dataset.wait = String(waitS);
    } else {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }
}

function wire() {
  for (const [key, id] of Object.entries({
    errorBar: 'error-bar', error: 'error', errorDismiss: 'error-dismiss',
    loginView: 'login-view', loginForm: 'login-form', loginUsername: 'login-username',
    loginPassword: 'login-password', registerSubmit: 'register-submit',
    appView: 'app-view', me: 'me', devices: 'devices', connState: 'conn-state', logout: 'logout',
    pushToggle: 'push-toggle',
    openUserForm: 'open-user-form', openUserInput: 'open-user-input',
    groupCreateForm: 'group-create-form', groupCreateName: 'group-create-name',
    groupJoinForm: 'group-join-form', groupJoinId: 'group-join-id',
    convList: 'conv-list', convTitle: 'conv-title', groupLine: 'group-line', groupId: 'group-id',
    groupKind: 'group-kind', groupHint: 'group-hint', inviteCreate: 'invite-create',
    inviteLine: 'invite-line', inviteLink: 'invite-link', inviteCopy: 'invite-copy',
    inviteNote: 'invite-note', inviteBanner: 'invite-banner', inviteText: 'invite-text',
    inviteAccept: 'invite-accept', inviteDismiss: 'invite-dismiss', typingLine: 'typing-line',
    peerLine: 'peer-line', blockToggle: 'block-toggle', peerPresence: 'peer-presence',
    membersToggle: 'members-toggle', memberList: 'member-list',
    messages: 'messages', loadOlder: 'load-older', placeholder: 'messages-placeholder',
    messageList: 'message-list', composeForm: 'compose-form', composeInput: 'compose-input',
    composeSend: 'compose-send',
  })) {
    el[key] = $(id);
  }

  el.errorDismiss.addEventListener('click', () => { el.errorBar.hidden = true; });
  el.pushToggle.addEventListener('click', () => {
    el.pushToggle.disabled = true;
    togglePush()
      .catch((e) => showError(`Notifications: ${e.message}`))
      .finally(() => { el.pushToggle.disabled = false; });
  });
  if (PUSH_SUPPORTED) {
    navigator.serviceWorker.addEventListener('message', (ev) => {
      if (ev.data && ev.data.type === 'open') openNotified(ev.data.conv);
    });
  }
  el.membersToggle.addEventListener('click', () => {
    toggleMembers().catch((e) => showError(`Members: ${e.message}`));
  });

  el.loginForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const username = el.loginUsername.value.trim();
    const password = el.loginPassword.value;
    busy(el.loginForm, () => logIn(username, password));
  });

  el.registerSubmit.addEventListener('click', () => {
    if (!el.loginForm.reportValidity()) return;
    const username = el.loginUsername.value.trim();
    const password = el.loginPassword.value;
    busy(el.loginForm, async () => {
      await request('POST', '/users/register', { username, password });
      await logIn(username, password);
    });
  });

  el.logout.addEventListener('click', () => {
    const token = state.session && state.session.token;
    // Revoke on the server, but leave at once either way: the token is forgotten here. The
    // browser's push subscription goes first, while the token still works.
    if (token) {
      dropPush(token)
        .finally(() => request('POST', '/auth/logout', undefined, token))
        .catch(() => {});
    }
    endSession(null);
  });

  el.openUserForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = el.openUserInput.value.trim();
    if (!name) return;
    busy(el.openUserForm, () => openUserByName(name)).then((ok) => {
      if (ok) el.openUserInput.value = '';
    });
  });

  el.groupCreateForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = el.groupCreateName.value.trim();
    if (!name) return;
    busy(el.groupCreateForm, () => createGroup(name)).then((ok) => {
      if (ok) el.groupCreateName.value = '';
    });
  });

  el.groupJoinForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const what = parseJoinInput(el.groupJoinId.value.trim());
    if (!what) {
      showError('Paste an invite link, or type the id (a number) of a public group.');
      return;
    }
    const join = what.token ? () => joinByInvite(what.token) : () => joinGroup(what.groupId);
    busy(el.groupJoinForm, join).then((ok) => {
      if (ok) el.groupJoinId.value = '';
    });
  });

  el.inviteCreate.addEventListener('click', () => {
    const open = state.open;
    if (!open || open.kind !== 'group') return;
    el.inviteCreate.disabled = true;
    createInvite(open.group)
      .catch((e) => showError(`Invite: ${e.message}`))
      .finally(() => { el.inviteCreate.disabled = false; });
  });
  el.inviteCopy.addEventListener('click', copyInvite);
  el.blockToggle.addEventListener('click', () => {
    const open = state.open;
    if (!open || open.kind !== 'p2p') return;
    el.blockToggle.disabled = true;
    toggleBlock(open.peer)
      .catch((e) => showError(`Block: ${e.message}`))
      .finally(() => { el.blockToggle.disabled = false; });
  });

  el.inviteAccept.addEventListener('click', () => {
    const token = pendingInvite;
    if (!token) return;
    el.inviteAccept.disabled = true;
    joinByInvite(token)
      .then(closeInviteBanner, (e) => showError(`Invite: ${e.message}`))
      .finally(() => { el.inviteAccept.disabled = false; });
  });
  el.inviteDismiss.addEventListener('click', closeInviteBanner);
  // A link pasted into the address bar of an open tab.
  window.addEventListener('hashchange', offerInvite);

  el.convList.addEventListener('click', (ev) => {
    const item = ev.target.closest('[data-testid="conv-item"]');
    if (item && (!state.open || state.open.conv !== item.dataset.conv)) {
      openConversation(item.dataset.conv);
    }
  });

  el.composeForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (sendMessage(el.composeInput.value)) el.composeInput.value = '';
    el.composeInput.focus();
  });

  el.composeInput.addEventListener('input', noteTyping);

  el.composeInput.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      el.composeForm.requestSubmit();
    }
  });

  el.messages.addEventListener('scroll', () => {
    if (el.messages.scrollTop < 40) loadOlder();
  });
  el.loadOlder.addEventListener('click', loadOlder);

  // The network is back, or the tab is looked at again: no need to wait for the backoff timer.
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) reconnectNow();
  });

  // Another tab of this browser logged out, logged in, or refreshed the token.
  window.addEventListener('storage', (ev) => {
    if (ev.key !== STORAGE_KEY && ev.key !== null) return;
    const stored = loadStoredSession();
    if (!stored && state.session) endSession('Logged out in another tab.');
    else if (stored && !state.session) {
      state.session = stored;
      startApp();
    } else if (stored && stored.user_id !== state.session.user_id) location.reload();
    else if (stored) state.session = stored;
  });
}

function start() {
  wire();
  const session = loadStoredSession();
  if (session) {
    state.session = session;
    startApp();
  } else {
    renderConnState('offline');
    showView(false);
    el.loginUsername.focus();
  }
}

start();
