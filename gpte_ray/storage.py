"""Object storage: filesystems for shards and staging, Lance storage options, secret redaction.

Credentials come from the config or the standard AWS environment variables, at the point of
use. They are passed to pyarrow and Lance and nowhere else: `redact` scrubs them from any
text that leaves the process (errors, logs, reports).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import SecretStr

__all__ = ["ensure_dir", "filesystem", "is_remote", "join", "lance_options", "redact", "s3_client", "secret_values"]

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
_SECRET_KEYS = re.compile(r"(secret|token|password|access_key|key_id)", re.I)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The absolute path of a local (not remote) uri, with or without file://."""
    return os.path.abspath(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _plain(options: Mapping[str, SecretStr | str]) -> dict[str, str]:
    return {k: v.get_secret_value() if isinstance(v, SecretStr) else str(v) for k, v in options.items()}


def lance_options(options: Mapping[str, SecretStr | str], uri: str) -> dict[str, str] | None:
    """Storage options for Lance / LanceDB: config values, then the AWS environment."""
    if not uri.startswith("s3://"):
        return None
    opts = _plain(options)
    endpoint = opts.get("endpoint") or opts.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts.setdefault("aws_endpoint", endpoint)
        opts.pop("endpoint", None)
        if endpoint.startswith("http://"):
            opts.setdefault("allow_http", "true")
    region = opts.pop("region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("aws_region", region)
    for env, key in (
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
    ):
        if key not in opts and os.environ.get(env):
            opts[key] = os.environ[env]
    return opts


def filesystem(uri: str, options: Mapping[str, SecretStr | str] | None = None):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    import pyarrow.fs as pafs

    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), local_path(uri)
    opts = lance_options(options or {}, uri) or {}
    endpoint = opts.get("aws_endpoint")
    kwargs: dict = {"region": opts.get("aws_region", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    if opts.get("aws_access_key_id"):
        kwargs.update(
            access_key=opts["aws_access_key_id"],
            secret_key=opts.get("aws_secret_access_key"),
            session_token=opts.get("aws_session_token"),
        )
    fs = pafs.S3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=8), **kwargs
    )
    return fs, uri.removeprefix("s3://")


def s3_client(uri: str, storage_options: Mapping[str, SecretStr | str] | None = None):
    """A boto3 S3 client with the same endpoint, region and credentials as `filesystem`: for the
    requests pyarrow does not make (conditional PUTs and GETs, object heads)."""
    import boto3
    from botocore.config import Config

    opts = lance_options(storage_options or {}, uri) or {}
    return boto3.client(
        "s3",
        endpoint_url=opts.get("aws_endpoint"),
        region_name=opts.get("aws_region", "us-east-1"),
        aws_access_key_id=opts.get("aws_access_key_id"),
        aws_secret_access_key=opts.get("aws_secret_access_key"),
        aws_session_token=opts.get("aws_session_token"),
        config=Config(retries={"max_attempts": 8, "mode": "standard"}),
    )


def ensure_dir(fs, path: str) -> None:
    """Create a local folder; object stores have no folders (a marker object would only cost a request)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def secret_values(*option_maps: Mapping[str, SecretStr | str] | None) -> list[str]:
    """Every secret this process knows of: from the given options and the environment."""
    found = [os.environ[e] for e in _SECRET_ENV if os.environ.get(e)]
    for options in option_maps:
        for k, v in (options or {}).items():
            value = v.get_secret_value() if isinstance(v, SecretStr) else str(v)
            if isinstance(v, SecretStr) or _SECRET_KEYS.search(k):
                found.append(value)
    return [s for s in found if len(s) >= 4]


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every known secret replaced by ***."""
    for s in sorted(secrets if secrets is not None else secret_values(), key=len, reverse=True):
        text = text.replace(s, "***")
    return text
