#!/usr/bin/env node
// Streams both ways with the official @microsoft/signalr client, for relaycore's end-to-end
// tests (tests/e2e/test_streams_node.py). One run connects one HubConnection, plays one
// scenario against the app server behind the relay, and writes one JSON line on stdout: what
// the client saw. Client logging (LogLevel.Warning and above) goes to stderr.
//
//   node streams.js '{"url": "...", "token": "...", "protocol": "json"|"messagepack",
//                     "scenario": "upload"|"cancel"|"stop", "count": 1000, "flood": 1124}'
//
// upload: invoke("Sum", subject) with `count` numbered items; send("Collect", "sent", subject);
//         stream("Echo", subject, 2); a subject the client fails; stream counts that do not
//         match the method; `flood` items to a method that stops reading ("Stall"); a
//         download stream ("Count") and a client result ("AskCaller").
// cancel: stream("Echo", subject, 1), disposed of after 10 echoes (CancelInvocation); later
//         items of the subject; then invoke("Plain", 7) on the same connection.
// stop:   send("Collect", "unfinished", subject) with 10 items, then connection.stop().
"use strict";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

console.log = console.info = console.debug = (...a) => process.stderr.write(a.join(" ") + "\n");

const logger = {
  log(level, message) {
    if (level >= signalR.LogLevel.Warning) {
      process.stderr.write(`[streams] ${signalR.LogLevel[level]}: ${message}\n`);
    }
  },
};

function errorText(promise) {
  return promise.then(
    (value) => ({ unexpectedResult: value === undefined ? null : value }),
    (err) => (err && err.message !== undefined ? String(err.message) : String(err)),
  );
}

// Every item of a download stream, once it completes.
function collect(stream) {
  return new Promise((resolve, reject) => {
    const items = [];
    stream.subscribe({ next: (item) => items.push(item), complete: () => resolve(items), error: reject });
  });
}

// Push `count` items made by `make(i)` (i from 1), then complete.
function feed(subject, count, make) {
  for (let i = 1; i <= count; i++) subject.next(make(i));
  subject.complete();
}

const scenarios = {
  async upload(conn, args) {
    const count = args.count;
    const got = {};

    const summed = new signalR.Subject();
    const sum = conn.invoke("Sum", summed);
    feed(summed, count, (i) => ({ n: i, label: `item ${i}` }));
    got.sum = await sum;

    const sent = new signalR.Subject();
    await conn.send("Collect", "sent", sent);
    feed(sent, count, (i) => i);

    const echoed = new signalR.Subject();
    const echo = collect(conn.stream("Echo", echoed, 2));
    feed(echoed, count, (i) => i);
    got.echo = await echo;

    const failing = new signalR.Subject();
    const failed = errorText(conn.invoke("Sum", failing));
    failing.next({ n: 1, label: "item 1" });
    failing.error(new Error("the file is gone"));
    got.failed = await failed;

    got.noStream = await errorText(conn.invoke("Sum"));
    const extra = new signalR.Subject();
    got.extraStream = await errorText(conn.invoke("Plain", 1, extra));
    extra.complete();

    const flood = new signalR.Subject();
    const flooded = errorText(conn.invoke("Stall", flood));
    feed(flood, args.flood, (i) => i);
    got.flooded = await flooded;

    got.count = await collect(conn.stream("Count", 5));
    got.asked = await conn.invoke("AskCaller", 21);
    return got;
  },

  async cancel(conn) {
    const subject = new signalR.Subject();
    const echoes = [];
    let subscription;
    await new Promise((resolve, reject) => {
      subscription = conn.stream("Echo", subject, 1).subscribe({
        next: (item) => {
          echoes.push(item);
          if (echoes.length === 10) resolve();
        },
        complete: () => reject(new Error("the echo completed before it was cancelled")),
        error: reject,
      });
      for (let i = 1; i <= 10; i++) subject.next(i);
    });
    subscription.dispose(); // CancelInvocation
    subject.next(11); // the upload goes on: its items are dropped
    subject.complete();
    return { echoes, after: await conn.invoke("Plain", 7) };
  },

  async stop(conn) {
    const subject = new signalR.Subject();
    await conn.send("Collect", "unfinished", subject);
    for (let i = 1; i <= 10; i++) subject.next(i);
    // Answered after the items were read: they reached the method before the stop.
    const plain = await conn.invoke("Plain", 1);
    return { plain };
  },
};

async function main() {
  const args = JSON.parse(process.argv[2]);
  let builder = new signalR.HubConnectionBuilder()
    .withUrl(args.url, {
      transport: signalR.HttpTransportType.WebSockets,
      accessTokenFactory: () => args.token,
    })
    .configureLogging(logger);
  if (args.protocol === "messagepack") builder = builder.withHubProtocol(new MessagePackHubProtocol());
  const conn = builder.build();
  conn.on("answer", (value) => value * 2);
  await conn.start();
  const connectionId = conn.connectionId;
  const result = await scenarios[args.scenario](conn, args);
  await conn.stop();
  process.stdout.write(JSON.stringify({ ok: true, connectionId, ...result }) + "\n");
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stdout.write(JSON.stringify({ ok: false, error: String(err && err.stack ? err.stack : err) }) + "\n");
    process.exit(1);
  },
);
