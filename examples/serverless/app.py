"""A serverless chat: a FastAPI app with no server connections at all.

The relay holds every client's socket and serves the ``chat`` hub itself; this app only

* negotiates: ``POST /api/negotiate?user=alice`` answers a redirect to the relay with a token
  (``ServiceManager`` signs it; the SignalR client follows it);
* receives the hub's events as upstream webhooks on ``/upstream/...`` (``UpstreamHandler``
  checks each request's signature): a client connected, disconnected, or invoked
  ``broadcast(text)``;
* sends through the relay's REST API (``ServiceHubContext``): ``broadcast`` sends the text to
  everyone and answers the invocation with how many connections received it.

Run the relay with its upstream pointing here, then this app (see README.md)::

    python -m relaycore serve --port 8080 --upstream 'http://127.0.0.1:8002/upstream/{hub}/{category}/{event}'
    Azure__SignalR__ConnectionString='Endpoint=http://127.0.0.1:8080;AccessKey=...;Version=1.0;' \\
        python app.py --port 8002
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse

from relaycore.sdk import ServiceHubContext, ServiceManager, ServiceOptions, TransportType
from relaycore.sdk.upstream import UpstreamEvent, UpstreamHandler

HERE = Path(__file__).resolve().parent
BUNDLE = "@microsoft/signalr/dist/browser/signalr.js"
HUB = "chat"

# The relay's access keys sign its upstream requests; the same keys are in the connection
# string(s) the manager uses.
options = ServiceOptions.from_env()  # Azure__SignalR__ConnectionString (or ...Endpoints...)
handler = UpstreamHandler(access_keys=[e.access_key for e in options.all_endpoints()])


class State:
    chat: ServiceHubContext
    manager: ServiceManager
    #: What upstream told us, in order: (event, connection id, user id), for /events.
    events: list[tuple[str, str, str | None]] = []


state = State()


def transport() -> TransportType:
    """``SERVERLESS_TRANSPORT=persistent`` sends over Weak server connections instead of REST
    calls; clients see no difference."""
    return TransportType[os.environ.get("SERVERLESS_TRANSPORT", "transient").upper()]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with ServiceManager(options, transport=transport()) as manager:
        state.manager = manager
        state.chat = await manager.create_hub_context(HUB)
        yield


app = FastAPI(title="relaycore serverless example", lifespan=lifespan)
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"])


# --- Negotiate: the redirect a SignalR client follows to the relay ----------------------------


@app.post("/api/negotiate")
async def negotiate(user: str | None = None) -> dict[str, str]:
    """The client is built with ``withUrl("/api?user=alice")``; the user comes from the query
    here, which is a demo, not authentication: take it from your session instead."""
    return (await state.chat.negotiate(user_id=user)).to_dict()


# --- Upstream: the relay POSTs the hub's events here -------------------------------------------


def name(event: UpstreamEvent) -> str:
    return event.user_id or "someone"


@handler.on_connected
async def connected(event: UpstreamEvent) -> None:
    state.events.append(("connected", event.connection_id, event.user_id))
    await state.chat.clients.all.send("system", f"{name(event)} joined")


@handler.on_disconnected
async def disconnected(event: UpstreamEvent) -> None:
    state.events.append(("disconnected", event.connection_id, event.user_id))
    await state.chat.clients.all.send("system", f"{name(event)} left")


@handler.on_message("broadcast")
async def broadcast(event: UpstreamEvent, text: str) -> dict[str, Any]:
    """A client's ``connection.invoke("broadcast", text)``: everyone gets ``newMessage``; the
    caller's result says how many connections it reached."""
    state.events.append(("broadcast", event.connection_id, event.user_id))
    reached = await state.chat.clients.all.send("newMessage", name(event), text, report=True)
    return {"delivered": reached}


app.mount("/upstream", handler)


# --- Status, and the page ----------------------------------------------------------------------


@app.get("/status")
async def status() -> dict[str, Any]:
    endpoints = await state.chat.list_endpoints()
    return {"transport": transport().name.lower(), "online": any(e.online for e in endpoints),
            "endpoints": [{"name": e.name, "endpoint": e.endpoint, "online": e.online}
                          for e in endpoints]}


@app.get("/events")
async def events() -> list[dict[str, str | None]]:
    return [{"event": e, "connection": c, "user": u} for e, c, u in state.events]


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(HERE / "index.html")


@app.get("/signalr.js")
async def signalr_js() -> FileResponse:
    candidates = [os.environ.get("SERVERLESS_SIGNALR_JS", ""), HERE / "node_modules" / BUNDLE,
                  HERE.parent.parent / "tests/e2e/node/node_modules" / BUNDLE]
    for path in candidates:
        if path and Path(path).is_file():
            return FileResponse(path, media_type="text/javascript")
    raise HTTPException(404, "run `npm install` in examples/serverless "
                             "(or set SERVERLESS_SIGNALR_JS)")


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description="a serverless chat on relaycore")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--transport", choices=["transient", "persistent"],
                        help="how the app sends (default: SERVERLESS_TRANSPORT or transient)")
    args = parser.parse_args()
    if args.transport:
        os.environ["SERVERLESS_TRANSPORT"] = args.transport
    uvicorn.run(app, host=args.host, port=args.port)
