// node `socket.io` peer, written the way its docs recommend: rooms (socket.join) and
// io.to(room).emit(); bufferutil and utf-8-validate installed (docs: "Performance tuning").
//
// Common bench protocol (bench/peers/README.md), over Engine.IO v4 / Socket.IO v5:
// connect with ?room=R to join "all" (and R), or ?role=pub to publish; event "echo" comes back to
// the sender; event "pub" with "ROOM|payload" emits event "t" with payload to ROOM.
"use strict";
const { createServer } = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 0);
const httpServer = createServer();
const io = new Server(httpServer, { transports: ["websocket"], maxHttpBufferSize: 16 * 1024 * 1024 });

io.on("connection", (socket) => {
  const query = socket.handshake.query;
  if (query.role === "pub") {
    socket.on("pub", (msg) => {
      const bar = msg.indexOf("|");
      io.to(msg.slice(0, bar)).emit("t", msg.slice(bar + 1));
    });
    return;
  }
  socket.join("all");
  if (query.room) socket.join(query.room);
  socket.on("echo", (msg) => socket.emit("echo", msg));
});
httpServer.listen(port, "127.0.0.1", () =>
  console.log(`listening on 127.0.0.1:${httpServer.address().port}`));
