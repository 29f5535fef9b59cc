// node `ws` peer, written the way its README recommends for broadcasting: iterate the clients
// and client.send(data, { binary: isBinary }) to each open one (bufferutil installed, as the
// README suggests for performance).
//
// Common bench protocol (bench/peers/README.md): /sub?room=R joins "all" (and R); whatever a
// subscriber sends comes back to it (echo); /pub sends "ROOM|payload" and the server sends
// payload to every open member of ROOM.
"use strict";
const { WebSocketServer, WebSocket } = require("ws");

const port = Number(process.argv[2] || 0);
const wss = new WebSocketServer({ host: "127.0.0.1", port, maxPayload: 16 * 1024 * 1024 });
const rooms = new Map(); // room -> Set of clients

function join(ws, room) {
  let members = rooms.get(room);
  if (!members) rooms.set(room, (members = new Set()));
  members.add(ws);
}

wss.on("connection", (ws, req) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/pub") {
    ws.on("message", (data, isBinary) => {
      const bar = data.indexOf(124); // "|"
      const members = rooms.get(data.toString("latin1", 0, bar));
      if (!members) return;
      const payload = data.subarray(bar + 1);
      members.forEach((client) => {
        if (client.readyState === WebSocket.OPEN) client.send(payload, { binary: isBinary });
      });
    });
    return;
  }
  const joined = ["all"];
  const room = url.searchParams.get("room");
  if (room) joined.push(room);
  for (const r of joined) join(ws, r);
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on("close", () => {
    for (const r of joined) {
      const members = rooms.get(r);
      members.delete(ws);
      if (!members.size) rooms.delete(r);
    }
  });
});
wss.on("listening", () => console.log(`listening on 127.0.0.1:${wss.address().port}`));
