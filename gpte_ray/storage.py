"""Object storage: filesystems for shards and staging, Lance storage options, secret redaction.

Local paths and `s3://` are read by pyarrow's own filesystems (its native S3 client is the
fastest); any other fsspec URL (`gs://`, `az://`, `hf://`, `https://`, `memory://`) through
fsspec, wrapped as a pyarrow filesystem, so every reader takes the same path. `fsspec_fs`
gives the fsspec filesystem itself (s3fs for `s3://`), whose listings carry each object's size
and ETag: the shards' fingerprints, without a request per shard.

Credentials come from the config or the standard AWS environment variables, at the point of
use. They are passed to pyarrow, fsspec and Lance and nowhere else: `redact` scrubs them from
any text that leaves the process (errors, logs, reports).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import SecretStr

__all__ = ["ensure_dir", "filesystem", "fsspec_fs", "is_remote", "join", "lance_options", "read_numbered", "redact",
           "s3_client",
           "s3fs_options", "secret_values", "with_scheme"]

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
_SECRET_KEYS = re.compile(r"(secret|token|password|access_key|key_id|^key$)", re.I)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The absolute path of a local (not remote) uri, with or without file://."""
    return os.path.abspath(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _plain(options: Mapping[str, SecretStr | str]) -> dict[str, str]:
    return {k: v.get_secret_value() if isinstance(v, SecretStr) else str(v) for k, v in options.items()}


_S3FS_NAMES = (("endpoint_url", "endpoint"), ("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"),
               ("token", "aws_session_token"))


def lance_options(options: Mapping[str, SecretStr | str], uri: str) -> dict[str, str] | None:
    """Storage options for Lance / LanceDB: config values, then the AWS environment."""
    if not uri.startswith("s3://"):
        return None
    opts = _plain(options)
    for alias, key in _S3FS_NAMES:  # s3fs's names for the same settings
        if alias in opts:
            opts.setdefault(key, opts.pop(alias))
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


def with_scheme(uri: str, path: str) -> str:
    """A path inside `uri`'s filesystem (as `filesystem` gives it) as a URI of the same scheme."""
    if not is_remote(uri):
        return path
    scheme = uri.split("://", 1)[0]
    return f"{scheme}://{path.lstrip('/') if scheme != 'memory' else path}"


def _flag(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def s3fs_options(options: Mapping[str, SecretStr | str] | None) -> dict:
    """s3fs's keyword arguments from the config's storage options, in the names s3fs users know
    (`profile`, `anon`, `requester_pays`, `endpoint_url`, `key`, `secret`, `token`) or the ones
    Lance takes (`endpoint`, `region`, `aws_access_key_id`, ...), then the AWS environment."""
    opts = _plain(options or {})
    endpoint = opts.get("endpoint_url") or opts.get("endpoint") or opts.get("aws_endpoint") \
        or os.environ.get("AWS_ENDPOINT_URL")
    region = opts.get("region") or opts.get("aws_region") or os.environ.get("AWS_REGION") \
        or os.environ.get("AWS_DEFAULT_REGION")
    out: dict = {"anon": _flag(opts.get("anon") or opts.get("anonymous")),
                 "requester_pays": _flag(opts.get("requester_pays")),
                 "client_kwargs": {"region_name": region} if region else {}}
    if endpoint:
        out["endpoint_url"] = endpoint
    if opts.get("profile"):
        out["profile"] = opts["profile"]
    for ours, theirs in (("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"),
                         ("token", "aws_session_token")):
        if opts.get(ours) or opts.get(theirs):
            out[ours] = opts.get(ours) or opts.get(theirs)
    return out


def fsspec_fs(uri: str, options: Mapping[str, SecretStr | str] | None = None):
    """(fsspec filesystem, path inside it) for a remote URI: s3fs for s3://, else fsspec's own
    implementation of the scheme, given the storage options as keyword arguments."""
    import fsspec

    scheme = uri.split("://", 1)[0]
    if scheme == "s3":
        import s3fs

        fs = s3fs.S3FileSystem(**s3fs_options(options))
    else:
        fs = fsspec.filesystem(scheme, **_plain(options or {}))
    # fsspec caches instances and their listings: a shard rewritten since must never be listed,
    # fingerprinted or read with its old size or ETag
    fs.invalidate_cache()
    return fs, fs._strip_protocol(uri)


def _needs_s3fs(options: Mapping[str, SecretStr | str] | None) -> bool:
    """Options pyarrow's native S3 client does not take: then s3fs reads too."""
    opts = options or {}
    return any(opts.get(k) for k in ("profile", "requester_pays"))


def filesystem(uri: str, options: Mapping[str, SecretStr | str] | None = None):
    """(pyarrow filesystem, path inside it) for a local path, an s3:// URI (pyarrow's native S3,
    or s3fs for options it lacks) or any other fsspec URL (fsspec behind a pyarrow filesystem)."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    if not uri.startswith("s3://") or _needs_s3fs(options):
        fs, path = fsspec_fs(uri, options)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
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
    if _flag(_plain(options or {}).get("anon") or _plain(options or {}).get("anonymous")):
        kwargs["anonymous"] = True
    fs = pafs.S3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=8), **kwargs
    )
    return fs, uri.removeprefix("s3://")


def s3_client(uri: str, storage_options: Mapping[str, SecretStr | str] | None = None):
    """A boto3 S3 client with the same endpoint, region and credentials as `filesystem`: for the
    requests pyarrow does not make (conditional PUTs and GETs, object heads)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    opts = lance_options(storage_options or {}, uri) or {}
    plain = _plain(storage_options or {})
    anon = _flag(plain.get("anon") or plain.get("anonymous"))
    session = boto3.Session(profile_name=plain["profile"]) if plain.get("profile") else boto3
    client = session.client(
        "s3",
        endpoint_url=opts.get("aws_endpoint"),
        region_name=opts.get("aws_region", "us-east-1"),
        aws_access_key_id=opts.get("aws_access_key_id"),
        aws_secret_access_key=opts.get("aws_secret_access_key"),
        aws_session_token=opts.get("aws_session_token"),
        config=Config(retries={"max_attempts": 8, "mode": "standard"}, signature_version=UNSIGNED if anon else None),
    )
    if _flag(plain.get("requester_pays")):  # the reader pays for the shards' GETs and HEADs
        for op in ("GetObject", "HeadObject"):
            client.meta.events.register(f"before-parameter-build.s3.{op}",
                                        lambda params, **_: params.setdefault("RequestPayer", "requester"))
    return client


def ensure_dir(fs, path: str) -> None:
    """Create a local folder; object stores have no folders (a marker object would only cost a request)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def read_numbered(folder: str, suffix: str, options: Mapping[str, SecretStr | str] | None = None) -> dict[int, str]:
    """The small text files `<n><suffix>` of a folder (one per shard), read in parallel: n -> text."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    fs, path = filesystem(folder, options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.base_name.endswith(suffix))

    def read(p: str) -> str:
        with fs.open_input_stream(p) as f:
            return f.read().decode()

    with ThreadPoolExecutor(16) as pool:  # object stores: many small GETs at once
        texts = list(pool.map(read, files))
    return {int(p.rsplit("/", 1)[-1].split(".")[0]): t for p, t in zip(files, texts)}


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
