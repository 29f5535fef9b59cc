"""relaycore's open-loop load generator (uvloop + picows, or asyncio + a lean WebSocket layer).

* ``wsclient``: the WebSocket client layer (``picows`` or ``own`` backend), source addresses.
* ``core``: ``Generator`` (connections, open-loop steps, deliveries, latency, CPU), ``Meter``.
* ``adapters``: SignalR (relaycore), raw WebSocket (ws, websockets, uWS.js) and Socket.IO
  (socket.io, python-socketio) subscribers and publishers; the echo app server.

``bench/run.py`` drives it through the scenarios; see ``bench/README.md``.
"""
