"""``python -m relaycore serve | token | fault``: run a relay, mint a client token for one, or
rehearse an outage on a running one.

Exit status: 0 done; 1 the command ran but failed (``fault``: the relay could not be reached
or refused); 2 bad arguments or configuration, or ``serve`` could not start (port in use,
unknown host). Every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import NoReturn

from . import __version__


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535)")
    return port


def _log_level(text: str) -> str:
    from .relay._config import LOG_LEVELS

    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (one of {', '.join(LOG_LEVELS)})")
    return text.upper()


def _transports(text: str) -> list[str]:
    from .protocol._negotiate import transport_names

    try:
        names = transport_names(name for name in text.split(",") if name.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("name at least one transport")
    return names


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failure (``Address already in use``), without the
    ``[Errno 98]`` prefix; the exception's text when there are none."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _serve(args: argparse.Namespace) -> int:
    import trio

    from ._accel import ACCELERATED, FALLBACK_REASON
    from .relay import RelayConfig, serve_relay

    try:
        config = RelayConfig.load(toml_path=args.config, overrides={
            "host": args.host, "port": args.port, "access_key": args.access_key,
            "public_endpoint": args.public_endpoint, "log_level": args.log_level,
            "upstreams": args.upstream, "service_mode": args.service_mode,
            "capacity": args.capacity, "admin_key": args.admin_key,
            "redis": args.redis, "cluster_name": args.cluster_name,
            "transports": args.transports,
            "reuse_port": True if args.worker else None,
        }, defaults={
            # the CLI owns its process: tune the collector unless the file or
            # RELAYCORE_TUNE_GC says no
            "tune_gc": True,
        })
    except ValueError as exc:
        print(f"relaycore: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"relaycore: cannot read --config {args.config}: {_reason(exc)}", file=sys.stderr)
        return 2
    if args.workers is not None and not args.worker:
        return _supervise(args, config)
    if config.tune_gc:
        import gc

        gc.set_threshold(50_000, 50, 1000)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    fast_path = "Cython" if ACCELERATED else f"pure Python ({FALLBACK_REASON})"
    open_files = _raise_open_file_limit()
    failure: list[str] = []

    async def main() -> None:
        # Signals are taken from the start: one that arrives while the relay starts or prints
        # its start lines drains it like any other, instead of a KeyboardInterrupt traceback.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if args.worker:
                    nursery.start_soon(_drain_without_supervisor)
                try:
                    relay = await nursery.start(serve_relay, config)
                except RuntimeError as exc:  # --redis without the redis extra
                    failure.append(str(exc))
                    return
                except socket.gaierror as exc:
                    failure.append(f"cannot resolve host {config.host!r}: {_reason(exc)}")
                    return
                except OSError as exc:
                    hint = ""
                    if exc.errno == errno.EADDRINUSE:
                        hint = " (another process listens there; choose another --port)"
                    failure.append(f"cannot listen on {config.host}:{config.port}: "
                                   f"{_reason(exc)}{hint}")
                    return
                print(f"relaycore {__version__} listening on {config.host}:{relay.port} "
                      f"(fast path: {fast_path})", flush=True)
                print(f"connection string: {relay.connection_string}", flush=True)
                if config.redis is not None:
                    print(f"cluster: {relay.backplane}", flush=True)
                if open_files:
                    print(open_files, flush=True)
                if config.uses_development_key:
                    print("WARNING: using the built-in development access key; set --access-key "
                          "or RELAYCORE_ACCESS_KEY for anything but local development", flush=True)
                async for _ in signals:
                    print("relaycore: draining connections", flush=True)
                    await relay.drain()
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    if failure:
        print(f"relaycore: {failure[0]}", file=sys.stderr)
        return 2
    return 0


async def _drain_without_supervisor() -> None:
    """A worker whose supervisor is gone drains as on SIGTERM (it is no use alone)."""
    from .relay._workers import watch_supervisor

    await watch_supervisor()
    os.kill(os.getpid(), signal.SIGTERM)


def _supervise(args: argparse.Namespace, config: object) -> int:
    """``serve --workers N``: start N worker processes on one port, one cluster on Redis (the
    ``--redis`` given or a private ``redis-server``), until SIGINT or SIGTERM."""
    import shutil

    import trio

    from .relay import RelayConfig
    from .relay._workers import PrivateRedis, Supervisor, reserve_port, worker_command, worker_count

    assert isinstance(config, RelayConfig)
    try:
        count = worker_count(args.workers)
    except ValueError as exc:
        print(f"relaycore: bad configuration: --workers: {exc}", file=sys.stderr)
        return 2
    try:
        from .relay import _redis  # noqa: F401  (the workers need the Redis backplane)
    except ImportError as exc:
        print(f"relaycore: --workers makes one cluster on Redis, which needs hiredis ({exc}); "
              "install it with pip install 'relaycore[redis]'", file=sys.stderr)
        return 2
    server = None
    if config.redis is None:
        server = shutil.which("redis-server")
        if server is None:
            print("relaycore: --workers needs --redis, or redis-server installed for a private "
                  "one", file=sys.stderr)
            return 2
    try:
        reserved = reserve_port(config.host, config.port)
    except OSError as exc:
        print(f"relaycore: cannot listen on {config.host}:{config.port}: {_reason(exc)}",
              file=sys.stderr)
        return 2
    port = int(reserved.getsockname()[1])
    status: list[int] = []
    argv = list(args.argv)
    if args.transports is None and config.transports != ["WebSockets"]:
        # every request of an event stream or a long poll must reach the worker that holds
        # its connection, and the kernel spreads requests over workers at random
        argv += ["--transports", "WebSockets"]

    def say(line: str) -> None:
        print(line, flush=True)

    async def main() -> None:
        private = PrivateRedis(server) if server is not None else None
        try:
            if private is not None:
                try:
                    await private.start()
                except (RuntimeError, OSError, trio.TooSlowError) as exc:
                    print(f"relaycore: could not start a private redis-server: {exc}",
                          file=sys.stderr)
                    status.append(2)
                    return
                say(f"relaycore: no --redis given: started a private redis-server for the "
                    f"workers at {private.url}; it stops with this command")
            redis = config.redis or private.url  # type: ignore[union-attr]
            say(f"relaycore: {count} workers on {config.host}:{port} (SO_REUSEPORT), one "
                f"cluster on Redis {redis}")
            if argv != args.argv:
                say("relaycore: the workers serve WebSockets only (Server-Sent Events and long "
                    "polling need each request on the worker that holds the connection; name "
                    "--transports to choose)")
            supervisor = Supervisor(worker_command(argv, port, redis), count, say)
            status.append(await supervisor.run(ready=lambda: say(
                f"relaycore: {count} workers listening on {config.host}:{port}")))
        finally:
            if private is not None:
                with trio.CancelScope(shield=True):
                    await private.stop()

    try:
        trio.run(main)
    finally:
        reserved.close()
    return status[0] if status else 0


def _raise_open_file_limit() -> str | None:
    """Raise this process's soft open-file limit to the hard one (every connection is a file
    descriptor; 1,024 is a common default) and say what it is now."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def shown(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)

    if soft == hard:
        return f"open files: {shown(soft)} (the hard limit)"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        return f"open files: {shown(soft)} (could not raise it to {shown(hard)}: {exc})"
    return f"open files: {shown(soft)} -> {shown(hard)} (the soft limit raised to the hard one)"


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

    admin_key = args.admin_key or os.environ.get("RELAYCORE_ADMIN_KEY")
    if not admin_key:
        print("relaycore fault: the relay's admin key is needed: --admin-key or "
              "RELAYCORE_ADMIN_KEY (the relay's admin API is on only when it was started with "
              "one)", file=sys.stderr)
        return 2
    try:
        if args.connection_string:
            cs = ConnectionString.parse(args.connection_string)
        else:
            config = RelayConfig.load(env={}, overrides={"port": args.port})
            cs = ConnectionString.parse(config.connection_string())
    except ValueError as exc:
        print(f"relaycore fault: {exc}", file=sys.stderr)
        return 2
    path = "/api/admin/faults"
    base = cs.server_base.rstrip("/")
    token = generate_access_token(admin_key, cs.audience_base.rstrip("/") + path,
                                  now=time.time())
    try:
        response = httpx.put(base + path,
                             params={"serverConnections": args.server_connections},
                             headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        print(f"relaycore fault: cannot reach {base}: {_reason(exc).lower()}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        answer = " ".join(response.text.split())  # one line, whatever the body
        print(f"relaycore fault: {base} answered {response.status_code} "
              f"{response.reason_phrase}: {answer}", file=sys.stderr)
        return 1
    print(response.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m relaycore", description=(
        "relaycore: a self-hosted relay wire-compatible with Azure SignalR Service."),
        epilog="Exit status: 0 done; 1 the command failed (fault: the relay could not be "
               "reached or refused); 2 bad arguments or configuration, or serve could not "
               "start. Errors are one line on stderr.")
    parser.add_argument("--version", action="version", version=f"relaycore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a relay node (defaults: one node, in memory, "
                                         "port 8080, a development key)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on (default 8080; 0 = any)")
    serve.add_argument("--access-key", help="the key tokens are signed with (env "
                       "RELAYCORE_ACCESS_KEY); comma-separated for several, each accepted: "
                       "k1,k2")
    serve.add_argument("--public-endpoint", help="the URL clients reach this relay at")
    serve.add_argument("--admin-key", help="turn the admin API (fault injection, `relaycore "
                       "fault`) on, for tokens signed with this key (env RELAYCORE_ADMIN_KEY); "
                       "never one of the access keys; off by default")
    serve.add_argument("--config", help="a TOML file of settings (see docs/configuration.md)")
    serve.add_argument("--log-level", type=_log_level,
                       help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL")
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
    serve.add_argument("--transports", type=_transports, metavar="NAMES",
                       help="the transports clients may use, comma-separated (env "
                            "RELAYCORE_TRANSPORTS; default WebSockets,ServerSentEvents,"
                            "LongPolling)")
    serve.add_argument("--redis", metavar="URL",
                       help="join the cluster of every relay node on this Redis: they act as "
                            "one endpoint (redis://HOST:PORT/DB or unix:///PATH; env "
                            "RELAYCORE_REDIS); default: this node alone, in memory")
    serve.add_argument("--cluster-name", help="separates several clusters on one Redis "
                       "(default relaycore)")
    serve.add_argument("--workers", metavar="N",
                       help="run N worker processes sharing the port (SO_REUSEPORT), one "
                            "cluster on --redis or, without it, on a private redis-server; "
                            "auto (or 0): one per core; a worker that dies is started again")
    # what the supervisor of --workers starts each worker with
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="print a client URL and access token for a hub "
                                         "(what a negotiate redirect carries)")
    token.add_argument("--hub", required=True)
    token.add_argument("--user", help="user id (the token's asrs.s.uid claim)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    token.add_argument("--application", help="application name (hub becomes app_hub)")
    token.add_argument("--connection-string", help="default: the local development relay")
    token.add_argument("--port", type=_port)
    token.add_argument("--access-key")
    token.add_argument("--public-endpoint")
    token.set_defaults(func=_token)

    fault = sub.add_parser("fault", help="rehearse an outage: make a running relay refuse, drop "
                                         "or ignore app-server connections (none heals)",
                           epilog="Exit status: 0 done; 1 the relay could not be reached or "
                                  "refused; 2 bad arguments.")
    fault.add_argument("--server-connections", required=True,
                       choices=["none", "refuse", "drop", "silence"])
    fault.add_argument("--admin-key", help="the key the relay was started with as --admin-key "
                       "(env RELAYCORE_ADMIN_KEY)")
    fault.add_argument("--connection-string", help="where the relay is (its Endpoint; the "
                       "AccessKey is not used); default: the local relay")
    fault.add_argument("--port", type=_port)
    fault.set_defaults(func=_fault)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
