"""python-socketio peer on uvicorn (ASGI), written the way its docs recommend: an
``AsyncServer(async_mode="asgi")`` wrapped in ``ASGIApp``, rooms (``enter_room``) and
``sio.emit(event, data, to=room)``; uvicorn as installed by ``uvicorn[standard]`` (uvloop,
httptools, websockets).

Common bench protocol (bench/peers/README.md), over Engine.IO v4 / Socket.IO v5: connect with
?room=R to join "all" (and R), or ?role=pub to publish; event "echo" comes back to the sender;
event "pub" with "ROOM|payload" emits event "t" with payload to ROOM.
"""

import socket
import sys
from urllib.parse import parse_qs

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"],
                           max_http_buffer_size=16 << 20)
app = socketio.ASGIApp(sio)


@sio.event
async def connect(sid, environ):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if query.get("role") == ["pub"]:
        return
    await sio.enter_room(sid, "all")
    for room in query.get("room", []):
        await sio.enter_room(sid, room)


@sio.event
async def pub(sid, message):
    room, _, payload = message.partition("|")
    await sio.emit("t", payload, to=room)


@sio.event
async def echo(sid, message):
    await sio.emit("echo", message, to=sid)


if __name__ == "__main__":
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, ws_max_size=16 << 20)
    uvicorn.Server(config).run(sockets=[sock])
