"""gpte-ray: batch text embeddings on Ray into LanceDB tables."""

from __future__ import annotations

from gpte_ray.config import ConfigError, JobConfig, load_config

__all__ = ["ConfigError", "JobConfig", "Searcher", "load_config", "run_index"]
__version__ = "0.1.0"


def run_index(*args, **kwargs):
    """Run one `index` job (see `gpte_ray.run.pipeline.run_index`); imported lazily to keep Ray out."""
    from gpte_ray.run.pipeline import run_index as _run

    return _run(*args, **kwargs)


def __getattr__(name: str):
    # `gpte_ray.Searcher` without importing Lance and torch for every `import gpte_ray`
    if name == "Searcher":
        from gpte_ray.query.search import Searcher

        return Searcher
    raise AttributeError(f"module 'gpte_ray' has no attribute {name!r}")
