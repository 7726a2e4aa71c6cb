package tradefeed.agents.common;

import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.cfg.JsonNodeFeature;
import com.fasterxml.jackson.databind.node.NullNode;
import com.fasterxml.jackson.databind.node.ObjectNode;

import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

/**
 * The JSON-lines plumbing of an agent (tests/agents/README.md): commands are
 * read from standard input, one JSON object a line; events are written to
 * standard output, one JSON object a line, each with {@code "t"} (wall clock,
 * epoch ms) and flushed at once. Diagnostics go to standard error.
 */
public final class AgentIO {

    /** Commands are carried out by an agent through this. */
    public interface Handler {
        /**
         * Carries out one command. Returns normally when {@code ok} is to be
         * written for it at once, throws to have {@code error} written.
         * A handler that writes {@code ok} itself (or later) returns {@code false}.
         */
        boolean handle(String cmd, JsonNode command, JsonNode seq) throws Exception;

        /** Closes whatever is open; called on {@code exit} and at the end of input. */
        void shutdown();
    }

    /** Float literals are kept as exact decimals so that values pass through unchanged. */
    public static final ObjectMapper MAPPER = new ObjectMapper()
            .enable(DeserializationFeature.USE_BIG_DECIMAL_FOR_FLOATS)
            .configure(JsonNodeFeature.STRIP_TRAILING_BIGDECIMAL_ZEROES, false);

    private static final PrintStream OUT =
            new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);

    static {
        // Nothing but protocol lines may reach standard output: whatever a library prints goes to stderr.
        System.setOut(System.err);
    }

    private AgentIO() {
    }

    /** A new event line: {@code {"ev": ev, "t": now}}; add fields, then {@link #write}. */
    public static ObjectNode event(String ev) {
        ObjectNode n = MAPPER.createObjectNode();
        n.put("ev", ev);
        n.put("t", System.currentTimeMillis());
        return n;
    }

    /** Writes one event line and flushes it. Safe from any thread. */
    public static void write(ObjectNode event) {
        String line;
        try {
            line = MAPPER.writeValueAsString(event);
        } catch (Exception e) {
            log("cannot serialise event: " + e);
            return;
        }
        synchronized (OUT) {
            OUT.print(line);
            OUT.print('\n');
            OUT.flush();
        }
    }

    public static void ok(JsonNode seq) {
        ObjectNode n = event("ok");
        n.set("seq", seq == null ? NullNode.getInstance() : seq);
        write(n);
    }

    public static void error(JsonNode seq, String message) {
        ObjectNode n = event("error");
        n.set("seq", seq == null ? NullNode.getInstance() : seq);
        n.put("message", message);
        write(n);
    }

    public static void log(String message) {
        System.err.println("[agent] " + message);
        System.err.flush();
    }

    /** A message for an {@code error} line, never empty. */
    public static String describe(Throwable e) {
        StringBuilder sb = new StringBuilder();
        Throwable cur = e;
        while (cur != null && sb.length() < 500) {
            if (sb.length() > 0) {
                sb.append(": ");
            }
            String m = cur.getMessage();
            if (m != null && m.indexOf('\n') >= 0) {
                m = m.substring(0, m.indexOf('\n')); // Jackson adds a location on further lines
            }
            sb.append(m == null || m.isEmpty() ? cur.getClass().getSimpleName() : m);
            if (cur.getCause() == cur) {
                break;
            }
            cur = cur.getCause();
        }
        return sb.toString();
    }

    /** Text of a field, or {@code dflt} when absent or null. */
    public static String text(JsonNode command, String field, String dflt) {
        JsonNode v = command.get(field);
        return v == null || v.isNull() ? dflt : v.asText();
    }

    /** Text of a required field. */
    public static String requireText(JsonNode command, String field) {
        JsonNode v = command.get(field);
        if (v == null || v.isNull()) {
            throw new IllegalArgumentException("missing field '" + field + "'");
        }
        if (!v.isTextual()) {
            throw new IllegalArgumentException("field '" + field + "' must be a string");
        }
        return v.asText();
    }

    /**
     * Reads commands until {@code exit} or the end of input, then shuts the
     * handler down and exits the process with status 0.
     */
    public static void run(Handler handler) {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try {
            String line;
            while ((line = in.readLine()) != null) {
                line = line.trim();
                if (line.isEmpty()) {
                    continue;
                }
                JsonNode command;
                try {
                    command = MAPPER.readTree(line);
                } catch (Exception e) {
                    error(null, "invalid JSON: " + describe(e));
                    continue;
                }
                if (command == null || !command.isObject()) {
                    error(null, "a command must be a JSON object");
                    continue;
                }
                JsonNode seq = command.get("seq");
                String cmd = text(command, "cmd", null);
                if (cmd == null) {
                    error(seq, "missing field 'cmd'");
                    continue;
                }
                if ("exit".equals(cmd)) {
                    shutdownQuietly(handler);
                    ok(seq);
                    exit();
                    return;
                }
                try {
                    if (handler.handle(cmd, command, seq)) {
                        ok(seq);
                    }
                } catch (Exception e) {
                    error(seq, describe(e));
                }
            }
        } catch (Exception e) {
            log("reading standard input failed: " + describe(e));
        }
        shutdownQuietly(handler);
        exit();
    }

    private static void shutdownQuietly(Handler handler) {
        try {
            handler.shutdown();
        } catch (Exception e) {
            log("shutdown: " + describe(e));
        }
    }

    private static void exit() {
        synchronized (OUT) {
            OUT.flush();
        }
        System.exit(0);
    }
}
