"""Socket.IO test agent (python-socketio 5.x, synchronous client).

Protocol in tests/agents/README.md: JSON commands on stdin, JSON events on
stdout, one object per line. Diagnostics go to stderr.

Library notes:
- The Engine.IO upgrade (polling -> websocket) happens inside connect(),
  before the Socket.IO CONNECT packet is answered, so "upgraded" comes
  *before* "connected", and "connected" then reports transport "websocket".
  python-engineio only reports the upgrade in its log ("WebSocket upgrade was
  successful"); the agent turns that log record into the "upgraded" event.
- connect() blocks, so it runs in a worker thread; "ok" is written first.
- emit() while not connected fails (the JS client would buffer it).
- disconnect() can block for up to ~30 s (an Engine.IO write-loop race), so
  "disconnect" and "exit" wait for it at most 2 s.
"""

import json
import logging
import os
import random
import sys
import threading
import time

import socketio

_out_lock = threading.Lock()


def _json_default(o):
    # Binary event arguments: same shape as Node's JSON.stringify(Buffer).
    if isinstance(o, (bytes, bytearray)):
        return {"type": "Buffer", "data": list(o)}
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def out(obj):
    obj["t"] = int(time.time() * 1000)
    line = json.dumps(obj, separators=(",", ":"), default=_json_default) + "\n"
    with _out_lock:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            os._exit(0)


def diag(msg):
    sys.stderr.write(f"sio_agent: {msg}\n")
    sys.stderr.flush()


class _UpgradeReporter(logging.Handler):
    """Turns python-engineio's upgrade log record into an "upgraded" event."""

    def emit(self, record):
        if record.getMessage() == "WebSocket upgrade was successful":
            out({"ev": "upgraded", "transport": "websocket"})


def _engineio_logger():
    lg = logging.getLogger("sio_agent.engineio")
    if not lg.handlers:
        lg.setLevel(logging.INFO)
        lg.propagate = False
        lg.addHandler(_UpgradeReporter(level=logging.INFO))
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        lg.addHandler(err)
    return lg


