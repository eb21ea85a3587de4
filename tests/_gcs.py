"""A real GCS JSON API on localhost for the bucket tests: gcp-storage-emulator, in memory.

`emulator()` starts the server on a free port with one empty bucket and points
every client of a `gs://` workdir at it through the environment, in this process
and in the command lines the tests start:

* `STORAGE_EMULATOR_HOST`: gcsfs (so `etils.epath`) and google-cloud-storage
  (tensorboardX's event files);
* `TENSORSTORE_GCS_HTTP_URL`: tensorstore, which writes orbax's arrays;
* anonymous access for gcsfs (`FSSPEC_GCS`), a fixed token for tensorstore
  (`GOOGLE_AUTH_TOKEN_FOR_TESTING`) and no metadata-server probe
  (`NO_GCE_CHECK`; the `GCE_METADATA_*` hosts name a closed local port), so no
  client looks for credentials anywhere else;
* `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs then skips its bucket-layout
  lookup over gRPC, an API the emulator does not serve.

The server is the emulator's own request handler and in-memory storage with one
addition: GCS sends an object's generation in the `x-goog-generation` header of
every media download, tensorstore reads it there ("Malformed StorageGeneration"
without it), and gcp-storage-emulator 2026.7.19 leaves it out; `_Handler` adds
it (and `x-goog-metageneration`) from the emulator's own object record.

Nothing is mocked: the project's code, gcsfs, tensorstore and
google-cloud-storage speak HTTP to the server as they would to GCS.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import re
import socket
import threading
import urllib.parse
import uuid

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage

BUCKET = "dirac-jax-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """The environment that points gcsfs, tensorstore and google-cloud-storage at `url`."""
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there: any metadata probe fails fast
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS": '{"token": "anon"}',
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
    }


class _Handler(RequestHandler):
    """The emulator's request handler, plus the generation headers of a media download."""

    _OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$")

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def end_headers(self):
        url = urllib.parse.urlsplit(self.path)
        match = self._OBJECT.match(url.path)
        media = "alt=media" in url.query or url.path.startswith("/download/")
        if self.command == "GET" and match and media and getattr(self, "_status", 0) in (200, 206):
            try:
                record = self.storage.get_file_obj(
                    match["bucket"], urllib.parse.unquote(match["name"])
                )
            except NotFound:
                record = None
            if record is not None:
                self.send_header("x-goog-generation", str(record["generation"]))
                self.send_header("x-goog-metageneration", str(record["metageneration"]))
        super().end_headers()

    def log_message(self, format, *args):
        pass  # one line per request otherwise


class Bucket:
    """The emulated bucket: `root(name)` is a fresh `gs://` folder in it for one test."""

    def __init__(self, name: str, url: str, env: dict[str, str]):
        self.name, self.url, self.env = name, url, env

    def root(self, name: str) -> str:
        return f"gs://{self.name}/{name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def emulator(bucket: str = BUCKET):
    """Runs the server with `bucket` and sets the client environment; restores it after."""
    import fsspec.config

    # The emulator logs every 404 (orbax and gcsfs probe for files that are not there yet).
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    storage = Storage(use_memory_fs=True)
    buckets.create_bucket(bucket, storage)
    # One request at a time, as the emulator's own server (its storage is not thread-safe).
    server = http.server.HTTPServer(("127.0.0.1", 0), functools.partial(_Handler, storage))
    thread = threading.Thread(target=server.serve_forever, name="gcs-emulator", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    env = client_env(url)
    saved = {k: os.environ.get(k) for k in env}
    saved_conf = dict(fsspec.config.conf.get("gcs", {}))
    os.environ.update(env)
    # fsspec read FSSPEC_* when it was imported; this process's reads also skip gcsfs's
    # listing cache, since the command lines under test write the bucket behind its back.
    fsspec.config.conf["gcs"] = {**saved_conf, "token": "anon", "use_listings_cache": False}
    try:
        yield Bucket(bucket, url, env)
    finally:
        fsspec.config.conf["gcs"] = saved_conf
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.shutdown()
        server.server_close()
