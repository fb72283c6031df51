"""A file server on 127.0.0.1 for download tests (no test reaches the network)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time


@contextlib.contextmanager
def loopback(folder, delay: float = 0.0):
    """An HTTP server on 127.0.0.1 serving ``folder``, ``delay`` s after each 64 kB (so a
    download lasts long enough to cancel); yields its address and the paths asked for."""
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def copyfile(self, source, outputfile):
            try:
                while chunk := source.read(1 << 16):
                    outputfile.write(chunk)
                    time.sleep(delay)
            except (BrokenPipeError, ConnectionResetError):  # the client cancelled
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
