"""An independent WebSocket client for huskd's streaming tests, on PyPI's `websockets`.

    python ws_client.py URL SUBPROTOCOL STDIN_TEXT|- [RESIZE_JSON]

Runs one exec over the channel.k8s.io framing and prints {"protocol", "stdout",
"stderr", "error"} as JSON. With v5, stdin EOF is sent as the close message [255, 0].
"""

import asyncio
import base64
import json
import os
import sys

from websockets.asyncio.client import connect


async def main(url: str, proto: str, stdin: str, resize: str | None) -> None:
    url = url.replace("http://", "ws://", 1)
    b64 = "base64" in proto
    out = {1: b"", 2: b"", 3: b""}
    async with connect(url, subprotocols=[proto], open_timeout=10) as ws:

        def frame(channel: int, data: bytes):
            if b64:
                return str(channel) + base64.b64encode(data).decode()
            return bytes([channel]) + data

        if resize is not None:
            await ws.send(frame(4, resize.encode()))
        if stdin != "-":
            await ws.send(frame(0, stdin.encode()))
            if proto == "v5.channel.k8s.io":
                await ws.send(bytes([255, 0]))
        try:
            async for msg in ws:
                if b64:
                    ch, data = int(msg[0]), base64.b64decode(msg[1:])
                else:
                    ch, data = msg[0], msg[1:]
                out[ch] = out.get(ch, b"") + data
        except Exception as e:  # a close without a close frame still ends the exec
            print(f"ws_client: {e!r}", file=sys.stderr)
        chosen = ws.subprotocol
    print(
        json.dumps(
            {
                "protocol": chosen,
                "stdout": out[1].decode(),
                "stderr": out[2].decode(),
                "error": out[3].decode(),
            }
        )
    )


resize_arg = sys.argv[4] if len(sys.argv) > 4 else None
# WS_CLIENT_TIMEOUT_S overrides the 20 s limit on the whole run (the lab's nested VM is slow).
limit = float(os.environ.get("WS_CLIENT_TIMEOUT_S", "20"))
asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2], sys.argv[3], resize_arg), limit))
