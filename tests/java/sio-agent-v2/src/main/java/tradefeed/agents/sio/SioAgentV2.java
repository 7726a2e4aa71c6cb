package tradefeed.agents.sio;

import io.socket.client.IO;
import io.socket.client.Manager;
import io.socket.client.Socket;
import tradefeed.agents.common.AgentIO;

import java.util.List;
import java.util.Map;

/**
 * Socket.IO agent on io.socket:socket.io-client 2.1.x (Socket.IO protocol v5,
 * Engine.IO 4), the client of TraderX's trade-service and trade-processor.
 */
public final class SioAgentV2 extends SioAgent {

    public static void main(String[] argv) {
        AgentIO.run(new SioAgentV2());
    }

    @Override
    protected void applyHeaders(IO.Options options, Map<String, List<String>> headers) {
        // 2.x: Engine.IO Options.extraHeaders go on every polling request and the WebSocket handshake
        options.extraHeaders = headers;
    }

    @Override
    protected void installCatchAll(Socket socket, Manager manager, String namespace) {
        // 2.1 has onAnyIncoming: args[0] is the event name; an Ack is appended when the server asks for one
        socket.onAnyIncoming(args -> {
            if (args.length == 0) {
                return;
            }
            reportEvent(String.valueOf(args[0]), args, 1);
        });
    }

    @Override
    protected void installErrorListeners(Socket socket) {
        // engine errors before the connection (Manager "error") and CONNECT_ERROR packets ({"message":...})
        socket.on(Socket.EVENT_CONNECT_ERROR, args -> reportConnectError(args.length > 0 ? args[0] : null));
    }
}
