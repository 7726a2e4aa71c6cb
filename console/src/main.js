// The tradefeed-bridge console.
//
// Two sources, each shown as it is:
// - the bridge's /console/api/state (routes with live counts, legacy
//   clients, readiness), polled every two seconds;
// - NATS over WebSocket (nats.ws, through the ingress path /nats-ws by
//   default) for the account blotter: trades and positions as the migrated
//   TraderX front end receives them.
//
// A position message is the new aggregate for one (account, security): its
// row is updated in place, and a row is added only for a security not shown
// yet (TraderX FR-707). A trade message replaces the row of its trade id.
//
// Limitation: the blotter shows only what is published after the page
// opened (NATS core keeps no history); after a reconnect it marks its rows
// as possibly stale instead of reloading them from position-service.
//
// URL options: ?account=22 (default: every account), ?nats=wss://host/nats-ws
// (default: the bridge's console.nats_url), ?ping=25 (client ping interval,
// seconds).

import { connect, JSONCodec } from 'nats.ws';

const STATE_POLL_MS = 2000;
const MAX_TRADE_ROWS = 200;
const MAX_POSITION_ROWS = 2000;

const params = new URLSearchParams(location.search);
const json = JSONCodec();
const $ = (sel) => document.querySelector(sel);

// What the page knows, also readable from the browser's developer tools.
const view = {
  bridge: null, // last /console/api/state
  natsUrl: null,
  natsState: 'connecting',
  natsServer: null, // server_name of the NATS server in use
  connectUrls: [], // what that server advertised (should be none behind an ingress)
  reconnects: 0,
  disconnects: 0,
  gaps: [],
  received: 0,
  rejected: 0,
  subjects: [],
  positions: new Map(), // `${accountId}|${security}` -> {row, data}
  trades: new Map(), // trade id -> {row, data}
};
window.tfbConsole = view;

// ------------------------------------------------------------------ helpers

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text === undefined || text === null ? '' : String(text);
  if (cls) td.className = cls;
  return td;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const c of cells) tr.appendChild(c);
  return tr;
}

function time(ms) {
  if (!ms) return '';
  return new Date(ms).toLocaleTimeString();
}

function ago(ms, now) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

function setBadge(el, state, text) {
  el.dataset.state = state;
  el.textContent = text;
}

// ------------------------------------------------------------------ bridge state

async function pollState() {
  try {
    const resp = await fetch('api/state', { cache: 'no-store' });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const state = await resp.json();
    view.bridge = state;
    renderBridge(state);
  } catch (e) {
    setBadge($('#bridge-status'), 'down', `bridge: unreachable (${e.message})`);
  }
}

function renderBridge(s) {
  const status = $('#bridge-status');
  if (s.ready) setBadge(status, 'ok', 'bridge: ready');
  else setBadge(status, 'down', `bridge: not ready (${s.not_ready.join(', ')})`);
  $('#instance').textContent = s.instance;
  $('#mode').textContent = s.mode;

  const routes = $('#routes tbody');
  routes.replaceChildren(...s.routes.map((r) => {
    const tr = row([
      cell(r.name), cell(r.topic), cell(r.subject), cell(r.direction),
      cell(r.delivery === 'queue' ? `queue (${r.queue_group})` : r.delivery),
      cell(r.to_nats.count, 'num to-nats'), cell(ago(r.to_nats.last_ms, s.time_ms)),
      cell(r.to_socketio.count, 'num to-socketio'), cell(ago(r.to_socketio.last_ms, s.time_ms)),
    ]);
    tr.dataset.route = r.name;
    return tr;
  }));

  const clients = $('#clients tbody');
  clients.replaceChildren(...s.clients.map((c) => {
    const tr = row([
      cell(c.id), cell(c.transport), cell(c.path), cell(c.remote_addr), cell(c.user_agent, 'wrap'),
      cell(c.topics.join(' '), 'wrap'), cell(c.published, 'num'),
      cell(ago(c.connected_at_ms, s.time_ms)), cell(ago(c.last_active_ms, s.time_ms)),
    ]);
    tr.dataset.client = c.id;
    return tr;
  }));
  $('#client-count').textContent = s.mode === 'attach'
    ? '(attach mode: the legacy clients are connected to trade-feed)'
    : `(${s.clients.length})`;
}

// ------------------------------------------------------------------ subjects