class Connection:
    def __init__(self, c):
        url = c.get("url")
        if not isinstance(url, str):
            raise ValueError("connect: url is required")
        self.url = url
        self.ns = c.get("namespace") or "/"
        self.path = c.get("path") or "/socket.io"
        self.transports = c.get("transports")  # None = library default
        self.reconnection = c.get("reconnection", True) is not False
        self.headers = dict(c.get("headers") or {})
        self.topics = list(c.get("subscribeOnConnect") or [])
        self.closed = False
        self.error_reported = False
        self._stop = threading.Event()

        ws_opts = {}
        if any(k.lower() == "origin" for k in self.headers):
            # websocket-client adds its own Origin unless told not to; without
            # this the handshake would carry two Origin headers.
            ws_opts["suppress_origin"] = True
        self.sio = socketio.Client(
            reconnection=self.reconnection,
            logger=False,
            engineio_logger=_engineio_logger(),
            websocket_extra_options=ws_opts,
        )
        ns = self.ns
        self.sio.on("connect", self._on_connect, namespace=ns)
        self.sio.on("connect_error", self._on_connect_error, namespace=ns)
        self.sio.on("disconnect", self._on_disconnect, namespace=ns)
        self.sio.on("*", self._on_any, namespace=ns)

    # -- handlers (run on the client's threads) --
    def _on_connect(self):
        if self.closed:
            return
        out({"ev": "connected", "id": self.sio.get_sid(self.ns),
             "transport": self.sio.transport()})
        for topic in self.topics:
            self.sio.emit("subscribe", (topic,), namespace=self.ns)

    def _on_connect_error(self, data=None):
        self.error_reported = True
        if isinstance(data, dict) and "message" in data:
            msg = data["message"]
        else:
            msg = data
        out({"ev": "connect_error", "message": str(msg)})

    def _on_disconnect(self, reason=None):
        out({"ev": "disconnected", "reason": str(reason)})

    def _on_any(self, event, *args):
        out({"ev": "event", "event": event, "args": list(args)})

    # -- commands --
    def start(self):
        threading.Thread(target=self._run, name="sio-connect", daemon=True).start()

    def _run(self):
        # The first connect is retried here rather than with connect(retry=True):
        # that loop cannot be stopped reliably by a "disconnect" that arrives
        # while it starts. Same delays as the library's reconnect loop. Once
        # connected, the library's own reconnect task takes over.
        sio = self.sio
        delay = sio.reconnection_delay
        while not self.closed:
            self.error_reported = False
            try:
                sio.connect(
                    self.url,
                    headers=self.headers,
                    transports=self.transports,
                    namespaces=[self.ns],
                    socketio_path=self.path,
                    wait_timeout=5,
                )
            except Exception as e:  # noqa: BLE001
                diag(f"connect failed: {e}")
                if not self.error_reported and not self.closed:
                    out({"ev": "connect_error", "message": str(e)})
                if not self.reconnection:
                    return
                wait = min(delay, sio.reconnection_delay_max)
                wait += sio.randomization_factor * (2 * random.random() - 1)
                delay *= 2
                if self._stop.wait(max(wait, 0)):
                    return
                continue
            if self.closed:
                sio.disconnect()
            return

    def emit(self, event, args, ack_seq=None):
        callback = None
        if ack_seq is not None:
            def callback(*ack_args):
                out({"ev": "ack", "seq": ack_seq, "args": list(ack_args)})
        self.sio.emit(event, tuple(args), namespace=self.ns, callback=callback)

    def close(self):
        self.closed = True
        self._stop.set()  # ends our first-connect retry loop
        # python-engineio's disconnect() can block for up to ~30 s: its write
        # loop may take the close marker before the state changes, then wait
        # for the next packet. The socket itself is closed at once, and the
        # "disconnected" event comes before that wait, so don't block on it.
        t = threading.Thread(target=self._shutdown, name="sio-close", daemon=True)
        t.start()
        t.join(2.0)
        if t.is_alive():
            diag("library disconnect still finishing in the background")

    def _shutdown(self):
        sio = self.sio
        try:
            sio.shutdown()  # disconnects, or stops the library's reconnect task
            if sio.eio.state == "connected":  # mid-connect: engine up, namespace not yet
                sio.disconnect()
        except Exception as e:  # noqa: BLE001
            diag(f"shutdown: {e}")


