package tradefeed.agents.sio;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import org.json.JSONArray;
import org.json.JSONObject;

import java.math.BigDecimal;
import java.math.BigInteger;
import java.util.Base64;
import java.util.Iterator;
import java.util.Map;

/**
 * Converts between plain JSON (Jackson trees, what the agent protocol carries)
 * and the org.json values the io.socket client takes and gives
 * (JSONObject, JSONArray, String, Number, Boolean, JSONObject.NULL, byte[]).
 */
final class OrgJson {

    private static final JsonNodeFactory F = JsonNodeFactory.instance; // keeps BigDecimals as they are (Jackson 2.15+)

    private OrgJson() {
    }

    /** A value received from the io.socket client, as plain JSON. */
    static JsonNode toJson(Object v) {
        if (v == null || JSONObject.NULL.equals(v)) {
            return F.nullNode();
        }
        if (v instanceof JSONObject) {
            JSONObject o = (JSONObject) v;
            ObjectNode n = F.objectNode();
            for (String key : o.keySet()) {
                n.set(key, toJson(o.opt(key)));
            }
            return n;
        }
        if (v instanceof JSONArray) {
            JSONArray a = (JSONArray) v;
            ArrayNode n = F.arrayNode();
            for (int i = 0; i < a.length(); i++) {
                n.add(toJson(a.opt(i)));
            }
            return n;
        }
        if (v instanceof String) {
            return F.textNode((String) v);
        }
        if (v instanceof Boolean) {
            return F.booleanNode((Boolean) v);
        }
        if (v instanceof Integer || v instanceof Short || v instanceof Byte) {
            return F.numberNode(((Number) v).intValue());
        }
        if (v instanceof Long) {
            return F.numberNode((Long) v);
        }
        if (v instanceof BigInteger) {
            return F.numberNode((BigInteger) v);
        }
        if (v instanceof BigDecimal) {
            return F.numberNode((BigDecimal) v);
        }
        if (v instanceof Double || v instanceof Float) {
            double d = ((Number) v).doubleValue();
            if (d == Math.rint(d) && !Double.isInfinite(d) && Math.abs(d) < 9.007199254740992E15) {
                return F.numberNode((long) d); // 3.0 arrives as 3, as JSON.stringify writes it
            }
            return F.numberNode(d);
        }
        if (v instanceof Number) {
            return F.numberNode(new BigDecimal(v.toString()));
        }
        if (v instanceof byte[]) {
            // binary attachment: no plain-JSON form, so it is tagged
            ObjectNode n = F.objectNode();
            n.put("$binary", Base64.getEncoder().encodeToString((byte[]) v));
            return n;
        }
        if (v instanceof Map) {
            return toJson(new JSONObject((Map<?, ?>) v));
        }
        return F.textNode(v.toString());
    }

    /** Arguments from the io.socket client, as a JSON array (Ack callbacks left out). */
    static ArrayNode argsToJson(Object[] args, int from) {
        ArrayNode n = F.arrayNode();
        if (args != null) {
            for (int i = from; i < args.length; i++) {
                if (args[i] instanceof io.socket.client.Ack) {
                    continue;
                }
                n.add(toJson(args[i]));
            }
        }
        return n;
    }

    /** A plain JSON value, as the io.socket client wants it for emit. */
    static Object fromJson(JsonNode n) {
        if (n == null || n.isNull() || n.isMissingNode()) {
            return JSONObject.NULL;
        }
        if (n.isObject()) {
            JSONObject o = new JSONObject();
            Iterator<Map.Entry<String, JsonNode>> it = n.fields();
            while (it.hasNext()) {
                Map.Entry<String, JsonNode> e = it.next();
                o.put(e.getKey(), fromJson(e.getValue()));
            }
            return o;
        }
        if (n.isArray()) {
            JSONArray a = new JSONArray();
            for (JsonNode e : n) {
                a.put(fromJson(e));
            }
            return a;
        }
        if (n.isTextual()) {
            return n.textValue();
        }
        if (n.isBoolean()) {
            return n.booleanValue();
        }
        if (n.isInt()) {
            return n.intValue();
        }
        if (n.isLong()) {
            return n.longValue();
        }
        if (n.isBigInteger()) {
            return n.bigIntegerValue();
        }
        if (n.isBigDecimal()) {
            return n.decimalValue();
        }
        if (n.isNumber()) {
            return n.doubleValue();
        }
        return n.asText();
    }
}
