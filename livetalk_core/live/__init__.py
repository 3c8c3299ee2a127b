"""Live mode: a session streams audio in and video blocks out on a clock (session.py), served over a WebSocket
(protocol.py, server.py; docs/live.md) to the page in web/ or to client.py."""
