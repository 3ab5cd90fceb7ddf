"""What the steps of one run share: built when the run starts, filled in step by step."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import pyarrow as pa

from gpte_ray.config import JobConfig
from gpte_ray.model.spec import ModelSpec
from gpte_ray.plan.diff import Diff
from gpte_ray.plan.shards import ShardChoice
from gpte_ray.report.run_report import RunReport
from gpte_ray.run.resume import StagedState
from gpte_ray.store.lock import TableLock
from gpte_ray.store.table import TableStore

__all__ = ["RunContext", "new_run_id"]


def new_run_id() -> str:
    """This run's own id: its UTC start and random digits, so ids sort by time and never repeat
    (two runs with the same work share a plan id, never a run id)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


@dataclass
class RunContext:
    """One run: its configuration and resources, then what each step found."""

    cfg: JobConfig
    spec: ModelSpec
    shards: list[str]
    store: TableStore
    lock: TableLock
    report: RunReport
    device: str = "cpu"
    plan_dir: str = ""  # this attempt's plan folder (a new one each time the run plans)
    forced_bad: dict[str, str] = field(default_factory=dict)  # shard uri -> why it is left as it is tonight
    # filled in by the steps
    current: object = None  # the table (LanceDataset) at the version the run plans on, or None
    rebuild: bool = False  # the model fingerprint changed: every document is embedded again
    diff: Diff | None = None
    shard_choice: ShardChoice | None = None  # the shards read and skipped (plan.shards)
    pins: dict[int, str] = field(default_factory=dict)  # shard -> its scan pin (input.pins.Pin JSON)
    scanned_here: bool = False  # the shards read were few and small: scanned (and counted) in the driver
    kept_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    calibration: dict | None = None  # int8 ranges
    schema: pa.Schema | None = None  # the table's schema after this run
    run_id: str = field(default_factory=new_run_id)  # reports, quarantine file, lease, run tag
    # the plan's identity (table version, fingerprint, diff): staging and commit claims are kept
    # under it, so a rerun of the same work resumes what an earlier run staged
    plan_id: str = ""
    state: StagedState | None = None  # what is staged for the commit
    dataset: object = None  # the table after the commit (and upkeep)

    @property
    def read_version(self) -> int | None:
        """The table version the run planned on (None: no table yet)."""
        return self.current.version if self.current is not None else None

    @property
    def overwrite(self) -> bool:
        """The run's fragments replace the table (first build, new model or new kept columns)."""
        return self.current is None or (self.diff is not None and self.diff.overwrite)
