"""Where herd finds its repository, configs and data.

Relative paths in herd's configs (``data/prepared/stdlib``, ``configs/``) are resolved against
the repository root, not the current directory, so that commands behave the same wherever they
are started. Set ``HERD_ROOT`` to point herd at another checkout or working folder.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from urllib.parse import urlparse

_MARKERS = ("pyproject.toml", "configs")


def repo_root() -> Path:
    """The herd repository root: ``$HERD_ROOT``, else the checkout holding this package, else the cwd."""
    if env := os.environ.get("HERD_ROOT"):
        return Path(env).expanduser().resolve()
    for parent in Path(__file__).resolve().parents:
        if all((parent / marker).exists() for marker in _MARKERS):
            return parent
    return Path.cwd()


def resolve(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if absolute, else ``path`` under :func:`repo_root`. ``~`` is expanded."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def cache_dir() -> Path:
    """herd's cache: ``$XDG_CACHE_HOME/herd`` (default ``~/.cache/herd``). Anything in it can be deleted."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "herd"


def is_url(location: str) -> bool:
    """True for locations that webdataset opens itself (``http://``, ``s3://``, ``pipe:`` ...).

    Locations the user writes in a config may be ``pipe:`` commands; locations read from a
    file (a manifest) never may: see :func:`url_scheme` and ``herd.data.manifest.Manifest``.
    """
    return "://" in location or location.startswith("pipe:")


def url_scheme(location: str) -> str:
    """The scheme webdataset's ``gopen`` dispatches on, lower-cased (``""`` for a plain path)."""
    return urlparse(location).scheme.lower()


def resolve_location(location: str) -> str:
    """A local path resolved like :func:`resolve`, or a URL unchanged."""
    return location if is_url(location) else str(resolve(location))


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on device; disk quota exceeded


def disk_full(err: BaseException) -> OSError | None:
    """The "no space left on device" (or quota) OSError behind ``err``, if any: ``err`` itself or one it
    was raised from or while handling (torch's writers, for one, re-raise it as a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None
