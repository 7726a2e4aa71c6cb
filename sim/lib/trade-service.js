// The trade-service side: publishes TradeOrders, on the legacy hub
// (`publish` on /trades, as TraderX's Java trade-service does) or on NATS
// (`trades.new`, the state 006 envelope). Every order carries a unique id so
// that doubles can be told apart.
'use strict';

const c = require('./common');

class TradeService {
  /**
   * opts: legacyUrl, legacyPath, natsUrl, subjectMap, runId, seed, accounts
   * (the accounts orders are for; default the fixed set),
   * retryUnconsumed (NATS: publish again an order the server reports no
   * consumer for, which is safe because nobody got it), retryFor (ms).
   */
  constructor(opts) {
    this.o = { legacyPath: '/socket.io', subjectMap: 'spec', runId: 'T', seed: 1, retryFor: 30000, accounts: c.ACCOUNTS, ...opts };
    this.s = c.subjects(this.o.subjectMap);
    this.rand = c.rng(Number(this.o.seed));
    this.bus = null;
    this.legacy = null;
    this.nc = null;
    this.inbox = null;
    this.next = 0;
    this.sent = {}; // id -> [bus, t]
    this.unconsumed = {}; // id -> times the server reported no consumer
    this.retried = 0;
    this.lost = []; // ids given up on
    this.waiting = new Map(); // id -> first no-responders time, while retrying
    this.switches = [];
    this.sentBy = { legacy: 0, nats: 0 };
  }

  async connect(bus) {
    if (bus === 'legacy' && !this.legacy) {
      if (!this.o.legacyUrl) throw new Error('trade-service: no legacy URL');
      this.legacy = await c.legacyConnect(this.o.legacyUrl, { path: this.o.legacyPath, name: 'trade-service' });
    }
    if (bus === 'nats' && !this.nc) {
      if (!this.o.natsUrl) throw new Error('trade-service: no NATS URL');
      this.nc = await c.natsConnect(this.o.natsUrl, 'trade-service');
      // Orders go out with a reply subject on this inbox: the server answers
      // it with a 503 status when no consumer (queue member) exists.
      this.inbox = c.nats.createInbox();
      this.nc.subscribe(`${this.inbox}.*`, { callback: (err, m) => this.onReply(err, m) });
      await this.nc.flush();
    }
  }

  async start(bus) {
    await this.connect(bus);
    this.bus = bus;
  }

  order(n) {
    const r = this.rand;
    return {
      id: `${this.o.runId}-${n}`,
      state: 'New',
      security: c.SECURITIES[Math.floor(r() * c.SECURITIES.length)],
      quantity: (1 + Math.floor(r() * 10)) * 10,
      accountId: this.o.accounts[Math.floor(r() * this.o.accounts.length)],
      side: r() < 0.5 ? 'Buy' : 'Sell',
    };
  }

  publishOn(bus, order, n) {
    if (bus === 'legacy') {
      this.legacy.socket.emit('publish', { topic: c.TOPICS.orders, type: 'TradeOrder', payload: order });
    } else {
      this.nc.publish(this.s.orders, c.envelope('TradeOrder', 'trade-service', this.s.orders, order), {
        reply: `${this.inbox}.${n}`,
      });
    }
  }

  onReply(err, m) {
    if (err || !m.headers || m.headers.code !== 503) return;
    const n = Number(m.subject.slice(this.inbox.length + 1));
    const id = `${this.o.runId}-${n}`;
    this.unconsumed[id] = (this.unconsumed[id] || 0) + 1;
    if (!this.o.retryUnconsumed) return;
    const first = this.waiting.get(id) || c.now();
    if (c.now() - first > this.o.retryFor) {
      this.waiting.delete(id);
      this.lost.push(id);
      return;
    }
    this.waiting.set(id, first);
    setTimeout(async () => {
      this.retried++;
      const order = this.orders[n];
      if (this.bus === 'nats') {
        // The server answers "no responders" while it handles the publish,
        // so before the flush's reply: none by then means a consumer got it.
        const before = this.unconsumed[id];
        this.publishOn('nats', order, n);
        await this.nc.flush();
        if (this.unconsumed[id] === before) this.waiting.delete(id);
      } else {
        // moved back to legacy meanwhile: hand it to the hub instead
        this.publishOn('legacy', order, n);
        this.sent[id] = ['legacy', this.sent[id][1]];
        this.waiting.delete(id);
      }
    }, 20);
  }

  /**
   * Publishes `count` orders at `rate` per second; resolves when all are sent.
   * `switchAt` = {n: order number, to: bus} switches the bus in the middle.
   */
  async run({ count, rate = 500, switchAt = [] }) {
    this.orders = this.orders || {};
    const first = this.next;
    const t0 = c.now();
    const plan = [...switchAt].sort((a, b) => a.n - b.n);
    this.stopping = false;
    while (this.next < first + count && !this.stopping) {
      if (plan.length && this.next - first >= plan[0].n) {
        await this.switchTo(plan.shift().to);
        continue;
      }
      const due = Math.min(first + count, first + Math.floor(((c.now() - t0) / 1000) * rate) + 1);
      const stop = plan.length ? Math.min(due, first + plan[0].n) : due;
      while (this.next < stop) {
        const n = this.next++;
        const order = this.order(n);
        this.orders[n] = order;
        this.sent[order.id] = [this.bus, Math.round(c.now() * 1000) / 1000];
        this.sentBy[this.bus]++;
        this.publishOn(this.bus, order, n);
      }
      if (this.next < first + count) await c.sleep(5);
    }
    await this.settle();
    return { sent: this.next - first, took_ms: Math.round(c.now() - t0) };
  }

  /** Ends the run in progress after the order being sent; the run then settles and answers. */
  stop() {
    this.stopping = true;
    return {};
  }

  /** Waits until everything sent is with the hub / the NATS server (and retries are done). */
  async settle(timeout = 60000) {
    if (this.legacy) await this.legacy.barrier();
    if (this.nc) await this.nc.flush();
    await c.until('retried orders to find a consumer', () => this.waiting.size === 0, timeout, 10);
  }

  /**
   * Moves to the other bus while orders keep coming: new orders go to `to`
   * at once; the old connection is closed only after a round trip shows that
   * everything sent on it has arrived.
   */
  async switchTo(to) {
    const from = this.bus;
    const t0 = c.now();
    if (from === to) return { took_ms: 0 };
    await this.connect(to);
    this.bus = to;
    if (from === 'legacy' && this.legacy) {
      await this.legacy.barrier();
      this.legacy.close();
      this.legacy = null;
    } else if (from === 'nats' && this.nc) {
      await this.nc.flush();
      await c.until('retried orders to find a consumer', () => this.waiting.size === 0, this.o.retryFor + 5000, 10);
      const nc = this.nc;
      this.nc = null;
      await nc.drain();
    }
    const took = Math.round((c.now() - t0) * 10) / 10;
    const sw = { from, to, at_order: this.next, started_at: Math.round(t0), took_ms: took };
    this.switches.push(sw);
    return sw;
  }

  report() {
    return {
      role: 'trade-service',
      bus: this.bus,
      sent: this.next,
      sent_by_bus: this.sentBy,
      orders: this.sent,
      unconsumed: this.unconsumed,
      retried: this.retried,
      lost: this.lost,
      switches: this.switches,
    };
  }

  async close() {
    if (this.legacy) this.legacy.close();
    if (this.nc) await this.nc.drain().catch(() => {});
  }
}

module.exports = { TradeService };
