package tradefeed.agents.sio;

import io.socket.client.Manager;
import io.socket.client.Socket;
import io.socket.engineio.client.Transport;
import io.socket.parser.Packet;
import io.socket.parser.Parser;
import org.json.JSONArray;
import tradefeed.agents.common.AgentIO;

import java.util.List;
import java.util.Map;

/**
 * Socket.IO agent on io.socket:socket.io-client 1.0.x (Socket.IO protocol v4,
 * Engine.IO 3): the server must allow EIO3 clients.
 */
public final class SioAgentV1 extends SioAgent {

    public static void main(String[] argv) {
        AgentIO.run(new SioAgentV1());
    }

    @Override
    protected void hookHeaders(Manager manager, Map<String, List<String>> headers) {
        // 1.x has no extraHeaders option: each transport (polling request, WebSocket handshake)
        // emits "requestHeaders" with its mutable header map just before the request leaves
        manager.on(Manager.EVENT_TRANSPORT, args -> {
            Transport transport = (Transport) args[0];
            transport.on(Transport.EVENT_REQUEST_HEADERS, hargs -> {
                @SuppressWarnings("unchecked")
                Map<String, List<String>> h = (Map<String, List<String>>) hargs[0];
                h.putAll(headers);
            });
        });
    }

    @Override
    protected void installCatchAll(Socket socket, Manager manager, String namespace) {
        // 1.x has no catch-all listener: every decoded packet passes the Manager's "packet" event
        manager.on(Manager.EVENT_PACKET, args -> {
            Packet<?> p = (Packet<?>) args[0];
            if ((p.type != Parser.EVENT && p.type != Parser.BINARY_EVENT) || !namespace.equals(p.nsp)) {
                return;
            }
            if (!(p.data instanceof JSONArray) || ((JSONArray) p.data).length() == 0) {
                return;
            }
            JSONArray data = (JSONArray) p.data;
            Object[] a = new Object[data.length()];
            for (int i = 0; i < a.length; i++) {
                a[i] = data.opt(i);
            }
            reportEvent(String.valueOf(a[0]), a, 1);
        });
    }

    @Override
    protected void installErrorListeners(Socket socket) {
        // engine errors while connecting (a "timeout" also comes this way)
        socket.on(Socket.EVENT_CONNECT_ERROR, args -> reportConnectError(args.length > 0 ? args[0] : null));
        // ERROR packets (e.g. "Invalid namespace") and engine errors after the connection
        socket.on(Socket.EVENT_ERROR, args -> {
            Object err = args.length > 0 ? args[0] : null;
            if (socket.connected()) {
                AgentIO.log("socket error: " + err);
            } else {
                reportConnectError(err);
            }
        });
    }
}
