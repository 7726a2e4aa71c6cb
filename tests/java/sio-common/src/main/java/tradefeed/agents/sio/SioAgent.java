package tradefeed.agents.sio;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.socket.client.Ack;
import io.socket.client.IO;
import io.socket.client.Manager;
import io.socket.client.Socket;
import io.socket.engineio.client.Transport;
import io.socket.thread.EventThread;
import org.json.JSONObject;
import tradefeed.agents.common.AgentIO;

import java.lang.reflect.Field;
import java.net.URI;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * The Socket.IO agent of tests/agents/README.md on the io.socket Java client.
 * This source is compiled twice, against socket.io-client 2.1.x and 1.0.x;
 * it uses only what both versions offer, and each version's main class fills
 * in the rest (request headers, catch-all for incoming events, errors).
 */
public abstract class SioAgent implements AgentIO.Handler {

    /** The socket of the last {@code connect}; null before the first. */
    private volatile Socket socket;
    /** Its transport watch. */
    private volatile TransportWatch watch;

    /**
     * Request headers for every HTTP request and the WebSocket handshake, set
     * through the options (before the socket exists) where the version can.
     */
    protected void applyHeaders(IO.Options options, Map<String, List<String>> headers) {
    }

    /** Request headers set through the Manager's events, where the version needs that. */
    protected void hookHeaders(Manager manager, Map<String, List<String>> headers) {
    }

    /** Reports every event the server sends on this socket as an {@code event} line. */
    protected abstract void installCatchAll(Socket socket, Manager manager, String namespace);

    /** Listeners for the version's own error events (connect_error and kin). */
    protected abstract void installErrorListeners(Socket socket);

    /**
     * Every command ends on the client's own event thread (io.socket.thread.EventThread),
     * where the library runs all its callbacks: {@code ok} is thus written before
     * any event the command causes (as with the single-threaded Node agent).
     */
    @Override
    public boolean handle(String cmd, JsonNode c, JsonNode seq) throws Exception {
        switch (cmd) {
            case "connect": {
                Socket old = socket;
                TransportWatch oldWatch = watch;
                Socket s = prepareConnect(c);
                if (oldWatch != null) {
                    oldWatch.retired = true;
                }
                onEventThread(() -> {
                    AgentIO.ok(seq);
                    if (old != null) {
                        old.disconnect(); // one socket at a time
                    }
                    s.connect();
                });
                return false;
            }
            case "emit": {
                Runnable emit = prepareEmit(c, seq);
                onEventThread(() -> {
                    try {
                        emit.run(); // only queues the packet: replies are handled after this task
                    } catch (RuntimeException e) {
                        AgentIO.error(seq, AgentIO.describe(e)); // e.g. 2.x refuses reserved event names
                        return;
                    }
                    AgentIO.ok(seq);
                });
                return false;
            }
            case "iterate": {
                Thread t = new Thread(new Iterations(c), "iterate");
                t.setDaemon(true);
                t.start();
                return true;
            }
            case "disconnect": {
                Socket s = socket;
                retireWatch();
                onEventThread(() -> {
                    AgentIO.ok(seq);
                    if (s != null) {
                        s.disconnect(); // "disconnected" is written synchronously, after the ok
                    }
                });
                return false;
            }
            default:
                throw new IllegalArgumentException("unknown command '" + cmd + "'");
        }
    }

    /**
     * A socket closed by the agent may still finish an Engine.IO upgrade it had
     * begun (1.x closes only after the probe ends): that is not reported.
     */
    private void retireWatch() {
        TransportWatch w = watch;
        if (w != null) {
            w.retired = true;
        }
    }

    private static void onEventThread(Runnable task) throws InterruptedException {
        CountDownLatch done = new CountDownLatch(1);
        EventThread.exec(() -> {
            try {
                task.run();
            } catch (RuntimeException e) {
                AgentIO.log("command failed on the event thread: " + AgentIO.describe(e));
            } finally {
                done.countDown();
            }
        });
        if (!done.await(10, TimeUnit.SECONDS)) {
            AgentIO.log("the client's event thread did not run the command within 10 s");
        }
    }

