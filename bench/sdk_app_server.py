"""The app server of S1's SDK variants (bench/run.py): relaycore's own server SDK, a ``HubServer``
with one hub, ``echo``, whose method ``echo(text)`` sends ``echo(text)`` back to its caller, as
a Python developer would write it.

It prints ``ready`` once its server connections are up (the relay binds clients only to a
connected app server), then serves until it is terminated. It imports ``relaycore`` from
wherever ``PYTHONPATH`` points, so that an earlier commit's SDK can be measured with the same
script (``bench/run.py --sdk-commit``).

    python bench/sdk_app_server.py --port 8080 --backend uvloop
"""

from __future__ import annotations

import argparse
import signal
import sys

import anyio

from relaycore.sdk import Hub, HubServer, ServiceOptions

#: The relay's access key in the benchmark (bench/loadgen/adapters.py ``ACCESS_KEY``).
ACCESS_KEY = "bench-access-key-0123456789abcdefgh"


class Echo(Hub):
    async def echo(self, text: str) -> None:
        await self.clients.caller.send("echo", text)


async def serve(port: int, connections: int, hub: str) -> None:
    options = ServiceOptions(
        connection_string=f"Endpoint=http://127.0.0.1;Port={port};AccessKey={ACCESS_KEY};"
        "Version=1.0",
        connection_count=connections,
    )
    server = HubServer(options)
    server.map_hub(hub, Echo)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with server:
            with anyio.fail_after(30):
                await server.wait_online(hub)
            print("ready", flush=True)
            async for _ in signals:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the relay's port")
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="uvloop")
    parser.add_argument("--connections", type=int, default=ServiceOptions.connection_count,
                        help="server connections (ServiceOptions.connection_count)")
    parser.add_argument("--hub", default="echo")
    args = parser.parse_args()
    backend, options = args.backend, {}
    if backend == "uvloop":
        backend, options = "asyncio", {"use_uvloop": True}
    anyio.run(serve, args.port, args.connections, args.hub, backend=backend,
              backend_options=options)
    sys.exit(0)


if __name__ == "__main__":
    main()
