"""Write the seed corpus of every harness to ``fuzz/corpus/<parser>/`` (generated, not kept in
git: ``make fuzz`` runs this first; inputs the fuzzers found there are kept between runs).

The seeds are the byte vectors of ``tests/vectors`` (hub protocol JSON, MessagePack and
handshake; service protocol frames) and a few handwritten HTTP requests, WebSocket frames,
tokens and connection strings, each in its harness's input format (most harnesses read a flag
byte first: see each harness's docstring).

    python fuzz/seed_corpus.py [--out fuzz/corpus]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
KEY = "fuzz-access-key"  # the key fuzz_jwt.py and fuzz_rest.py validate with


def _vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


HTTP_REQUESTS = [
    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost",
    b"POST /client/negotiate?hub=chat&negotiateVersion=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"POST /api/hubs/chat/:send?api-version=2022-06-01 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 32\r\n\r\n"
    b'{"target":"t","arguments":[1,2]}',
    b"POST /api/v1/hubs/app_chat/users/u HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/x-msgpack\r\nContent-Length: 13\r\n\r\n"
    b"\x81\xa4json\xc4\x06{\"a\":1}",
    b"PUT /api/hubs/chat/groups/g/users/u?api-version=2022-06-01&ttl=30 HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    b"DELETE /api/hubs/chat/users/u/groups?api-version=2022-06-01&application=app HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\nOrigin: http://a.example\r\n\r\n",
    b"POST /api/hubs/chat/groups/g%2Fh/:closeConnections?api-version=2022-06-01&excluded=c1"
    b"&reason=bye HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    b"PUT /api/admin/faults?serverConnections=refuse HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"POST /api/hubs/chat/:send HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /client/?hub=chat&access_token=x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
]


def seeds() -> dict[str, list[bytes]]:
    hub = _vectors("hub-protocol.json")
    service = _vectors("service-protocol.json")
    hub_json = [v["text"].encode("utf-8") for group in ("json", "json_client_accepts",
                                                       "json_client_rejects")
                for v in hub[group]]
    hub_msgpack = [bytes.fromhex(v["framed_hex"]) for group in ("msgpack", "msgpack_invalid")
                   for v in hub[group] if "framed_hex" in v]
    hub_msgpack.append(bytes.fromhex(hub["msgpack_multi"]["framed_hex"]))
    handshake = [v["text"].encode("utf-8") for v in hub["handshake"]]
    service_frames = [bytes.fromhex(v["framed_hex"]) for v in service["vectors"]]
    mask = b"\x37\xfa\x21\x3d"
    client_frames = [  # what a client sends a server: masked
        ws_frame(0x1, b"Hello", mask=mask),
        ws_frame(0x1, b"Hel", fin=False, mask=mask) + ws_frame(0x0, b"lo", mask=mask),
        ws_frame(0x2, hub_msgpack[0], mask=mask),
        ws_frame(0x9, b"ping", mask=mask) + ws_frame(0xA, b"", mask=mask),
        ws_frame(0x8, b"\x03\xe8bye", mask=mask),
        ws_frame(0x1, hub_json[0] * 3, mask=mask),
        ws_frame(0x2, b"x" * 300, mask=mask),
    ]
    server_frames = [ws_frame(0x1, b"Hello"), ws_frame(0x2, service_frames[0]),
                     ws_frame(0x8, b"\x03\xe9"), ws_frame(0x9, b"")]

    from relaycore.protocol._auth import generate_access_token

    tokens = [generate_access_token(KEY, aud, now=now, lifetime=3600, user_id=user).encode()
              for aud, now, user in [("http://127.0.0.1/client/?hub=chat", 1.7e9, "u"),
                                     ("https://h/api/hubs/chat/users/u/:send", 0, None)]]
    tokens.append(generate_access_token("another-key", "http://h/", now=0).encode())
    return {
        "websocket": [b"\x00" + f for f in client_frames] + [b"\x01" + f for f in server_frames]
        + [b"\x08" + b"".join(client_frames)],
        "hub_json": [b"\x00" + v for v in hub_json] + [b"\x00" + b"".join(hub_json[:5])],
        "hub_msgpack": [b"\x00" + v for v in hub_msgpack],
        "handshake": handshake,
        "service": [b"\x00" + v for v in service_frames] + [b"\x01" + v for v in service_frames]
        + [b"\x11" + b"".join(service_frames[:8])],
        "negotiate": [b"1", b"0", b" +1\t", b"-1", b"2147483648", b"01", b"\xd9\xa1"],
        "jwt": tokens + [b"a.b.c", b"e30.e30."],
        "connection_string": [
            b"Endpoint=http://localhost;Port=8888;AccessKey=k;Version=1.0;",
            b"Endpoint=https://h.service.signalr.net;AccessKey=key;Version=1.0;"
            b"ClientEndpoint=https://c.example;ServerEndpoint=https://s.example/path;",
            b"Endpoint=https://h;AuthType=aad;Version=1.0;",
            b"endpoint=http://[::1]:8080/;accesskey=x;",
        ],
        "http": [b"\x06" + r for r in HTTP_REQUESTS] + [b"\x1e" + b"".join(HTTP_REQUESTS[:3])],
        "rest": [b"\x01" + r for r in HTTP_REQUESTS] + [b"\x00" + r for r in HTTP_REQUESTS[:3]],
        "fastpath": [bytes([which]) + data for which in range(8)
                     for data in (client_frames[1], hub_json[1], hub_msgpack[1])],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "corpus"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name, inputs in seeds().items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)  # inputs found by earlier runs are kept
        for data in inputs:
            (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
        print(f"{name}: {len(inputs)} seeds in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
