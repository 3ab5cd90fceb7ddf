"""The Ray side of a run: joining or starting the cluster, the embed device, checks that need
the cluster, and the user's error inside a Ray-wrapped exception."""

from __future__ import annotations

import logging
import os

from gpte_ray.config import ConfigError, JobConfig
from gpte_ray.input.pins import ShardChangedError
from gpte_ray.input.sources import ShardError
from gpte_ray.model.spec import ModelSpec

__all__ = ["check_fits", "check_reachable", "check_room", "choose_device", "connect_ray", "is_local", "user_error"]

def is_local(address: str | None) -> bool:
    """Whether `address` asks for a private local Ray (started by this process)."""
    return address in (None, "", "local")


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (a job's own cluster under `ray job submit`), or start a
    private local one for address 'local'/None. Never attaches to a stray cluster by accident."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if is_local(address):
        # Ray >= 2.52 turns token auth on for a new local cluster unless RAY_AUTH_MODE says
        # otherwise, and writes ~/.ray/auth_token; a later `ray start --head` then finds that
        # file and demands the token from every submitter. Nothing outside this process can
        # reach the private cluster (no dashboard, no client server), so auth stays off.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        check_reachable(address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    import ray.data

    # our own progress line counts rows; Ray's per-operator bars would interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """One line when nothing answers at a cluster address (ray.init retries for minutes)."""
    import socket
    from urllib.parse import urlsplit

    if address == "auto":  # the address of a cluster started on this machine, read by Ray
        return
    try:
        parts = urlsplit(address if "://" in address else f"gcs://{address}")
        host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError:
        return  # Ray's own message is better than a guess
    if host is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"config error: --ray-address {address}: nothing answers at {host}:{port} "
                          f"({e.strerror or e}); start the cluster, or check the address") from None


def choose_device(cfg: JobConfig, local: bool = False) -> str:
    """The embed device. `local`: Ray was started by this process (no autoscaler can add GPUs)."""
    import ray

    if cfg.resources.device == "cuda" and local and not cfg.resources.fake_gpus and \
            not ray.cluster_resources().get("GPU", 0):
        # a cluster may still scale GPU workers up from zero; this private Ray never will
        raise ConfigError("config error: resources.device: cuda, but this machine has no GPU that Ray can see "
                          "(use --device auto or cpu, or --ray-address of a cluster with GPU workers)")
    if cfg.resources.device != "auto":
        return cfg.resources.device
    if cfg.resources.fake_gpus:
        return "cpu"
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def check_fits(cfg: JobConfig, device: str) -> None:
    """Refuse actors that, with the read tasks, need more CPUs than the cluster has."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    r = cfg.resources
    if device == "cpu" and total and r.cpus_per_actor + r.read_cpus > total:
        raise ConfigError(
            f"config error: resources.cpus_per_actor: {r.cpus_per_actor} CPUs per actor plus "
            f"{r.read_cpus} for reads exceed the cluster's {total:g} CPUs (the job would hang)"
        )


MIN_TEXT_TOKENS = 8  # the smallest chunk of text worth a vector


def check_room(spec: ModelSpec, num_cpus: float) -> None:
    """Refuse a max_length that leaves (almost) no room for text after the special tokens and
    the document prompt: every vector would silently embed a few tokens of each chunk. Runs
    where the tokenizer runs (a worker fetches the model; the driver never does)."""
    import ray

    def room() -> int:
        from gpte_ray.model.tokenize import TextTokenizer

        tok = TextTokenizer(spec)
        return len(tok.tok(spec.document_prefix + spec.document_suffix, add_special_tokens=True)["input_ids"])

    try:
        overhead = ray.get(ray.remote(num_cpus=num_cpus)(room).remote())
    except Exception as e:
        raise (user_error(e) or e) from None
    if spec.max_length - overhead < MIN_TEXT_TOKENS:
        raise ConfigError(
            f"config error: model.max_length: {spec.max_length} leaves {max(0, spec.max_length - overhead)} "
            f"tokens for text after {overhead} special and prompt tokens (need at least {MIN_TEXT_TOKENS})"
        )


def user_error(e: BaseException) -> BaseException | None:
    """The original ShardError/ConfigError inside a Ray-wrapped exception, if any.

    Ray re-raises a task's exception as a class derived from both RayTaskError and the
    original type, with the remote traceback as its message; the original is its `cause`.
    """
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ShardChangedError) and not isinstance(e, RayTaskError):
            return ShardChangedError(str(e).splitlines()[0], e.uri)
        if isinstance(e, (ShardError, ConfigError)) and not isinstance(e, RayTaskError):
            # our messages are one line; Ray may append its retry advice below it
            return type(e)(str(e).splitlines()[0])
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
