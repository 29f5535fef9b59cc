#!/usr/bin/env node
// A long-running driver for the official @microsoft/signalr client, used by relaycore's
// end-to-end tests (tests/e2e/conftest.py).
//
// It reads one JSON command per line on stdin and answers one JSON line per command on stdout:
//
//   {"id":1,"cmd":"connect","name":"a","url":"http://127.0.0.1:P/client/?hub=chat",
//    "token":"<jwt>","protocol":"json"|"messagepack","methods":["notify"],
//    "skipNegotiation":false, "statefulReconnect":false, "automaticReconnect":false,
//    "transport":"WebSockets"|"ServerSentEvents"|"LongPolling"}
//        -> {"id":1,"ok":true,"connectionId":"..."}  or  {"id":1,"ok":false,"error":"..."}
//   {"id":2,"cmd":"stop","name":"a"}                             -> {"id":2,"ok":true}
//   {"id":3,"cmd":"invoke","name":"a","method":"m","args":[...]} -> {"id":3,"ok":true,"result":...}
//   {"id":4,"cmd":"send","name":"a","method":"m","args":[...]}   -> {"id":4,"ok":true}
//   {"id":5,"cmd":"on","name":"a","methods":["other"]}           -> {"id":5,"ok":true}
//   {"id":6,"cmd":"state","name":"a"}           -> {"id":6,"ok":true,"state":"Connected",...}
//   {"id":7,"cmd":"exit"}                        -> {"id":7,"ok":true}, then the process exits
//
// and writes events as they happen:
//
//   {"event":"message","name":"a","method":"notify","args":[...]}
//   {"event":"closed","name":"a","error":"..."|null}
//   {"event":"reconnecting","name":"a","error":"..."|null}   (with automaticReconnect)
//   {"event":"reconnected","name":"a","connectionId":"..."|null}
//
// Binary values (Uint8Array, as MessagePack bin decodes) travel as {"$bytes": "<base64>"} in
// both directions. Client logging (LogLevel.Warning and above) goes to stderr; stdout carries
// nothing but the JSON lines above.
"use strict";

const readline = require("readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

// Keep stdout clean for the protocol, whatever a library might print.
const out = process.stdout;
console.log = console.info = console.debug = (...a) => process.stderr.write(a.join(" ") + "\n");

function emit(obj) {
  out.write(JSON.stringify(encode(obj)) + "\n");
}

function encode(value) {
  if (value instanceof Uint8Array) {
    return { $bytes: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("base64") };
  }
  if (value instanceof ArrayBuffer) {
    return { $bytes: Buffer.from(value).toString("base64") };
  }
  if (value instanceof Map) {
    const obj = {};
    for (const [k, v] of value) obj[String(k)] = encode(v);
    return obj;
  }
  if (typeof value === "bigint") {
    return { $bigint: value.toString() };
  }
  if (value instanceof Date) {
    return value.toISOString();
  }
  if (Array.isArray(value)) return value.map(encode);
  if (value !== null && typeof value === "object") {
    const obj = {};
    for (const k of Object.keys(value)) obj[k] = encode(value[k]);
    return obj;
  }
  return value === undefined ? null : value;
}

function decode(value) {
  if (Array.isArray(value)) return value.map(decode);
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$bytes") {
      return new Uint8Array(Buffer.from(value.$bytes, "base64"));
    }
    const obj = {};
    for (const k of keys) obj[k] = decode(value[k]);
    return obj;
  }
  return value;
}

class StderrLogger {
  constructor(name, minLevel) {
    this.name = name;
    this.minLevel = minLevel;
  }
  log(level, message) {
    if (level >= this.minLevel) {
      process.stderr.write(`[agent ${this.name}] ${signalR.LogLevel[level]}: ${message}\n`);
    }
  }
}

const connections = new Map(); // name -> HubConnection
const handled = new Map(); // name -> Set of method names with a handler

function errorText(err) {
  if (err === undefined || err === null) return null;
  return err && err.message !== undefined ? String(err.message) : String(err);
}

function addHandlers(name, conn, methods) {
  const set = handled.get(name);
  for (const method of methods || []) {
    if (set.has(method)) continue;
    set.add(method);
    conn.on(method, (...args) => emit({ event: "message", name, method, args }));
  }
}

