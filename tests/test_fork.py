"""After a fork (worker processes), the first request restarts the app's background threads."""

from __future__ import annotations

import os
import threading
import warnings

import webtest


def test_the_first_request_after_a_fork_starts_the_background_threads(make_settings):
    from kvapp import create_app

    app = create_app(make_settings(sweep_interval_seconds=3600))
    client = webtest.TestApp(app)
    try:
        client.get("/set?k=v")
        names = {thread.name for thread in threading.enumerate()}
        assert {"kvapp-metrics", "kvapp-sweeper"} <= names
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
            pid = os.fork()
        if pid == 0:  # the child: no thread survived the fork
            code = 1
            try:
                before = {thread.name for thread in threading.enumerate()}
                client.get("/get?key=k")
                after = {thread.name for thread in threading.enumerate()}
                if (
                    not before & {"kvapp-metrics", "kvapp-sweeper"}
                    and {
                        "kvapp-metrics",
                        "kvapp-sweeper",
                    }
                    <= after
                ):
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        app.close()
