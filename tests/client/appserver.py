"""An app server for the client's redirect tests, run as its own process:

    python appserver.py CONNECTION_STRING

A ``HubServer`` with one hub, ``chat``, keeps server connections to the relay; its negotiate
app is mounted at ``/hubs`` of a Starlette app under uvicorn, on a free port of 127.0.0.1
(uvicorn's "running on" line names it). ``POST /hubs/chat/negotiate?user=NAME`` answers the
redirect to the relay, as Azure SignalR apps do.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from relaycore.sdk import Hub, HubServer, ServiceOptions


class Chat(Hub):
    async def whoami(self) -> dict[str, Any]:
        return {"user": self.context.user_id, "connection": self.context.connection_id}

    async def echo(self, value: Any) -> Any:
        return value


server = HubServer(ServiceOptions(connection_string=sys.argv[1], connection_count=1))
server.map_hub("chat", Chat)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with server:
        yield


app = Starlette(routes=[Mount("/hubs", app=server.asgi())], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=0, log_level="info")