def _iteration(c, i, base, results):
    """One fresh connection of "iterate": subscribe and publish from the
    connect handler (python-socketio refuses to emit before connect() is
    done), wait for the join notice, the ack (when asked) and the echo."""
    topic = c["topic"]
    want_ack = c.get("ack") is True or (c.get("ack") == "alternate" and i % 2 == 0)
    echo = c.get("echo", True) is not False
    timeout = (c.get("timeoutMs") or 15000) / 1000.0
    rec = {"ev": "iteration", "i": i}
    state = {"joined": False, "acked": not want_ack, "echoed": not echo}
    done = threading.Event()
    t0 = time.monotonic()
    sio = socketio.Client(reconnection=False, logger=False, engineio_logger=False)
    payload = dict(base)
    payload["i"] = i

    def check():
        if state["joined"] and state["acked"] and state["echoed"]:
            done.set()

    def on_ack(*args):
        rec["ack"] = list(args)
        rec["ackMs"] = int((time.monotonic() - t0) * 1000)
        state["acked"] = True
        check()

    def on_connect():
        rec["id"] = sio.get_sid("/")
        rec["connectMs"] = int((time.monotonic() - t0) * 1000)
        rec["transport"] = sio.transport()
        sio.emit("subscribe", (topic,))
        msg = {"topic": topic, "type": c.get("type") or "TradeOrder", "payload": payload}
        sio.emit("publish", (msg,), callback=on_ack if want_ack else None)

    def on_publish(env=None, *rest):
        if not isinstance(env, dict):
            return
        p = env.get("payload")
        if env.get("from") == "System":
            sid = rec.get("id")
            if sid and isinstance(p, dict) and p.get("message") == f"New Joiner {sid} to topic {topic}":
                state["joined"] = True
        elif isinstance(p, dict) and p.get("i") == i and all(p.get(k) == v for k, v in base.items()):
            rec["echo"] = env
            state["echoed"] = True
        check()

    def on_disconnect(reason=None):
        if not done.is_set():
            rec.setdefault("error", f"disconnected: {reason}")
            done.set()

    sio.on("connect", on_connect)
    sio.on("publish", on_publish)
    sio.on("disconnect", on_disconnect)
    try:
        sio.connect(
            c["url"],
            transports=c.get("transports"),
            namespaces=["/"],
            socketio_path=c.get("path") or "/socket.io",
            wait_timeout=timeout,
        )
        if not done.wait(timeout):
            missing = [n for n, k in (("join notice", "joined"), ("ack", "acked"), ("echo", "echoed"))
                       if not state[k]]
            rec["error"] = "timeout waiting for " + ", ".join(missing)
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"connect_error: {e}"
    rec["ms"] = int((time.monotonic() - t0) * 1000)
    out(rec)
    results.append("error" not in rec)
    # python-engineio's disconnect() can block (see Connection.close): don't wait long
    t = threading.Thread(target=sio.disconnect, name="iter-close", daemon=True)
    t.start()
    t.join(2.0)


def iterate(c):
    if not isinstance(c.get("url"), str) or not isinstance(c.get("topic"), str):
        raise ValueError("iterate: url and topic are required")
    count = int(c.get("count") or 0)
    concurrency = max(1, int(c.get("concurrency") or 1))
    base = dict(c.get("payload") or {})
    lock = threading.Lock()
    counter = {"next": 0}
    results = []

    def worker():
        while True:
            with lock:
                i = counter["next"]
                if i >= count:
                    return
                counter["next"] = i + 1
            _iteration(c, i, base, results)

    def run():
        workers = [threading.Thread(target=worker, name=f"iter-{k}", daemon=True)
                   for k in range(concurrency)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out({"ev": "iterated", "count": count, "failed": results.count(False)})

    threading.Thread(target=run, name="iterate", daemon=True).start()


conn = None


def handle(line):
    global conn
    if not line.strip():
        return
    try:
        c = json.loads(line)
    except ValueError as e:
        out({"ev": "error", "seq": None, "message": f"bad JSON: {e}"})
        return
    seq = c.get("seq") if isinstance(c, dict) else None
    try:
        cmd = c.get("cmd")
        if cmd == "connect":
            if conn is not None:
                conn.close()
            conn = Connection(c)
            out({"ev": "ok", "seq": seq})
            conn.start()
            return
        if cmd == "emit":
            if conn is None:
                raise RuntimeError("emit: not connected (no connect command yet)")
            event = c.get("event")
            if not isinstance(event, str):
                raise ValueError("emit: event is required")
            conn.emit(event, c.get("args") or [], seq if c.get("ack") else None)
        elif cmd == "iterate":
            iterate(c)
        elif cmd == "disconnect":
            if conn is not None:
                conn.close()
        elif cmd == "exit":
            if conn is not None:
                conn.close()
            out({"ev": "ok", "seq": seq})
            os._exit(0)
        else:
            raise ValueError(f"unknown command {cmd!r}")
        out({"ev": "ok", "seq": seq})
    except Exception as e:  # noqa: BLE001
        out({"ev": "error", "seq": seq, "message": str(e) or type(e).__name__})


def main():
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        handle(line)
    diag("stdin closed, exiting")
    if conn is not None:
        conn.close()
    os._exit(0)


if __name__ == "__main__":
    main()