// The subject to subscribe for a route's template: the account when one is
// chosen, else a `*` for each placeholder that fills a whole token. A
// placeholder inside a token (the verbatim profile's `/accounts/{id}/...`)
// cannot be a wildcard: such a route needs an account.
function subjectFor(template, account) {
  if (account) return template.replace(/\{[^}]+\}/g, account);
  const tokens = template.split('.');
  const out = [];
  for (const t of tokens) {
    if (/^\{[^}]+\}$/.test(t)) out.push('*');
    else if (t.includes('{')) return null;
    else out.push(t);
  }
  return out.join('.');
}

// Routes whose subjects carry trades or positions, whatever the bridge's
// direction on them: NATS publishers may use them either way.
function blotterRoutes(routes) {
  return routes.filter((r) => r.type === 'Position' || r.type === 'Trade');
}

// ------------------------------------------------------------------ blotter

// The payload of a NATS message: the envelope's `payload` when the body is
// a TraderX envelope ({type, from, topic, date, payload}), else the body.
function payloadOf(body, expectedType) {
  if (body && typeof body === 'object' && typeof body.type === 'string' && 'payload' in body) {
    if (body.type !== expectedType) return null; // as TraderX subscribers do
    return body.payload;
  }
  return body;
}

function upsertPosition(p) {
  if (!p || p.security === undefined || p.accountId === undefined) return false;
  const key = `${p.accountId}|${p.security}`;
  let entry = view.positions.get(key);
  if (!entry) {
    if (view.positions.size >= MAX_POSITION_ROWS) return false;
    const tr = row([cell(p.accountId), cell(p.security), cell('', 'num qty'), cell('')]);
    tr.dataset.key = key;
    tr.dataset.account = String(p.accountId);
    tr.dataset.security = String(p.security);
    entry = { row: tr, data: p };
    view.positions.set(key, entry);
    insertSorted($('#positions tbody'), tr, key);
  }
  entry.data = p;
  const cells = entry.row.children;
  cells[2].textContent = String(p.quantity);
  cells[3].textContent = time(p.updated);
  entry.row.dataset.quantity = String(p.quantity);
  fresh(entry.row);
  return true;
}

function insertSorted(tbody, tr, key) {
  for (const other of tbody.children) {
    if (other.dataset.key > key) {
      tbody.insertBefore(tr, other);
      return;
    }
  }
  tbody.appendChild(tr);
}

function upsertTrade(t) {
  if (!t || t.id === undefined) return false;
  const key = String(t.id);
  let entry = view.trades.get(key);
  const tbody = $('#trades tbody');
  if (!entry) {
    const tr = row([cell(''), cell(''), cell(''), cell('', 'num'), cell(''), cell(''), cell(key)]);
    tr.dataset.trade = key;
    entry = { row: tr, data: t };
    view.trades.set(key, entry);
    tbody.insertBefore(tr, tbody.firstChild);
    while (view.trades.size > MAX_TRADE_ROWS) {
      const oldest = tbody.lastElementChild;
      view.trades.delete(oldest.dataset.trade);
      oldest.remove();
    }
  }
  entry.data = t;
  const c = entry.row.children;
  c[0].textContent = String(t.accountId ?? '');
  c[1].textContent = String(t.security ?? '');
  c[2].textContent = String(t.side ?? '');
  c[3].textContent = String(t.quantity ?? '');
  c[4].textContent = String(t.state ?? '');
  c[5].textContent = time(t.updated || t.created);
  entry.row.dataset.state = String(t.state ?? '');
  fresh(entry.row);
  return true;
}

function fresh(tr) {
  tr.classList.remove('stale');
  tr.classList.add('flash');
  setTimeout(() => tr.classList.remove('flash'), 600);
}

function clearBlotter() {
  view.positions.clear();
  view.trades.clear();
  $('#positions tbody').replaceChildren();
  $('#trades tbody').replaceChildren();
}

// ------------------------------------------------------------------ NATS

let nc = null;
let subs = [];