    @Override
    public void shutdown() {
        Socket s = socket;
        if (s == null) {
            return;
        }
        CountDownLatch closed = new CountDownLatch(1);
        s.once(Socket.EVENT_DISCONNECT, args -> closed.countDown());
        boolean wasConnected = s.connected();
        s.disconnect();
        if (wasConnected) {
            try {
                // let the DISCONNECT packet and the Engine.IO close leave before the process ends
                closed.await(1, TimeUnit.SECONDS);
                Thread.sleep(100);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /** Builds the socket and its listeners; the caller connects it. */
    private Socket prepareConnect(JsonNode c) throws Exception {
        String url = AgentIO.requireText(c, "url");
        String path = AgentIO.text(c, "path", "/socket.io");
        String namespace = AgentIO.text(c, "namespace", "/");
        if (!namespace.startsWith("/")) {
            namespace = "/" + namespace;
        }
        JsonNode reconnection = c.get("reconnection");
        List<String> subscribeOnConnect = strings(c.get("subscribeOnConnect"), "subscribeOnConnect");

        IO.Options options = new IO.Options();
        options.forceNew = true; // a Manager of its own: IO.socket would otherwise reuse one per host, with its old options
        options.path = path;
        options.reconnection = reconnection == null || reconnection.isNull() || reconnection.asBoolean(true);
        JsonNode transports = c.get("transports");
        if (transports != null && !transports.isNull()) {
            options.transports = strings(transports, "transports").toArray(new String[0]);
        }

        // io.socket takes the namespace from the URL's path (as the Node agent does: url + namespace)
        URI uri = URI.create("/".equals(namespace) ? url : url.replaceAll("/+$", "") + namespace);

        Map<String, List<String>> headers = headers(c.get("headers"));
        if (!headers.isEmpty()) {
            applyHeaders(options, headers);
        }
        final Socket s = IO.socket(uri, options);
        final Manager manager = s.io();
        if (!headers.isEmpty()) {
            hookHeaders(manager, headers);
        }
        final String nsp = namespace;
        final TransportWatch watch = new TransportWatch(manager);
        this.watch = watch;

        s.on(Socket.EVENT_CONNECT, args -> {
            ObjectNode ev = AgentIO.event("connected");
            ev.put("id", s.id());
            ev.put("transport", watch.current());
            AgentIO.write(ev);
            for (String topic : subscribeOnConnect) {
                s.emit("subscribe", topic);
            }
        });
        s.on(Socket.EVENT_DISCONNECT, args -> {
            ObjectNode ev = AgentIO.event("disconnected");
            ev.put("reason", args.length > 0 && args[0] != null ? String.valueOf(args[0]) : "");
            AgentIO.write(ev);
        });
        installErrorListeners(s);
        installCatchAll(s, manager, nsp);

        socket = s;
        return s;
    }

    /** Checks and converts the arguments; the returned task emits. */
    private Runnable prepareEmit(JsonNode c, JsonNode seq) {
        String event = AgentIO.requireText(c, "event");
        JsonNode argsNode = c.get("args");
        List<Object> args = new ArrayList<>();
        if (argsNode != null && !argsNode.isNull()) {
            if (!argsNode.isArray()) {
                throw new IllegalArgumentException("field 'args' must be an array");
            }
            for (JsonNode a : argsNode) {
                args.add(OrgJson.fromJson(a));
            }
        }
        Socket s = socket;
        if (s == null) {
            throw new IllegalStateException("no socket: send connect first");
        }
        JsonNode ackNode = c.get("ack");
        Object[] a = args.toArray();
        if (ackNode != null && ackNode.asBoolean(false)) {
            Ack ack = ackArgs -> {
                ObjectNode ev = AgentIO.event("ack");
                ev.set("seq", seq);
                ev.set("args", OrgJson.argsToJson(ackArgs, 0));
                AgentIO.write(ev);
            };
            return () -> s.emit(event, a, ack);
        }
        return () -> s.emit(event, a);
    }

    /** Writes {@code {"ev":"event","event":name,"args":[...]}}. */
    protected static void reportEvent(String name, Object[] args, int from) {
        ObjectNode ev = AgentIO.event("event");
        ev.put("event", name);
        ArrayNode a = OrgJson.argsToJson(args, from);
        ev.set("args", a);
        AgentIO.write(ev);
    }

    /** Writes a {@code connect_error} line for the error object the library gives. */
    protected static void reportConnectError(Object err) {
        ObjectNode ev = AgentIO.event("connect_error");
        String message;
        if (err instanceof Throwable) {
            message = AgentIO.describe((Throwable) err);
        } else if (err instanceof JSONObject) {
            // a CONNECT_ERROR packet from the server: {"message": ...} (and maybe "data")
            JSONObject o = (JSONObject) err;
            message = o.optString("message", o.toString());
            ev.set("data", OrgJson.toJson(o));
        } else {
            message = String.valueOf(err);
        }
        ev.put("message", message);
        AgentIO.write(ev);
    }

    private static List<String> strings(JsonNode n, String field) {
        if (n == null || n.isNull()) {
            return Collections.emptyList();
        }
        if (!n.isArray()) {
            throw new IllegalArgumentException("field '" + field + "' must be an array of strings");
        }
        List<String> out = new ArrayList<>();
        for (JsonNode e : n) {
            out.add(e.asText());
        }
        return out;
    }

    /** {"K":"v"} or {"K":["v1","v2"]} as the multi-map both clients use. */
    private static Map<String, List<String>> headers(JsonNode n) {
        Map<String, List<String>> out = new LinkedHashMap<>();
        if (n == null || n.isNull()) {
            return out;
        }
        if (!n.isObject()) {
            throw new IllegalArgumentException("field 'headers' must be an object");
        }
        n.fields().forEachRemaining(e -> {
            List<String> values = new ArrayList<>();
            if (e.getValue().isArray()) {
                e.getValue().forEach(v -> values.add(v.asText()));
            } else {
                values.add(e.getValue().asText());
            }
            out.put(e.getKey(), values);
        });
        return out;
    }

    /**
     * Knows the current Engine.IO transport of a Manager and reports upgrades.
     * The engine and its transport are package-private fields in both client
     * versions, read here by reflection; if that ever fails, the transport is
     * inferred from the Manager's "transport" events (the first transport
     * created before the engine opens is the one in use; probes come after).
     */
    private static final class TransportWatch {
        private static final Field ENGINE = field(Manager.class, "engine");
        private static final Field TRANSPORT = field(io.socket.engineio.client.Socket.class, "transport");

        private final Manager manager;
        private volatile String inferred = "";
        private volatile boolean open;
        volatile boolean retired;

        TransportWatch(Manager manager) {
            this.manager = manager;
            // all Manager and engine events run on the client's single event thread
            manager.on(Manager.EVENT_TRANSPORT, args -> {
                if (!open && args.length > 0 && args[0] instanceof Transport) {
                    inferred = ((Transport) args[0]).name;
                }
            });
            manager.on(Manager.EVENT_OPEN, args -> {
                open = true;
                io.socket.engineio.client.Socket engine = engine();
                if (engine != null) {
                    engine.on(io.socket.engineio.client.Socket.EVENT_UPGRADE, up -> {
                        String name = up.length > 0 && up[0] instanceof Transport ? ((Transport) up[0]).name : current();
                        inferred = name;
                        if (retired) {
                            AgentIO.log("upgrade to " + name + " after the socket was closed (not reported)");
                            return;
                        }
                        ObjectNode ev = AgentIO.event("upgraded");
                        ev.put("transport", name);
                        AgentIO.write(ev);
                    });
                }
            });
            manager.on(Manager.EVENT_CLOSE, args -> open = false);
        }

        String current() {
            io.socket.engineio.client.Socket engine = engine();
            if (engine != null && TRANSPORT != null) {
                try {
                    Object t = TRANSPORT.get(engine);
                    if (t instanceof Transport) {
                        return ((Transport) t).name;
                    }
                } catch (IllegalAccessException e) {
                    // fall through
                }
            }
            return inferred;
        }

        private io.socket.engineio.client.Socket engine() {
            if (ENGINE == null) {
                return null;
            }
            try {
                return (io.socket.engineio.client.Socket) ENGINE.get(manager);
            } catch (IllegalAccessException e) {
                return null;
            }
        }

        private static Field field(Class<?> c, String name) {
            try {
                Field f = c.getDeclaredField(name);
                f.setAccessible(true);
                return f;
            } catch (Exception e) {
                AgentIO.log("no field " + c.getName() + "." + name + ": " + e);
                return null;
            }
        }
    }
}
