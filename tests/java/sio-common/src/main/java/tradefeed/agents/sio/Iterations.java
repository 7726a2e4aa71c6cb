package tradefeed.agents.sio;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.socket.client.IO;
import io.socket.client.Socket;
import org.json.JSONObject;
import tradefeed.agents.common.AgentIO;

import java.net.URI;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * The {@code iterate} command (tests/agents/README.md): {@code count} fresh
 * connections, {@code concurrency} at a time. Each emits {@code subscribe} and
 * {@code publish} right after {@code connect()} (io.socket buffers them and
 * sends them the moment CONNECT is answered), waits for its join notice, its
 * ack when asked and its own publish coming back through the room when
 * {@code echo}, then disconnects and writes one {@code iteration} event.
 */
final class Iterations implements Runnable {
    private final JsonNode c;
    private final String url;
    private final String topic;
    private final String type;
    private final int count;
    private final int concurrency;
    private final boolean echo;
    private final long timeoutMs;
    private final String ackMode;
    private final JSONObject base;
    private final ScheduledExecutorService timers = Executors.newSingleThreadScheduledExecutor(r -> {
        Thread t = new Thread(r, "iterate-timers");
        t.setDaemon(true);
        return t;
    });

    Iterations(JsonNode c) {
        this.c = c;
        this.url = AgentIO.requireText(c, "url");
        this.topic = AgentIO.requireText(c, "topic");
        this.type = AgentIO.text(c, "type", "TradeOrder");
        this.count = c.path("count").asInt(0);
        this.concurrency = Math.max(1, c.path("concurrency").asInt(1));
        this.echo = !c.has("echo") || c.get("echo").asBoolean(true);
        this.timeoutMs = c.path("timeoutMs").asLong(15000);
        JsonNode ack = c.get("ack");
        this.ackMode = ack == null || ack.isNull() ? "false" : ack.asText();
        JsonNode payload = c.get("payload");
        this.base = payload != null && payload.isObject() ? (JSONObject) OrgJson.fromJson(payload) : new JSONObject();
    }

    private boolean wantAck(int i) {
        return "true".equals(ackMode) || ("alternate".equals(ackMode) && i % 2 == 0);
    }

    @Override
    public void run() {
        Semaphore slots = new Semaphore(concurrency);
        AtomicInteger failed = new AtomicInteger();
        try {
            for (int i = 0; i < count; i++) {
                slots.acquire();
                start(i, slots, failed);
            }
            slots.acquire(concurrency); // every iteration finished
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return;
        } catch (Exception e) {
            AgentIO.log("iterate: " + AgentIO.describe(e));
        }
        ObjectNode ev = AgentIO.event("iterated");
        ev.put("count", count);
        ev.put("failed", failed.get());
        AgentIO.write(ev);
        timers.shutdownNow();
    }

    private boolean mine(Object arg, int i) {
        if (!(arg instanceof JSONObject)) {
            return false;
        }
        JSONObject env = (JSONObject) arg;
        JSONObject p = env.optJSONObject("payload");
        if ("System".equals(env.optString("from")) || p == null || p.optInt("i", -1) != i) {
            return false;
        }
        Iterator<String> keys = base.keys();
        while (keys.hasNext()) {
            String k = keys.next();
            if (!String.valueOf(base.opt(k)).equals(String.valueOf(p.opt(k)))) {
                return false;
            }
        }
        return true;
    }

    private void start(int i, Semaphore slots, AtomicInteger failed) throws Exception {
        long t0 = System.nanoTime();
        ObjectNode rec = AgentIO.event("iteration");
        rec.put("i", i);
        boolean ack = wantAck(i);
        AtomicBoolean joined = new AtomicBoolean(false);
        AtomicBoolean acked = new AtomicBoolean(!ack);
        AtomicBoolean echoed = new AtomicBoolean(!echo);
        AtomicBoolean finished = new AtomicBoolean(false);

        IO.Options options = new IO.Options();
        options.forceNew = true;
        options.reconnection = false;
        options.path = AgentIO.text(c, "path", "/socket.io");
        JsonNode transports = c.get("transports");
        if (transports != null && transports.isArray()) {
            List<String> t = new ArrayList<>();
            transports.forEach(x -> t.add(x.asText()));
            options.transports = t.toArray(new String[0]);
        }
        Socket s = IO.socket(URI.create(url), options);

        java.util.function.Consumer<String> done = err -> {
            if (!finished.compareAndSet(false, true)) {
                return;
            }
            ObjectNode copy;
            synchronized (rec) {
                if (err != null) {
                    rec.put("error", err);
                    failed.incrementAndGet();
                }
                rec.put("ms", (System.nanoTime() - t0) / 1_000_000);
                copy = rec.deepCopy();
            }
            s.disconnect();
            AgentIO.write(copy);
            slots.release();
        };
        Runnable check = () -> {
            if (joined.get() && acked.get() && echoed.get()) {
                done.accept(null);
            }
        };
        s.on(Socket.EVENT_CONNECT, args -> {
            synchronized (rec) {
                rec.put("id", s.id());
                rec.put("connectMs", (System.nanoTime() - t0) / 1_000_000);
            }
        });
        s.on(Socket.EVENT_CONNECT_ERROR, args -> done.accept("connect_error: " + (args.length > 0 ? args[0] : "")));
        s.on("error", args -> {
            if (!s.connected()) {
                done.accept("connect_error: " + (args.length > 0 ? args[0] : ""));
            }
        });
        s.on(Socket.EVENT_DISCONNECT, args -> done.accept("disconnected: " + (args.length > 0 ? args[0] : "")));
        s.on("publish", args -> {
            Object env = args.length > 0 ? args[0] : null;
            if (env instanceof JSONObject && "System".equals(((JSONObject) env).optString("from"))) {
                JSONObject p = ((JSONObject) env).optJSONObject("payload");
                String id = s.id();
                if (p != null && id != null && ("New Joiner " + id + " to topic " + topic).equals(p.optString("message"))) {
                    joined.set(true);
                }
            } else if (mine(env, i)) {
                synchronized (rec) {
                    rec.set("echo", OrgJson.toJson(env));
                }
                echoed.set(true);
            }
            check.run();
        });
        timers.schedule(() -> {
            List<String> missing = new ArrayList<>();
            if (!joined.get()) {
                missing.add("join notice");
            }
            if (!acked.get()) {
                missing.add("ack");
            }
            if (!echoed.get()) {
                missing.add("echo");
            }
            done.accept("timeout waiting for " + String.join(", ", missing));
        }, timeoutMs, TimeUnit.MILLISECONDS);

        JSONObject payload = new JSONObject(base.toString());
        payload.put("i", i);
        JSONObject msg = new JSONObject();
        msg.put("topic", topic);
        msg.put("type", type);
        msg.put("payload", payload);
        s.connect();
        s.emit("subscribe", topic);
        if (ack) {
            s.emit("publish", new Object[] {msg}, ackArgs -> {
                synchronized (rec) {
                    rec.set("ack", OrgJson.argsToJson(ackArgs, 0));
                    rec.put("ackMs", (System.nanoTime() - t0) / 1_000_000);
                }
                acked.set(true);
                check.run();
            });
        } else {
            s.emit("publish", msg);
        }
    }
}
