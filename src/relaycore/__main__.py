"""``python -m relaycore serve | token``: run a relay, or mint a client token for one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from . import __version__


def _serve(args: argparse.Namespace) -> int:
    import trio

    from ._accel import ACCELERATED
    from .relay import RelayConfig, serve_relay

    try:
        config = RelayConfig.load(toml_path=args.config, overrides={
            "host": args.host, "port": args.port, "access_key": args.access_key,
            "public_endpoint": args.public_endpoint, "log_level": args.log_level,
            "upstreams": args.upstream, "service_mode": args.service_mode,
            "capacity": args.capacity,
            # the CLI owns its process: tune the collector unless RELAYCORE_TUNE_GC says no
            "tune_gc": None if "RELAYCORE_TUNE_GC" in os.environ else True,
        })
    except (ValueError, OSError) as exc:
        print(f"relaycore: bad configuration: {exc}", file=sys.stderr)
        return 2
    if config.tune_gc:
        import gc

        gc.set_threshold(50_000, 50, 1000)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(serve_relay, config)
            print(f"relaycore {__version__} listening on {config.host}:{relay.port} "
                  f"(fast path: {'Cython' if ACCELERATED else 'pure Python'})", flush=True)
            print(f"connection string: {relay.connection_string}", flush=True)
            if config.uses_development_key:
                print("WARNING: using the built-in development access key; set --access-key "
                      "or RELAYCORE_ACCESS_KEY for anything but local development", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    print("relaycore: draining connections", flush=True)
                    await relay.drain()
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except OSError as exc:
        print(f"relaycore: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    from .protocol._auth import ConnectionString, generate_access_token, wire_hub_name
    from .relay import RelayConfig

    try:
        if args.connection_string:
            cs = ConnectionString.parse(args.connection_string)
        else:
            config = RelayConfig.load(overrides={"port": args.port, "access_key": args.access_key,
                                                 "public_endpoint": args.public_endpoint})
            cs = ConnectionString.parse(config.connection_string())
        hub = wire_hub_name(args.hub, args.application)
    except ValueError as exc:
        print(f"relaycore token: {exc}", file=sys.stderr)
        return 2
    if not cs.access_key:
        print("relaycore token: the connection string has no AccessKey", file=sys.stderr)
        return 2
    token = generate_access_token(cs.access_key, cs.client_audience(hub), now=time.time(),
                                  lifetime=args.ttl, user_id=args.user)
    print(json.dumps({"url": cs.client_url(hub), "accessToken": token}))
    return 0


def _fault(args: argparse.Namespace) -> int:
    import httpx

    from .protocol._auth import ConnectionString, generate_access_token
    from .relay import RelayConfig

    try:
        if args.connection_string:
            cs = ConnectionString.parse(args.connection_string)
        else:
            config = RelayConfig.load(overrides={"port": args.port, "access_key": args.access_key})
            cs = ConnectionString.parse(config.connection_string())
    except ValueError as exc:
        print(f"relaycore fault: {exc}", file=sys.stderr)
        return 2
    path = "/api/admin/faults"
    token = generate_access_token(cs.access_key or "", cs.audience_base.rstrip("/") + path,
                                  now=time.time())
    response = httpx.put(cs.server_base.rstrip("/") + path,
                         params={"serverConnections": args.server_connections},
                         headers={"Authorization": f"Bearer {token}"})
    print(response.text)
    return 0 if response.status_code == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m relaycore", description=(
        "relaycore: a self-hosted relay wire-compatible with Azure SignalR Service."))
    parser.add_argument("--version", action="version", version=f"relaycore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a relay node (defaults: one node, in memory, "
                                         "port 8080, a development key)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080; 0 = any)")
    serve.add_argument("--access-key", help="the key tokens are signed with (env "
                       "RELAYCORE_ACCESS_KEY; comma-separated for several)")
    serve.add_argument("--public-endpoint", help="the URL clients reach this relay at")
    serve.add_argument("--config", help="a TOML file of settings (see docs/configuration.md)")
    serve.add_argument("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    serve.add_argument("--capacity", type=int, help="the connection quota reported to app "
                       "servers in pings (their EndpointMetrics.connection_capacity)")
    serve.add_argument("--upstream", action="append", metavar="URL_TEMPLATE",
                       help="send client events and invocations of every hub to this URL "
                            "({hub}, {category}, {event} are filled in); repeatable, first "
                            "match wins; patterns per hub/category/event go in --config")
    serve.add_argument("--service-mode", choices=["auto", "default", "serverless"],
                       help="auto (default): hubs with an app server route clients to it, others "
                            "are served by the relay; default: a hub needs an app server; "
                            "serverless: the relay serves every hub")
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="print a client URL and access token for a hub "
                                         "(what a negotiate redirect carries)")
    token.add_argument("--hub", required=True)
    token.add_argument("--user", help="user id (the token's asrs.s.uid claim)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    token.add_argument("--application", help="application name (hub becomes app_hub)")
    token.add_argument("--connection-string", help="default: the local development relay")
    token.add_argument("--port", type=int)
    token.add_argument("--access-key")
    token.add_argument("--public-endpoint")
    token.set_defaults(func=_token)

    fault = sub.add_parser("fault", help="rehearse an outage: make a running relay refuse, drop "
                                         "or ignore app-server connections (none heals)")
    fault.add_argument("--server-connections", required=True,
                       choices=["none", "refuse", "drop", "silence"])
    fault.add_argument("--connection-string", help="default: the local development relay")
    fault.add_argument("--port", type=int)
    fault.add_argument("--access-key")
    fault.set_defaults(func=_fault)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
