"""Run and data paths, local or in a bucket: every one is an `etils.epath.Path`.

`pathlib` treats `gs://bucket/runs/x` as a relative local path (`gs:/bucket/runs/x`
under the working directory), so each host of a pod would write its own local
folder named `gs:`. `resolve` keeps such a URI as it is and makes a local path
absolute; `epath` then reads and writes both, `gs://` through gcsfs (the `gcs`
extra).

Examples:
  >>> str(resolve("gs://bucket/runs/x"))
  'gs://bucket/runs/x'
  >>> resolve("runs/x").is_absolute()
  True
  >>> is_uri("gs://bucket/x"), is_uri("/tmp/x")
  (True, False)
"""

from __future__ import annotations

import io
import os

from etils import epath

__all__ = ["is_uri", "resolve", "save_figure", "write_text_atomic"]


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (`gs://...`, `s3://...`) rather than a local file."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URI unchanged, a local path made absolute."""
    if is_uri(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """`fig.savefig` to a local or bucket path (matplotlib itself writes local files only)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    resolve(path).write_bytes(buffer.getvalue())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so that a concurrent reader sees the old file or the new, whole.

    `Path.write_text` truncates the file first, so another host or process
    reading at that moment gets an empty or half-written file. Locally the text
    goes to a temporary file beside `path`, renamed over it (`os.replace`,
    atomic on one file system). An object store (`gs://...`) already replaces
    an object whole when its upload finishes, so there it is one write.
    """
    path = resolve(path)
    if is_uri(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
