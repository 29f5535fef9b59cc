"""One pod of the two-pod story: a FastAPI app server using relaycore's server SDK.

Run two of these (see README.md). Each pod keeps server connections to the relay for the
``chat`` hub; a browser negotiates with pod 1 and is redirected to the relay; ``POST
/notify/{user}`` on *either* pod then reaches that browser, because the pod sends through the
relay, which holds every client's socket.

With ``--no-relay`` (or ``TWO_PODS_NO_RELAY=1``) each pod starts a private relay of its own and
connects only to that one: the hub is effectively served locally on each pod, as with plain
SignalR and no backplane, and an event sent by pod 2 never reaches a browser connected through
pod 1.

    python app.py --name "pod 1" --port 8001            # Azure__SignalR__ConnectionString=...
    uvicorn app:app --port 8002                         # the same, POD_NAME="pod 2"
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from relaycore.sdk import Hub, HubContext, HubServer, NegotiateApp, ServiceOptions

HERE = Path(__file__).resolve().parent
BUNDLE = "@microsoft/signalr/dist/browser/signalr.js"


def pod_name() -> str:
    return os.environ.get("POD_NAME", "pod")


def no_relay() -> bool:
    return os.environ.get("TWO_PODS_NO_RELAY", "") not in ("", "0")


# --- The hub: its methods run on the pod the client's connection is bound to -----------------


class Chat(Hub):
    async def whoami(self) -> dict[str, str | None]:
        """Which pod serves this client's hub calls (the relay spreads clients over pods)."""
        return {"pod": pod_name(), "user": self.context.user_id,
                "connection": self.context.connection_id}

    async def join(self, group: str) -> None:
        await self.groups.add_to_group(self.context.connection_id, group)

    async def leave(self, group: str) -> None:
        await self.groups.remove_from_group(self.context.connection_id, group)


# --- The pod's life: server connections to the relay (or to a private one) ----------------------


class PrivateRelay:
    """``--no-relay``: a relay subprocess that only this pod knows about."""

    def __init__(self) -> None:
        key = secrets.token_urlsafe(32)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relaycore", "serve", "--port", "0", f"--access-key={key}"],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.connection_string = ""
        for line in self.process.stdout:  # until the relay says where it listens
            print(f"[private relay of {pod_name()}] {line}", end="", flush=True)
            match = re.match(r"connection string: (\S+)", line)
            if match:
                self.connection_string = match.group(1)
                break
        if not self.connection_string:
            raise RuntimeError(f"the private relay exited with status {self.process.wait()}")
        # Keep its output flowing to ours (a full pipe would block the relay).
        threading.Thread(target=shutil.copyfileobj, args=(self.process.stdout, sys.stdout),
                         daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Pod:
    server: HubServer
    negotiate: NegotiateApp


pod = Pod()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    private = PrivateRelay() if no_relay() else None
    try:
        if private is not None:
            options = ServiceOptions(connection_string=private.connection_string)
        else:
            options = ServiceOptions.from_env()  # Azure__SignalR__ConnectionString
        pod.server = HubServer(options)
        pod.server.map_hub("chat", Chat)
        pod.negotiate = pod.server.asgi()
        async with pod.server:  # server connections up (and kept up) while the app runs
            yield
    finally:
        if private is not None:
            private.stop()


app = FastAPI(title="relaycore two-pods example", lifespan=lifespan)
# The page on pod 1 calls pod 2's endpoints below: a cross-origin fetch.
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"])


async def negotiate(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /hubs/chat/negotiate``: the SDK's ASGI app answers with a redirect to the relay
    and a token for it (the user is the ``user`` query parameter: a demo, not authentication)."""
    await pod.negotiate(scope, receive, send)


app.mount("/hubs", negotiate)


# --- Work on this pod that reaches clients wherever they connected -----------------------------


def chat() -> HubContext:
    return pod.server.hub_context("chat")


def sent(to: str) -> dict[str, str]:
    return {"sent_by": pod_name(), "to": to}


@app.post("/notify/{user}")
async def notify_user(user: str, text: str = "hello") -> dict[str, str]:
    await chat().clients.user(user).send("notify", text, pod_name())
    return sent(f"user {user}")


@app.post("/broadcast")
async def broadcast(text: str = "hello") -> dict[str, str]:
    await chat().clients.all.send("notify", text, pod_name())
    return sent("everyone")


@app.post("/connections/{connection_id}/notify")
async def notify_connection(connection_id: str, text: str = "hello") -> dict[str, str]:
    await chat().clients.client(connection_id).send("notify", text, pod_name())
    return sent(f"connection {connection_id}")


@app.post("/groups/{group}/notify")
async def notify_group(group: str, text: str = "hello") -> dict[str, str]:
    await chat().clients.group(group).send("notify", text, pod_name())
    return sent(f"group {group}")


@app.put("/groups/{group}/connections/{connection_id}")
async def add_to_group(group: str, connection_id: str) -> dict[str, str]:
    await chat().groups.add_to_group(connection_id, group)
    return {"added_by": pod_name()}


@app.delete("/groups/{group}/connections/{connection_id}")
async def remove_from_group(group: str, connection_id: str) -> dict[str, str]:
    await chat().groups.remove_from_group(connection_id, group)
    return {"removed_by": pod_name()}


@app.get("/status")
async def status() -> dict[str, object]:
    return {"pod": pod_name(), "no_relay": no_relay(),
            "online": bool(pod.server.online_endpoints("chat"))}


# --- The page -------------------------------------------------------------------------------


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(HERE / "index.html")


@app.get("/signalr.js")
async def signalr_js() -> FileResponse:
    candidates = [os.environ.get("TWO_PODS_SIGNALR_JS", ""), HERE / "node_modules" / BUNDLE,
                  HERE.parent.parent / "tests/e2e/node/node_modules" / BUNDLE]
    for path in candidates:
        if path and Path(path).is_file():
            return FileResponse(path, media_type="text/javascript")
    raise HTTPException(404, "run `npm install` in examples/two-pods (or set TWO_PODS_SIGNALR_JS)")


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description="one pod of the two-pod story")
    parser.add_argument("--name", default=pod_name(), help='this pod\'s name, e.g. "pod 1"')
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--no-relay", action="store_true",
                        help="no shared relay: this pod serves its hub alone (the failure)")
    args = parser.parse_args()
    os.environ["POD_NAME"] = args.name
    if args.no_relay:
        os.environ["TWO_PODS_NO_RELAY"] = "1"
    uvicorn.run(app, host=args.host, port=args.port)
