"""Entrypoint for `ray job submit ... -- python jobs/index_corpus.py --input ... --db ... --table ...`.

Takes exactly the flags of `gpte-ray index`. Under `ray job submit` Ray sets RAY_ADDRESS, so
the run joins the cluster it was submitted to.
"""

from __future__ import annotations

import sys

from gpte_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
