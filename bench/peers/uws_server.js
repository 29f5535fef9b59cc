// uWS.js peer (npm @trufflesuite/uws-js-unofficial, a native build of uNetworking/uWebSockets.js),
// written the way its README recommends: pub/sub topics and app.publish().
//
// Common bench protocol (bench/peers/README.md): /sub?room=R subscribes to topic "all" (and R);
// whatever a subscriber sends comes back to it (echo); /pub sends "ROOM|payload" and the server
// publishes payload to ROOM.
"use strict";
// The native build itself: the package's entry point would silently fall back to a slow
// JavaScript implementation if the binary did not load, which would not be uWS any more.
const uWS = require(
  `@trufflesuite/uws-js-unofficial/binaries/uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
);

const port = Number(process.argv[2] || 0);
const limit = Number(process.env.BENCH_SEND_BUFFER_LIMIT || 16 * 1024 * 1024);

const app = uWS.App();
app.ws("/*", {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024 * 1024,
  maxBackpressure: limit,
  idleTimeout: 120,
  sendPingsAutomatically: true,
  upgrade: (res, req, context) => {
    res.upgrade(
      { url: req.getUrl(), room: req.getQuery("room") || "" },
      req.getHeader("sec-websocket-key"),
      req.getHeader("sec-websocket-protocol"),
      req.getHeader("sec-websocket-extensions"),
      context,
    );
  },
  open: (ws) => {
    const data = ws.getUserData();
    if (data.url === "/pub") return;
    ws.subscribe("all");
    if (data.room) ws.subscribe(data.room);
  },
  message: (ws, message, isBinary) => {
    if (ws.getUserData().url === "/pub") {
      const buf = Buffer.from(message);
      const bar = buf.indexOf(124); // "|"
      app.publish(buf.toString("latin1", 0, bar), buf.subarray(bar + 1), isBinary);
    } else {
      ws.send(message, isBinary);
    }
  },
});
app.listen("127.0.0.1", port, (token) => {
  if (!token) {
    console.error("uws: cannot listen");
    process.exit(1);
  }
  console.log(`listening on 127.0.0.1:${uWS.us_socket_local_port(token)}`);
});
