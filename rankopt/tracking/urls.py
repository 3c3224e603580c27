"""Storage and tracking URLs: check them before anything is written, never show their secrets.

Every place that prints, logs or records a URL (or an error message that may quote one)
goes through :func:`mask_url` / :func:`mask_text`, so a password in
``postgresql://user:secret@host/db`` never reaches the console, a log or MLflow.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from rankopt.errors import RankoptError

# scheme://user:password@  -- greedy up to the last '@' of the token, so a password holding '@' or '/' is covered
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/?#@'\"]*:)[^\s'\"]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|passwd|pwd|token|secret|api_key)=)[^&\s'\"]*")

STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
TRACKING_SCHEMES = ("http", "https", "file", "databricks", *STORAGE_SCHEMES)


def mask_url(url: str) -> str:
    """Hide a password in a URL (``user:secret@host`` -> ``user:***@host``), and secret query values."""
    return mask_text(url)


def mask_text(text: str) -> str:
    """:func:`mask_url` applied to every URL inside free text, such as an exception message."""
    text = _USERINFO.sub(r"\1***@", str(text))
    return _QUERY_SECRET.sub(r"\1***", text)


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.split("+")[0].lower()


def check_storage_url(url: str) -> str:
    """An Optuna RDB URL (``sqlite:///path``, ``postgresql://...``): raise a one-line error when it is not one."""
    problem = None
    if not isinstance(url, str) or "://" not in url:
        problem = "not a database URL"
    elif _scheme(url) not in STORAGE_SCHEMES:
        problem = f"scheme '{_scheme(url)}' is not a database Optuna can use"
    if problem:
        raise RankoptError(f"cannot open Optuna storage '{mask_url(str(url))}' ({problem}); pass a valid --storage "
                           "URL such as sqlite:///runs/optuna.db or postgresql://user@host:5432/optuna")
    return url


def check_tracking_uri(uri: str) -> str:
    """An MLflow tracking URI with an explicit scheme (a bare path would silently create a folder)."""
    if not isinstance(uri, str) or "://" not in uri:
        raise RankoptError(f"--tracking-uri '{mask_url(str(uri))}' is not a URI; write e.g. http://host:5000 or "
                           "sqlite:///runs/mlflow.db")
    scheme = _scheme(uri)
    if scheme not in TRACKING_SCHEMES:
        raise RankoptError(f"--tracking-uri scheme '{scheme}' is not one MLflow tracks to; use http(s)://, "
                           "sqlite:///, postgresql:// or file:///")
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise RankoptError(f"--tracking-uri '{mask_url(uri)}' has an invalid port") from None
        if not parts.hostname:
            raise RankoptError(f"--tracking-uri '{mask_url(uri)}' names no host; write e.g. http://host:5000")
    return uri


def sqlalchemy_url(url: str) -> str:
    """``url`` with a PostgreSQL driver SQLAlchemy can import here.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; rankopt's ``postgres`` extra
    installs psycopg2, so a bare URL is pointed at it when psycopg 3 is missing. URLs that name
    a driver (``postgresql+psycopg://``) are left alone.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"
