"""NATS test agent (nats-py, asyncio).

Protocol in tests/agents/README.md: JSON commands on stdin, JSON events on
stdout, one object per line; commands run one at a time, in order.
Diagnostics go to stderr.

Library note: nats-py hands received headers over as a dict of str -> str,
so a header repeated in one message shows up once (its last value).
"""

import asyncio
import base64
import json
import os
import sys
import time

import nats


def out(obj):
    obj["t"] = int(time.time() * 1000)
    try:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        os._exit(0)


def diag(msg):
    sys.stderr.write(f"nats_agent: {msg}\n")
    sys.stderr.flush()


class Agent:
    def __init__(self):
        self.nc = None
        self.subs = {}  # sid -> Subscription

    def _need_conn(self):
        if self.nc is None or self.nc.is_closed:
            raise RuntimeError("not connected")
        return self.nc

    async def connect(self, c):
        if self.nc is not None and not self.nc.is_closed:
            raise RuntimeError("already connected")

        async def disconnected_cb():
            out({"ev": "disconnected"})

        async def reconnected_cb():
            out({"ev": "reconnected"})

        async def error_cb(e):
            diag(f"error: {e!r}")

        opts = {
            "servers": c.get("servers") or ["nats://127.0.0.1:4222"],
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "error_cb": error_cb,
        }
        if c.get("name") is not None:
            opts["name"] = c["name"]
        # Optional extras (not in the README): reconnect tuning for restart tests.
        max_attempts = c.get("maxReconnectAttempts")
        time_wait = c.get("reconnectTimeWait")
        # nats-py retries the *first* connect with the reconnect budget
        # (60 x 2 s by default) before failing. Like the other agents' clients,
        # fail fast instead: try each server (twice, without waiting), then
        # put the reconnect settings in force once connected.
        opts["max_reconnect_attempts"] = 1
        opts["reconnect_time_wait"] = 0
        nc = await nats.connect(**opts)
        nc.options["max_reconnect_attempts"] = (
            max_attempts if max_attempts is not None
            else nats.aio.client.DEFAULT_MAX_RECONNECT_ATTEMPTS)
        nc.options["reconnect_time_wait"] = (
            time_wait / 1000.0 if time_wait is not None
            else nats.aio.client.DEFAULT_RECONNECT_TIME_WAIT)
        self.nc = nc
        self.subs.clear()

    async def sub(self, c):
        nc = self._need_conn()
        sid, subject = c.get("sid"), c.get("subject")
        if not isinstance(sid, str) or not isinstance(subject, str):
            raise ValueError("sub: sid and subject are required")
        if sid in self.subs:
            raise ValueError(f"sub: sid {sid} already in use")

        async def cb(msg):
            ev = {
                "ev": "msg",
                "sid": sid,
                "subject": msg.subject,
                "data": msg.data.decode("utf-8", errors="replace"),
                "b64": base64.b64encode(msg.data).decode("ascii"),
            }
            if msg.headers:
                ev["headers"] = {k: [v] for k, v in msg.headers.items()}
            out(ev)

        self.subs[sid] = await nc.subscribe(subject, queue=c.get("queue") or "", cb=cb)
        await nc.flush()

    async def unsub(self, c):
        nc = self._need_conn()
        sub = self.subs.pop(c.get("sid"), None)
        if sub is None:
            raise ValueError(f"unsub: unknown sid {c.get('sid')}")
        await sub.unsubscribe()
        await nc.flush()

    async def pub(self, c):
        nc = self._need_conn()
        subject = c.get("subject")
        if not isinstance(subject, str):
            raise ValueError("pub: subject is required")
        if isinstance(c.get("b64"), str):
            data = base64.b64decode(c["b64"])
        else:
            data = str(c.get("data", "")).encode("utf-8")
        hdrs = None
        if isinstance(c.get("headers"), dict):
            hdrs = {}
            for k, v in c["headers"].items():
                # nats-py takes one value per key; a list keeps its last value.
                hdrs[k] = str(v[-1] if isinstance(v, list) and v else v)
        await nc.publish(subject, data, headers=hdrs)
        await nc.flush()

    async def close(self):
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception as e:  # noqa: BLE001
                diag(f"close: {e!r}")

    async def handle(self, line):
        """Returns False when the agent must exit."""
        if not line.strip():
            return True
        try:
            c = json.loads(line)
        except ValueError as e:
            out({"ev": "error", "seq": None, "message": f"bad JSON: {e}"})
            return True
        seq = c.get("seq") if isinstance(c, dict) else None
        try:
            cmd = c.get("cmd")
            if cmd == "exit":
                await self.close()
                out({"ev": "ok", "seq": seq})
                return False
            handler = {"connect": self.connect, "sub": self.sub,
                       "unsub": self.unsub, "pub": self.pub}.get(cmd)
            if handler is None:
                raise ValueError(f"unknown command {cmd!r}")
            await handler(c)
            out({"ev": "ok", "seq": seq})
        except Exception as e:  # noqa: BLE001
            msg = str(e) or type(e).__name__
            out({"ev": "error", "seq": seq, "message": msg})
        return True


async def main():
    agent = Agent()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            diag("stdin closed, exiting")
            await agent.close()
            break
        if not await agent.handle(line):
            break


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)
