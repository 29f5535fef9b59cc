"""Python ``websockets`` peer, written the way its docs recommend for fan-out: keep the set of
connections and call ``websockets.broadcast()`` (asyncio implementation, default event loop).

Common bench protocol (bench/peers/README.md): /sub?room=R joins "all" (and R); whatever a
subscriber sends comes back to it (echo); /pub sends "ROOM|payload" and the server broadcasts
payload to ROOM.
"""

import asyncio
import sys
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import broadcast, serve

ROOMS: dict[str, set] = {}


async def handler(ws):
    url = urlsplit(ws.request.path)
    if url.path == "/pub":
        async for message in ws:
            room, _, payload = message.partition("|")
            broadcast(ROOMS.get(room, ()), payload)
        return
    joined = ["all", *parse_qs(url.query).get("room", [])]
    for room in joined:
        ROOMS.setdefault(room, set()).add(ws)
    try:
        async for message in ws:
            await ws.send(message)
    finally:
        for room in joined:
            members = ROOMS[room]
            members.discard(ws)
            if not members:
                del ROOMS[room]


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, max_size=16 << 20,
                     compression=None) as server:
        print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