function natsUrl(configured) {
  const given = params.get('nats');
  if (given) return given;
  if (/^wss?:\/\//.test(configured)) return configured;
  // A path on this page's origin, ws or wss following the page.
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${configured}`;
}

function subscribeBlotter(account) {
  for (const s of subs) s.unsubscribe();
  subs = [];
  clearBlotter();
  view.subjects = [];
  const notes = [];
  for (const r of blotterRoutes(view.bridge.routes)) {
    const subject = subjectFor(r.subject, account);
    if (!subject) {
      notes.push(`${r.name} needs an account`);
      continue;
    }
    const upsert = r.type === 'Position' ? upsertPosition : upsertTrade;
    view.subjects.push(subject);
    subs.push(nc.subscribe(subject, {
      callback: (err, m) => {
        if (err) return;
        let body;
        try {
          body = json.decode(m.data);
        } catch (_) {
          view.rejected += 1;
          return;
        }
        if (upsert(payloadOf(body, r.type))) view.received += 1;
        else view.rejected += 1;
      },
    }));
  }
  $('#subjects').textContent = `subscribed: ${view.subjects.join(', ') || 'nothing'}${notes.length ? `; ${notes.join('; ')}` : ''}`;
}

function showNats() {
  const el = $('#nats-status');
  if (view.natsState === 'connected') {
    setBadge(el, 'ok', `NATS WebSocket: connected to ${view.natsServer}`);
  } else if (view.natsState === 'reconnecting') {
    setBadge(el, 'connecting', 'NATS WebSocket: reconnecting');
  } else if (view.natsState === 'connecting') {
    setBadge(el, 'connecting', `NATS WebSocket: connecting to ${view.natsUrl}`);
  } else {
    setBadge(el, 'down', `NATS WebSocket: ${view.natsState}`);
  }
  $('#reconnects').textContent = String(view.reconnects);
  $('#gaps').textContent = String(view.gaps.length);
}

function learnServer() {
  view.natsServer = nc.info ? nc.info.server_name : null;
  view.connectUrls = (nc.info && nc.info.connect_urls) || [];
}

// The connection was lost: what arrived meanwhile is gone (NATS core keeps
// no history), so every row shown is marked until it is updated again.
function gapStarted() {
  view.gaps.push({ from: Date.now(), to: null });
  for (const { row: tr } of [...view.positions.values(), ...view.trades.values()]) {
    tr.classList.add('stale');
  }
}

function gapEnded() {
  const gap = view.gaps[view.gaps.length - 1];
  if (!gap || gap.to) return;
  gap.to = Date.now();
  const banner = $('#gap-banner');
  banner.hidden = false;
  banner.textContent = `The NATS WebSocket connection was lost from ${time(gap.from)} to ${time(gap.to)}: `
    + 'updates published meanwhile were missed. Rows in grey have not been updated since; '
    + 'reload the blotter from position-service for the full state.';
}

async function watchStatus() {
  for await (const s of nc.status()) {
    if (s.type === 'disconnect') {
      view.disconnects += 1;
      view.natsState = 'reconnecting';
      gapStarted();
    } else if (s.type === 'reconnect') {
      view.reconnects += 1;
      view.natsState = 'connected';
      learnServer();
      gapEnded();
    } else if (s.type === 'reconnecting') {
      view.natsState = 'reconnecting';
    }
    showNats();
  }
}

async function startNats() {
  view.natsUrl = natsUrl(view.bridge.nats_url);
  showNats();
  const ping = Number(params.get('ping'));
  nc = await connect({
    servers: [view.natsUrl],
    name: 'tradefeed-bridge-console',
    waitOnFirstConnect: true,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 1000,
    // Behind an ingress the host:port a cluster advertises cannot be reached.
    ignoreClusterUpdates: true,
    pingInterval: (ping > 0 ? ping : 25) * 1000,
  });
  view.natsState = 'connected';
  learnServer();
  showNats();
  watchStatus().catch(() => {});
  nc.closed().then((err) => {
    view.natsState = err ? `closed (${err.message})` : 'closed';
    showNats();
  });
  subscribeBlotter(currentAccount());
}

function currentAccount() {
  const v = $('#account').value.trim();
  return /^[A-Za-z0-9_-]+$/.test(v) ? v : '';
}

// ------------------------------------------------------------------ start

async function main() {
  $('#account').value = params.get('account') || '';
  $('#account-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const account = currentAccount();
    const url = new URL(location.href);
    if (account) url.searchParams.set('account', account);
    else url.searchParams.delete('account');
    history.replaceState(null, '', url);
    if (nc) subscribeBlotter(account);
  });

  while (!view.bridge) {
    await pollState();
    if (!view.bridge) await new Promise((r) => setTimeout(r, STATE_POLL_MS));
  }
  setInterval(pollState, STATE_POLL_MS);
  await startNats();
}

main().catch((e) => {
  view.natsState = `failed (${e.message})`;
  showNats();
});
