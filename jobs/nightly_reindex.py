"""Nightly incremental reindex: `ray job submit --submission-id nightly-$(date +%F) ... --
python jobs/nightly_reindex.py --config configs/nightly.yaml`.

The same run as `gpte-ray index` (flags and config alike): against an existing table it embeds
only new and changed documents, deletes vanished ones (behind the mass-deletion guard) and
commits once. A run killed mid-way resumes from its staged work when started again; Ray
refuses a second submission with the same submission id, so the schedule is idempotent.
"""

from __future__ import annotations

import sys

from gpte_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