function getConnection(name) {
  const conn = connections.get(name);
  if (!conn) throw new Error(`no connection named '${name}'`);
  return conn;
}

const commands = {
  async connect(msg) {
    if (connections.has(msg.name)) throw new Error(`connection '${msg.name}' already exists`);
    const transport = msg.transport || "WebSockets";
    if (!(transport in signalR.HttpTransportType)) throw new Error(`unknown transport '${transport}'`);
    const options = {
      transport: signalR.HttpTransportType[transport],
      skipNegotiation: Boolean(msg.skipNegotiation),
    };
    if (msg.token !== undefined && msg.token !== null) {
      const token = msg.token;
      options.accessTokenFactory = () => token;
    }
    let builder = new signalR.HubConnectionBuilder()
      .withUrl(msg.url, options)
      .configureLogging(new StderrLogger(msg.name, signalR.LogLevel.Warning));
    if (msg.statefulReconnect) builder = builder.withStatefulReconnect();
    if (msg.automaticReconnect) builder = builder.withAutomaticReconnect();
    const protocol = msg.protocol || "json";
    if (protocol === "messagepack") {
      builder = builder.withHubProtocol(new MessagePackHubProtocol());
    } else if (protocol !== "json") {
      throw new Error(`unknown protocol '${protocol}'`);
    }
    const conn = builder.build();
    if (msg.serverTimeoutMs) conn.serverTimeoutInMilliseconds = msg.serverTimeoutMs;
    if (msg.keepAliveMs) conn.keepAliveIntervalInMilliseconds = msg.keepAliveMs;
    connections.set(msg.name, conn);
    handled.set(msg.name, new Set());
    addHandlers(msg.name, conn, msg.methods);
    conn.onclose((err) => emit({ event: "closed", name: msg.name, error: errorText(err) }));
    conn.onreconnecting((err) => emit({ event: "reconnecting", name: msg.name, error: errorText(err) }));
    conn.onreconnected((id) => emit({ event: "reconnected", name: msg.name, connectionId: id || null }));
    try {
      await conn.start();
    } catch (err) {
      connections.delete(msg.name);
      handled.delete(msg.name);
      throw err;
    }
    return { connectionId: conn.connectionId };
  },

  async on(msg) {
    addHandlers(msg.name, getConnection(msg.name), msg.methods);
    return {};
  },

  async stop(msg) {
    await getConnection(msg.name).stop();
    return {};
  },

  async invoke(msg) {
    const result = await getConnection(msg.name).invoke(msg.method, ...decode(msg.args || []));
    return { result: result === undefined ? null : result };
  },

  async send(msg) {
    await getConnection(msg.name).send(msg.method, ...decode(msg.args || []));
    return {};
  },

  async state(msg) {
    const conn = getConnection(msg.name);
    return { state: conn.state, connectionId: conn.connectionId };
  },

  async exit() {
    await stopAll();
    setImmediate(() => process.exit(0));
    return {};
  },
};

async function stopAll() {
  await Promise.allSettled([...connections.values()].map((c) => c.stop()));
}

async function handle(line) {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (err) {
    emit({ id: null, ok: false, error: `bad JSON command: ${err.message}` });
    return;
  }
  const handler = Object.prototype.hasOwnProperty.call(commands, msg.cmd) ? commands[msg.cmd] : null;
  if (!handler) {
    emit({ id: msg.id, ok: false, error: `unknown command '${msg.cmd}'` });
    return;
  }
  try {
    const result = await handler(msg);
    emit({ id: msg.id, ok: true, ...result });
  } catch (err) {
    emit({ id: msg.id, ok: false, error: errorText(err) });
  }
}

process.on("unhandledRejection", (err) => {
  process.stderr.write(`[agent] unhandled rejection: ${err && err.stack ? err.stack : err}\n`);
});

const rl = readline.createInterface({ input: process.stdin, terminal: false });
const inFlight = new Set();
rl.on("line", (line) => {
  if (!line.trim()) return;
  const p = handle(line);
  inFlight.add(p);
  p.finally(() => inFlight.delete(p));
});
rl.on("close", () => {
  // stdin closed (the test process went away): finish what was asked, stop, exit.
  Promise.allSettled([...inFlight])
    .then(stopAll)
    .finally(() => process.exit(0));
});
emit({ event: "ready", versions: { node: process.versions.node, signalr: signalR.VERSION } });
