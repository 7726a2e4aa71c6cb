package tradefeed.agents.nats;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.nats.client.Connection;
import io.nats.client.ConnectionListener;
import io.nats.client.Dispatcher;
import io.nats.client.Message;
import io.nats.client.Nats;
import io.nats.client.Options;
import io.nats.client.Subscription;
import io.nats.client.impl.Headers;
import tradefeed.agents.common.AgentIO;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

/**
 * The NATS agent of tests/agents/README.md on io.nats:jnats 2.20.x, the Java
 * client named by TraderX spec NFR-702.
 */
public final class NatsAgent implements AgentIO.Handler {

    private static final Duration FLUSH_TIMEOUT = Duration.ofSeconds(5);

    private volatile Connection connection;
    private volatile Dispatcher dispatcher;
    private volatile boolean down;
    private final Map<String, Subscription> subscriptions = new ConcurrentHashMap<>();

    public static void main(String[] argv) {
        AgentIO.run(new NatsAgent());
    }

    @Override
    public boolean handle(String cmd, JsonNode c, JsonNode seq) throws Exception {
        switch (cmd) {
            case "connect":
                connect(c);
                return true;
            case "sub":
                sub(c);
                return true;
            case "unsub":
                unsub(c);
                return true;
            case "pub":
                pub(c);
                return true;
            default:
                throw new IllegalArgumentException("unknown command '" + cmd + "'");
        }
    }

    @Override
    public void shutdown() {
        Connection nc = connection;
        connection = null;
        if (nc != null) {
            try {
                nc.close();
            } catch (Exception e) {
                AgentIO.log("close: " + AgentIO.describe(e));
            }
        }
    }

    private void connect(JsonNode c) throws Exception {
        List<String> servers = new ArrayList<>();
        JsonNode s = c.get("servers");
        if (s != null && s.isArray()) {
            s.forEach(v -> servers.add(v.asText()));
        } else if (s != null && s.isTextual()) {
            servers.add(s.asText());
        }
        if (servers.isEmpty()) {
            throw new IllegalArgumentException("missing field 'servers'");
        }
        if (connection != null) {
            throw new IllegalStateException("already connected");
        }
        Options.Builder b = new Options.Builder()
                .servers(servers.toArray(new String[0]))
                .connectionListener(this::connectionEvent);
        String name = AgentIO.text(c, "name", null);
        if (name != null) {
            b.connectionName(name);
        }
        // Nats.connect returns once the server has answered (CONNECT/PING/PONG), or throws
        Connection nc = Nats.connect(b.build());
        connection = nc;
        dispatcher = nc.createDispatcher();
    }

    private synchronized void connectionEvent(Connection conn, ConnectionListener.Events type) {
        if (conn != connection) {
            return; // closing at exit, or events from before connect returned
        }
        switch (type) {
            case DISCONNECTED:
                // jnats reports DISCONNECTED again for each failed reconnect attempt: one line per outage
                if (!down) {
                    down = true;
                    AgentIO.write(AgentIO.event("disconnected"));
                } else {
                    AgentIO.log("connection event: " + type + " (again)");
                }
                break;
            case RECONNECTED:
                down = false;
                AgentIO.write(AgentIO.event("reconnected"));
                break;
            default:
                AgentIO.log("connection event: " + type);
        }
    }

    private Connection requireConnection() {
        Connection nc = connection;
        if (nc == null) {
            throw new IllegalStateException("not connected: send connect first");
        }
        return nc;
    }

    private void sub(JsonNode c) throws Exception {
        Connection nc = requireConnection();
        String sid = AgentIO.requireText(c, "sid");
        String subject = AgentIO.requireText(c, "subject");
        String queue = AgentIO.text(c, "queue", null);
        if (subscriptions.containsKey(sid)) {
            throw new IllegalArgumentException("sid '" + sid + "' is already subscribed");
        }
        // one dispatcher (one thread) for every subscription: messages are written in arrival order
        Subscription sub = queue == null || queue.isEmpty()
                ? dispatcher.subscribe(subject, msg -> onMessage(sid, msg))
                : dispatcher.subscribe(subject, queue, msg -> onMessage(sid, msg));
        subscriptions.put(sid, sub);
        nc.flush(FLUSH_TIMEOUT);
    }

    private void unsub(JsonNode c) throws Exception {
        Connection nc = requireConnection();
        String sid = AgentIO.requireText(c, "sid");
        Subscription sub = subscriptions.remove(sid);
        if (sub == null) {
            throw new IllegalArgumentException("no subscription '" + sid + "'");
        }
        dispatcher.unsubscribe(sub);
        nc.flush(FLUSH_TIMEOUT);
    }

    private void pub(JsonNode c) throws Exception {
        Connection nc = requireConnection();
        String subject = AgentIO.requireText(c, "subject");
        byte[] body;
        String b64 = AgentIO.text(c, "b64", null);
        if (b64 != null) {
            body = Base64.getDecoder().decode(b64);
        } else {
            body = AgentIO.text(c, "data", "").getBytes(StandardCharsets.UTF_8);
        }
        String reply = AgentIO.text(c, "reply", null);
        Headers headers = null;
        JsonNode h = c.get("headers");
        if (h != null && !h.isNull()) {
            if (!h.isObject()) {
                throw new IllegalArgumentException("field 'headers' must be an object");
            }
            headers = new Headers();
            Headers hs = headers;
            h.fields().forEachRemaining(e -> {
                if (e.getValue().isArray()) {
                    e.getValue().forEach(v -> hs.add(e.getKey(), v.asText()));
                } else {
                    hs.add(e.getKey(), e.getValue().asText());
                }
            });
            if (headers.isEmpty()) {
                headers = null;
            }
        }
        nc.publish(subject, reply, headers, body);
        nc.flush(FLUSH_TIMEOUT);
    }

    private static void onMessage(String sid, Message msg) {
        byte[] data = msg.getData();
        if (data == null) {
            data = new byte[0];
        }
        ObjectNode ev = AgentIO.event("msg");
        ev.put("sid", sid);
        ev.put("subject", msg.getSubject());
        if (msg.getReplyTo() != null) {
            ev.put("reply", msg.getReplyTo());
        }
        ev.put("data", new String(data, StandardCharsets.UTF_8));
        ev.put("b64", Base64.getEncoder().encodeToString(data));
        Headers headers = msg.getHeaders();
        if (msg.hasHeaders() && headers != null && !headers.isEmpty()) {
            ObjectNode hn = ev.putObject("headers");
            for (String key : headers.keySet()) {
                ArrayNode values = hn.putArray(key);
                List<String> vs = headers.get(key);
                if (vs != null) {
                    vs.forEach(values::add);
                }
            }
        }
        AgentIO.write(ev);
    }
}
