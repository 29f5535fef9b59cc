"""A test-only app server for the two-region end-to-end tests (test_regions.py): a FastAPI app
on relaycore's server SDK, like the pods of ``examples/two-pods``, plus what those tests need
and the example has no business offering.

* Endpoints come from the environment, as the Azure SDK reads them
  (``Azure__SignalR__Endpoints__east``, ``Azure__SignalR__Endpoints__west__secondary``, ...,
  ``ServiceOptions.from_env``); ``REGION_APP_OPTIONS`` is a JSON object of other
  ``ServiceOptions`` fields (short timers), where ``retry_delay`` is a number of seconds.
* Negotiate (``POST /hubs/chat/negotiate``) takes an optional ``region`` query parameter: the
  online endpoint of that name is chosen (the docs' region router, ``docs/endpoints.md``),
  else the default choice. The user is the ``user`` query parameter.
* ``GET /status``: ``online`` is true when *every* endpoint of the hub is online; ``endpoints``
  lists each with its name, role, state (staging, active, removing) and online flag.
* ``POST /admin/endpoints?name=&type=&connection_string=`` and ``DELETE
  /admin/endpoints/{name}``: ``HubServer.add_endpoint`` / ``remove_endpoint`` at run time; each
  answers when the SDK returns (after staging, after draining) with its result.
* ``POST /broadcast?text=``: ``clients.all.send("notify", text, <this app's name>)``.
* The hub method ``whoami`` answers ``{"pod", "user", "connection"}`` from the app server the
  client is bound to.

    POD_NAME=east Azure__SignalR__Endpoints__east=... python region_app.py --port 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.types import Receive, Scope, Send

from relaycore.sdk import (
    EndpointRouter,
    EndpointType,
    Hub,
    HubServer,
    NegotiateApp,
    ServiceEndpoint,
    ServiceOptions,
)


def pod_name() -> str:
    return os.environ.get("POD_NAME", "app")


class Chat(Hub):
    async def whoami(self) -> dict[str, str | None]:
        return {"pod": pod_name(), "user": self.context.user_id,
                "connection": self.context.connection_id}


class RegionRouter(EndpointRouter):
    """``?region=<name>`` picks that endpoint when it is offered and online."""

    def get_negotiate_endpoint(self, request, endpoints):  # type: ignore[no-untyped-def]
        region = request.query_params.get("region")
        for endpoint in endpoints:
            if region and endpoint.name == region and endpoint.online:
                return endpoint
        return super().get_negotiate_endpoint(request, endpoints)


def options_from_env() -> ServiceOptions:
    overrides: dict[str, Any] = json.loads(os.environ.get("REGION_APP_OPTIONS", "{}"))
    if "retry_delay" in overrides:
        delay = float(overrides.pop("retry_delay"))
        overrides["retry_delay"] = lambda failures: delay
    return ServiceOptions.from_env(endpoint_router=RegionRouter(), **overrides)


class App:
    server: HubServer
    negotiate: NegotiateApp


state = App()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state.server = HubServer(options_from_env())
    state.server.map_hub("chat", Chat)
    state.negotiate = state.server.asgi()
    async with state.server:
        yield


app = FastAPI(title="relaycore two-region test app server", lifespan=lifespan)


async def negotiate(scope: Scope, receive: Receive, send: Send) -> None:
    await state.negotiate(scope, receive, send)


app.mount("/hubs", negotiate)


@app.post("/broadcast")
async def broadcast(text: str = "hello") -> dict[str, str]:
    await state.server.hub_context("chat").clients.all.send("notify", text, pod_name())
    return {"sent_by": pod_name(), "to": "everyone"}


@app.get("/status")
async def status() -> dict[str, Any]:
    states = {e.identity: s for e, s in state.server.endpoint_states()}
    endpoints = [{"name": e.name, "type": e.type.name.lower(), "endpoint": e.endpoint,
                  "state": states.get(e.identity), "online": e.online}
                 for e in state.server.hub_endpoints("chat")]
    return {"pod": pod_name(), "online": all(e["online"] for e in endpoints),
            "endpoints": endpoints}


@app.post("/admin/endpoints")
async def add_endpoint(name: str, connection_string: str,
                       type: str = "primary") -> dict[str, Any]:  # noqa: A002
    try:
        endpoint = ServiceEndpoint(connection_string, EndpointType[type.upper()], name)
    except (KeyError, ValueError) as exc:
        raise HTTPException(400, str(exc)) from None
    return {"pod": pod_name(), "added": await state.server.add_endpoint(endpoint)}


@app.delete("/admin/endpoints/{name}")
async def remove_endpoint(name: str) -> dict[str, Any]:
    try:
        removed = await state.server.remove_endpoint(name)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    return {"pod": pod_name(), "removed": removed}


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description="a test-only app server of one region")
    parser.add_argument("--name", default=pod_name())
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    os.environ["POD_NAME"] = args.name
    # The SDK's endpoint status changes and reconnects in the output (kept for failures).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port)
