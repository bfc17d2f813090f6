"""The ceiling: a hello-world WSGI app, served exactly as kvapp is.

It answers 200 and the same 6 bytes to any method, path and query, so every
wrk script of the matrix (POST /txn included) drives it unchanged.

`granian --interface wsgi bench.hello:app` serves it under granian, and
`python -m bench.hello --port P --workers N` under waitress, with kvapp's
config.ini settings and kvapp's worker processes.
"""

from __future__ import annotations

import argparse
import sys

from kvapp import workers
from kvapp.config import load_config

BODY = b"hello\n"
HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    # A request with a body (the txn script's POST /txn) has it read, as kvapp
    # does, so that the ceiling moves the same bytes; none is parsed.
    length = environ.get("CONTENT_LENGTH")
    if length:
        environ["wsgi.input"].read(int(length))
    start_response("200 OK", HEADERS)
    return [BODY]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    settings = load_config(host=args.host, port=args.port, workers=args.workers)
    return workers.serve(
        lambda: app, settings.waitress_options(), settings.workers, banner="serving hello-world"
    )


if __name__ == "__main__":
    sys.exit(main())
