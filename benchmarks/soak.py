"""Months of nights on one table: random changes, model changes, kills, races, pauses, S3 faults.

Plays `--nights` nights of `gpte-ray index` (each a driver process, as cron would start it)
against one shared Ray head, on a local table and then (`--s3-nights` of them) on a table in a
loopback moto S3 server. Each night edits, deletes and adds 0.5-5% of the documents (a few bad
rows every night); some nights change the model (Matryoshka dim), so the table is rebuilt.
Upkeep thresholds are low, so compaction, index builds and updates, tag pruning and version
cleanup happen again and again. Faults, on seeded random nights:

  kill        the driver is SIGKILLed at a random moment, then the night is run again
  concurrent  two drivers start at once
  pause       a driver is SIGSTOPped while embedding, past its lease; a second run does the
              night; the first wakes up and must not commit
  rewrite     once a driver has planned, every shard is rewritten with the same rows in another
              order (an exporter re-publishing its corpus); the run refuses in one line or
              commits what it planned on, then the night is run again (the cron retry)
  late-lease  (S3) the first run's lease PUT lands 2 s late, while a second run starts
  s3-faults   (S3) 2% of requests answered 503 SlowDown
Nights without a fault update one folder in place, so shards a night did not change are skipped
(issue 23); some of them, instead of random changes, play shard events:
  append        a new shard of new documents
  rewrite       a few documents of one shard edited
  touch         a shard's mtime moves, its bytes do not
  delete-shard  a shard and its documents gone (the mass-delete guard counts them)
  move          documents moved between two shards, texts unchanged
  inplace       one document edited keeping its shard's size and mtime, then a full scan, which
                must name that shard in the report (shards_changed_in_place)

After EVERY night: the table holds exactly the night's documents (same (doc_id, chunk) keys and
content hashes), no duplicate key, every vector within 1e-5 of sentence-transformers' `encode` of
its text (a reference independent of the job), staging empty, the lock free, and the committing
run's report counts exactly the diff computed here. Any failure stops the soak with the night
and seed, so it replays.

    python benchmarks/soak.py --nights 45 --s3-nights 15 --seed 7 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpte_ray.input.prepare import content_hash  # noqa: E402
from tests.slow._local_ray import LocalHead, free_port, ray_env  # noqa: E402

KINDS = ("kill", "concurrent", "pause", "rewrite")
S3_KINDS = ("late-lease", "s3-faults")
SHARD_EVENTS = ("append", "rewrite", "touch", "delete-shard", "move", "inplace")
LEASE_S = 4
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region": "us-east-1"}


def tiny_st_model(folder: str) -> str:
    """A one-layer random BERT with MiniLM's tokenizer, as a sentence-transformers folder."""
    from transformers import BertConfig, BertModel

    from gpte_ray.model.spec import default_model_path
    from tests.support.models import save_tiny

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    return save_tiny(folder, cfg, BertModel, default_model_path(), {"pooling_mode_mean_tokens": True})


class Reference:
    """Vectors from sentence-transformers, cached by text: what the table must hold."""

    def __init__(self, model: str):
        from sentence_transformers import SentenceTransformer

        self.st = SentenceTransformer(model, device="cpu")
        self.cache: dict[str, np.ndarray] = {}

    def vectors(self, texts: list[str], dim: int) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            for t, v in zip(todo, self.st.encode(todo, batch_size=64, convert_to_numpy=True)):
                self.cache[t] = v
        full = np.stack([self.cache[t] for t in texts])[:, :dim]
        return full / np.linalg.norm(full, axis=1, keepdims=True)


class Corpus:
    WORDS = ("lance ray table vector index night shard embed model token chunk query cluster "
             "driver worker commit fence lease arrow batch window").split()

    def __init__(self, rng: random.Random, n: int, per_shard: int = 250):
        self.rng = rng
        self.per_shard = per_shard
        self.next_id = 0
        self.docs: dict[str, str] = {}
        self.shard_of: dict[str, int] = {}  # documents keep their shard: a night rewrites only the shards it changes
        for _ in range(n):
            self._add()

    def _text(self) -> str:
        return " ".join(self.rng.choice(self.WORDS) for _ in range(self.rng.randint(5, 40)))

    def _add(self, shard: int | None = None) -> None:
        doc = f"doc-{self.next_id:07d}"
        self.docs[doc] = self._text()
        if shard is None:
            last = max(self.shard_of.values(), default=0)
            shard = last if sum(s == last for s in self.shard_of.values()) < self.per_shard else last + 1
        self.shard_of[doc] = shard
        self.next_id += 1

    def _delete(self, doc: str) -> None:
        del self.docs[doc], self.shard_of[doc]

    def mutate(self) -> dict[str, int]:
        k = max(1, int(len(self.docs) * self.rng.uniform(0.005, 0.05) / 3))
        ids = sorted(self.docs)
        for d in self.rng.sample(ids, k):
            self.docs[d] = self._text() + " (edited)"
        for d in self.rng.sample(sorted(self.docs), k):
            self._delete(d)
        for _ in range(k):
            self._add()
        return {"edited": k, "deleted": k, "added": k}

    def shards(self) -> list[int]:
        return sorted(set(self.shard_of.values()))

    def shard_event(self, kind: str) -> None:
        """Change the corpus the way one shard event does (`touch` and `inplace` act on the
        written files instead: see `after_write`)."""
        shards = self.shards()
        if kind == "append":  # a new shard of new documents
            new = shards[-1] + 1
            for _ in range(max(5, self.per_shard // 4)):
                self._add(new)
        elif kind == "rewrite":  # a few documents of one shard edited
            s = self.rng.choice(shards)
            for d in [d for d, x in sorted(self.shard_of.items()) if x == s][:3]:
                self.docs[d] = self._text() + " (rewritten)"
        elif kind == "delete-shard":  # the smallest shard and its documents gone
            s = min(shards[1:] or shards, key=lambda x: sum(v == x for v in self.shard_of.values()))
            for d in [d for d, x in self.shard_of.items() if x == s]:
                self._delete(d)
        elif kind == "move":  # documents moved between two shards, texts unchanged
            a, b = self.rng.sample(shards, 2) if len(shards) > 1 else (shards[0], shards[0] + 1)
            for d in [d for d, x in sorted(self.shard_of.items()) if x == a][:5]:
                self.shard_of[d] = b

    def after_write(self, kind: str, folder: Path) -> Path | None:
        """`touch`: a shard's mtime moves, its bytes do not. `inplace`: one document of a shard
        edited keeping the file's size (same length) and its mtime: only a full scan sees it."""
        path = folder / f"part-{self.rng.choice(self.shards()[1:] or self.shards()):05d}.parquet"
        st = path.stat()
        if kind == "touch":
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            return path
        if kind != "inplace":
            return None
        doc = next(d for d, x in sorted(self.shard_of.items()) if x == int(path.stem.split("-")[1]))
        self.docs[doc] = self.docs[doc].swapcase()  # same length, other content
        self.write(folder)
        assert path.stat().st_size == st.st_size, "an in-place edit must keep the size"
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return path

    def write(self, folder: Path) -> None:
        """Parquet shards, one per shard of the documents, plus two bad rows every night (an
        empty text in the first shard and a duplicate id in the last, both quarantined: the
        real document wins). Only the shards whose bytes change are written, so a shard a night
        did not touch keeps its file (and its fingerprint). Written uncompressed, without
        dictionaries or statistics, so that a same-length edit keeps a shard's size."""
        folder.mkdir(parents=True, exist_ok=True)
        shards = self.shards()
        rows: dict[int, list[dict]] = {s: [] for s in shards}
        for d in sorted(self.docs):
            rows[self.shard_of[d]].append({"id": d, "text": self.docs[d]})
        rows[shards[0]].insert(len(rows[shards[0]]) // 2, {"id": "bad-empty", "text": ""})
        first = min(self.docs)
        rows[shards[-1]].append({"id": first, "text": "a later duplicate of the first id"})
        schema = pa.schema([("id", pa.string()), ("text", pa.string())])
        keep = set()
        for s, shard_rows in rows.items():
            path = folder / f"part-{s:05d}.parquet"
            keep.add(path.name)
            buf = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(shard_rows, schema=schema), buf, compression="none",
                           use_dictionary=False, write_statistics=False)
            data = buf.getvalue().to_pybytes()
            if not path.exists() or path.read_bytes() != data:
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        for old in folder.glob("*.parquet"):
            if old.name not in keep:
                old.unlink()


class Backend:
    """Where the table lives: a local folder or a bucket on the loopback S3 server."""

    def __init__(self, db: str, endpoint: str | None = None):
        self.db, self.endpoint = db, endpoint

    @property
    def options(self) -> dict | None:
        if self.endpoint is None:
            return None
        return {"aws_endpoint": self.endpoint, "allow_http": "true", "aws_region": "us-east-1",
                "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}

    def dataset(self):
        import lance

        return lance.dataset(f"{self.db}/docs.lance", storage_options=self.options)

    def listing(self, sub: str) -> list[str]:
        import pyarrow.fs as pafs

        from gpte_ray.storage import filesystem

        fs, path = filesystem(f"{self.db}/_gpte_staging/docs/{sub}", {"endpoint": self.endpoint, **KEYS}
                              if self.endpoint else None)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return [i.path for i in infos if i.is_file]


def write_config(path: Path, backend: Backend, model: str, dim: int, full_scan: bool = False) -> None:
    import yaml

    out = {"db": backend.db, "table": "docs", "max_fragments": 4, "index_min_rows": 300,
           "index_type": "IVF_PQ", "retention_hours": 0, "lease_seconds": LEASE_S,
           "max_delete_fraction": 0.2, "rebuild": True}  # its model-change nights rebuild on purpose
    if backend.endpoint:
        out["storage_options"] = {"endpoint": backend.endpoint, **KEYS}
    cfg = {"model": {"path": model, "dim": dim}, "batch": {"window_rows": 64}, "input": {"full_scan": full_scan},
           "resources": {"cpus_per_actor": 0.5, "tokenize_cpus": 0.25, "read_cpus": 0.25}, "output": out}
    path.write_text(yaml.safe_dump(cfg))


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(tempfile.mkdtemp(prefix="soak-"))
        self.model = tiny_st_model(str(self.work / "model"))
        self.ref = Reference(self.model)
        self.corpus = Corpus(self.rng, args.docs, args.per_shard)
        self.summary = {"seed": args.seed, "nights": 0, "faults": {k: 0 for k in KINDS + S3_KINDS},
                        "fault_nights": [], "compactions": 0, "index_created": 0, "index_updates": 0,
                        "rebuilds": 0, "cleanup_bytes": 0, "committed_runs": 0,
                        "refused_runs": {}, "seconds": 0.0,
                        "shard_events": {k: 0 for k in SHARD_EVENTS}, "shards_read": 0, "shards_skipped": 0,
                        "in_place_found": 0}
        self.head = None
        self.moto = None
        self.proxy = None

    # ---- processes ----------------------------------------------------------------------
    def driver(self, folder: Path, cfg: Path, tag: str) -> tuple[subprocess.Popen, Path]:
        report = self.work / f"report-{tag}.json"
        report.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "gpte_ray.cli", "index", "--config", str(cfg), "--input", str(folder),
               "--ray-address", self.head.gcs_address, "--report", str(report)]
        env = ray_env(PYTHONPATH=str(REPO))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return proc, report

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.strip()

    def run_once(self, folder: Path, cfg: Path, tag: str) -> dict:
        proc, report = self.driver(folder, cfg, tag)
        rc, err = self.finish(proc)
        if rc != 0:
            raise AssertionError(f"{tag}: exit {rc}: {err[-2000:]}")
        return json.loads(report.read_text())

    def refused(self, rc: int, err: str, tag: str) -> None:
        # progress lines may precede it; the refusal itself is one line, no traceback
        lines = [line for line in err.splitlines() if not line.startswith("embedded ")]
        assert rc != 0 and lines, f"{tag}: expected a refusal, got exit {rc}"
        assert len(lines) == 1 and lines[0].startswith("gpte-ray: error:"), \
            f"{tag}: a refusal must be one line, got:\n{err[-2000:]}"
        reason = ("busy" if "is being written by" in err or "took the lock" in err else
                  "lost-lock" if "lost its lock" in err else
                  "moved" if "changed while this run worked" in err or "is committing version" in err
                  else "shard-changed" if "the shard changed while this run read it" in err else None)
        assert reason, f"{tag}: unexpected refusal: {err}"
        self.summary["refused_runs"][reason] = self.summary["refused_runs"].get(reason, 0) + 1

    @staticmethod
    def lease_run(backend: Backend) -> str | None:
        from gpte_ray.storage import filesystem

        fs, path = filesystem(f"{backend.db}/_gpte_staging/docs/lease.json",
                              {"endpoint": backend.endpoint, **KEYS} if backend.endpoint else None)
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read()).get("run_id")
        except (OSError, ValueError):
            return None

    # ---- one night ----------------------------------------------------------------------
    def night(self, n: int, backend: Backend, kind: str | None, dim: int, events: tuple[str, ...] = ()) -> None:
        t0 = time.time()
        # a night without a fault updates one folder in place (shards it did not change keep their
        # files, and are skipped); a fault night plays in a folder of its own
        stable = kind is None
        where = "s3" if backend.endpoint else "local"
        folder = self.work / "corpus" / (f"live-{where}" if stable else f"night-{n:03d}")
        if n and events:
            for event in events:
                self.corpus.shard_event(event)
        elif n:
            self.corpus.mutate()
        self.corpus.write(folder)
        edited = {e: self.corpus.after_write(e, folder) for e in events}
        cfg = self.work / f"job-{n}.yaml"
        write_config(cfg, backend, self.model, dim, full_scan="inplace" in events)
        before = self.table_docs(backend)
        report = None
        if kind == "kill":
            proc, _ = self.driver(folder, cfg, f"{n}-killed")
            time.sleep(self.rng.uniform(3, 20))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                self.summary["faults"]["kill"] += 1
            proc.communicate()
            before = self.table_docs(backend)  # it may have committed just before the kill
            report = self.run_once(folder, cfg, f"{n}-rerun")
        elif kind == "concurrent":
            a, ra = self.driver(folder, cfg, f"{n}-a")
            b, rb = self.driver(folder, cfg, f"{n}-b")
            (rca, erra), (rcb, errb) = self.finish(a), self.finish(b)
            self.summary["faults"]["concurrent"] += 1
            ok = [r for rc, r in ((rca, ra), (rcb, rb)) if rc == 0]
            for rc, err, tag in ((rca, erra, "a"), (rcb, errb, "b")):
                if rc != 0:
                    self.refused(rc, err, f"night {n} run {tag}")
            assert ok, f"night {n}: both concurrent runs failed:\n{erra}\n{errb}"
            reports = [json.loads(r.read_text()) for r in ok]
            assert sum(r["committed"] for r in reports) <= 1
            report = next((r for r in reports if r["committed"]), reports[0])
        elif kind == "rewrite":
            a, ra = self.driver(folder, cfg, f"{n}-rewritten")
            self.wait_planned(a, backend)
            if a.poll() is None:
                self.rewrite_shards(folder)
                self.summary["faults"]["rewrite"] += 1
            rc, err = self.finish(a)
            if rc != 0:
                self.refused(rc, err, f"night {n} rewritten run")
                report = self.run_once(folder, cfg, f"{n}-rerun")
            else:
                report = json.loads(ra.read_text())
        elif kind in ("pause", "late-lease"):
            if kind == "late-lease":
                self.proxy.delay = self._late_first_lease_put()
            a, _ = self.driver(folder, cfg, f"{n}-paused")
            if kind == "pause":
                # pause once the run has planned (its lease names its run id), before it commits
                deadline = time.time() + 300
                while a.poll() is None and self.lease_run(backend) in (None, "planning") \
                        and time.time() < deadline:
                    time.sleep(0.1)
                if a.poll() is None:
                    a.send_signal(signal.SIGSTOP)
                    self.summary["faults"]["pause"] += 1
                    time.sleep(LEASE_S + 2)
                    # the next night comes while it sleeps: other work, on the same version
                    self.corpus.mutate()
                    folder_b = self.work / "corpus" / f"night-{n:03d}b"
                    self.corpus.write(folder_b)
                    report = self.run_once(folder_b, cfg, f"{n}-b")
                    shutil.rmtree(folder_b)
                    a.send_signal(signal.SIGCONT)
                    rc, err = self.finish(a)
                    self.refused(rc, err, f"night {n} paused run")
                else:
                    report = json.loads((self.work / f"report-{n}-paused.json").read_text())
            else:
                time.sleep(0.5)
                b, rb = self.driver(folder, cfg, f"{n}-b")
                (rca, erra), (rcb, errb) = self.finish(a), self.finish(b)
                self.proxy.delay = lambda method, path: 0.0
                self.summary["faults"]["late-lease"] += 1
                reports = []
                for rc, err, tag in ((rca, erra, "paused"), (rcb, errb, "b")):
                    if rc == 0:
                        reports.append(json.loads((self.work / f"report-{n}-{tag}.json").read_text()))
                    else:
                        self.refused(rc, err, f"night {n} run {tag}")
                assert reports and sum(r["committed"] for r in reports) <= 1
                report = next((r for r in reports if r["committed"]), reports[0])
        else:
            if kind == "s3-faults":
                injected = self.proxy.injected
                self.proxy.fault = lambda method, path, i: 503 if self.rng.random() < 0.02 else None
            report = self.run_once(folder, cfg, f"{n}")
            if kind == "s3-faults":
                self.proxy.fault = lambda method, path, i: None
                self.summary["faults"]["s3-faults"] += self.proxy.injected - injected > 0
        self.check(n, backend, before, report, dim)
        for event in events:
            self.summary["shard_events"][event] += 1
        if "inplace" in events:  # the full scan says which shard changed behind its fingerprint
            assert report["shards_changed_in_place"] == [str(edited["inplace"])], report["shards_changed_in_place"]
            self.summary["in_place_found"] += 1
        self.summary["shards_read"] += report["shards_read"]
        self.summary["shards_skipped"] += report["shards_skipped"]
        if not stable:
            shutil.rmtree(folder)
        self.summary["nights"] += 1
        self.summary["seconds"] += time.time() - t0
        if kind:
            self.summary["fault_nights"].append([n, kind])
        print(json.dumps({"night": n, "backend": "s3" if backend.endpoint else "local", "fault": kind,
                          "shard_events": list(events), "shards_read": report["shards_read"],
                          "shards_skipped": report["shards_skipped"],
                          "dim": dim, "docs": len(self.corpus.docs), "new": report["new"],
                          "changed": report["changed"], "deleted": report["deleted"],
                          "upkeep": {k: v for k, v in report.get("upkeep", {}).items()
                                     if k not in ("version", "fragments")},
                          "seconds": round(time.time() - t0, 1)}), flush=True)

    def wait_planned(self, proc: subprocess.Popen, backend: Backend, timeout: float = 300) -> None:
        """Until the run has planned (its lease names its run id), or has ended."""
        deadline = time.time() + timeout
        while proc.poll() is None and self.lease_run(backend) in (None, "planning") and time.time() < deadline:
            time.sleep(0.05)

    @staticmethod
    def rewrite_shards(folder: Path) -> None:
        """Every shard again, same rows in reverse order, each replaced atomically."""
        for p in sorted(folder.glob("*.parquet")):
            t = pq.read_table(p)
            tmp = p.with_suffix(".tmp")
            pq.write_table(t.take(list(range(t.num_rows - 1, -1, -1))), tmp)
            os.replace(tmp, p)

    def _late_first_lease_put(self):
        state = {"done": False}

        def delay(method: str, path: str) -> float:
            if method == "PUT" and path.split("?")[0].endswith("/lease.json") and not state["done"]:
                state["done"] = True
                return 2.0
            return 0.0

        return delay

    # ---- checks -------------------------------------------------------------------------
    def table_docs(self, backend: Backend) -> dict[str, str]:
        try:
            t = backend.dataset().to_table(columns=["doc_id", "content_hash"])
        except (ValueError, FileNotFoundError, OSError):
            return {}
        return dict(zip(t["doc_id"].to_pylist(), t["content_hash"].to_pylist()))

    def check(self, n: int, backend: Backend, before: dict[str, str], report: dict, dim: int) -> None:
        where = f"night {n} (seed {self.args.seed})"
        t = backend.dataset().to_table(columns=["doc_id", "chunk", "content_hash", "vector", "text"])
        keys = list(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))
        assert len(keys) == len(set(keys)), f"{where}: duplicate (doc_id, chunk) keys"
        want = {k: content_hash(v) for k, v in self.corpus.docs.items()}
        got = dict(zip(t["doc_id"].to_pylist(), t["content_hash"].to_pylist()))
        assert got == want, f"{where}: table != corpus ({len(set(got) ^ set(want))} ids differ)"
        vectors = np.asarray(t["vector"].to_pylist(), dtype=np.float32)
        assert vectors.shape[1] == dim, f"{where}: dim {vectors.shape[1]} != {dim}"
        ref = self.ref.vectors(t["text"].to_pylist(), dim)
        err = float(np.abs(vectors - ref).max())
        assert err <= 1e-5, f"{where}: vectors differ from the reference by {err:.2e}"
        assert not backend.listing("runs"), f"{where}: staging not empty: {backend.listing('runs')[:3]}"
        assert not [p for p in backend.listing("") if p.endswith("lease.json")], f"{where}: lock not free"
        # the committing run's counts, against the diff computed here
        rebuild = report["rebuild"]
        exp_new = sum(d not in before for d in want) if not rebuild else len(want)
        exp_changed = 0 if rebuild else sum(d in before and before[d] != h for d, h in want.items())
        exp = {"new": exp_new, "changed": exp_changed,
               "unchanged": len(want) - exp_new - exp_changed,
               "deleted": sum(d not in want for d in before), "quarantined": 2,
               "rows": len(want) + 2}
        # every row is read, or in a shard skipped because it did not change
        got_counts = {k: report[k] for k in exp if k != "rows"}
        got_counts["rows"] = report["rows_read"] + report["rows_skipped"]
        if not report["committed"] and before == want:
            exp.update(new=0, changed=0, unchanged=len(want), deleted=0)
        assert got_counts == exp, f"{where}: report counts {got_counts} != diff {exp}"
        up = report.get("upkeep", {})
        self.summary["compactions"] += "compacted_fragments" in up
        self.summary["index_created"] += str(up.get("vector_index", "")).startswith("created")
        self.summary["index_updates"] += bool(up.get("indexes"))  # delta segments or merges
        self.summary["rebuilds"] += bool(rebuild)
        tags = [name for name in backend.dataset().tags.list() if name.startswith("run-")]
        self.summary["max_run_tags"] = max(self.summary.get("max_run_tags", 0), len(tags))
        self.summary["cleanup_bytes"] += int(up.get("cleanup_bytes", 0))
        self.summary["committed_runs"] += bool(report["committed"])

    # ---- the whole soak -----------------------------------------------------------------
    def schedule(self, nights: int, kinds: tuple[str, ...], per_kind: int) -> dict[int, str]:
        slots = self.rng.sample(range(1, nights), min(nights - 1, per_kind * len(kinds)))
        return {night: kinds[i % len(kinds)] for i, night in enumerate(slots)}

    def shard_events(self, nights: int, faults: dict[int, str]) -> dict[int, tuple[str, ...]]:
        """Local nights -> shard events: `--shard-events` ("4:append+touch,5:inplace"), else one
        random event on every other night without a fault (each kind in turn)."""
        if self.args.shard_events is not None:
            return {int(night): tuple(kinds.split("+")) for night, kinds in
                    (item.split(":") for item in filter(None, self.args.shard_events.split(",")))}
        free = [n for n in range(1, nights) if n not in faults][::2]
        return {n: (SHARD_EVENTS[i % len(SHARD_EVENTS)],) for i, n in enumerate(free)}

    def run(self) -> dict:
        from moto.server import ThreadedMotoServer

        from tests.support.s3 import FaultProxy

        # the head's workers import this checkout (it may be a snapshot: git worktree)
        self.head = LocalHead(num_cpus=2, dashboard=False, env={"PYTHONPATH": str(REPO)}).start()
        port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.moto.start()
        self.proxy = FaultProxy(port).__enter__()
        try:
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                         aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="soak")
            local = Backend(str(self.work / "db"))
            s3 = Backend("s3://soak/db", f"http://127.0.0.1:{self.proxy.port}")
            plan = [(local, n) for n in range(self.args.nights - self.args.s3_nights)]
            plan += [(s3, n) for n in range(self.args.s3_nights)]
            faults = self.schedule(len(plan) - self.args.s3_nights, KINDS, self.args.faults_per_kind)
            s3_kinds = tuple(k for k in self.args.s3_kinds.split(",") if k)
            s3_faults = self.schedule(self.args.s3_nights, s3_kinds, 1) if self.args.s3_nights > 1 else {}
            if self.args.faults is not None:  # an explicit plan: "local:1:pause,s3:1:late-lease"
                faults, s3_faults = {}, {}
                for item in filter(None, self.args.faults.split(",")):
                    where, night, kind = item.split(":")
                    (faults if where == "local" else s3_faults)[int(night)] = kind
            dim = 32
            events = self.shard_events(len(plan) - self.args.s3_nights, faults)
            for i, (backend, n) in enumerate(plan):
                kind = faults.get(n) if backend is local else s3_faults.get(n)
                if n and n % self.args.model_change_every == 0:
                    dim = 24 if dim == 32 else 32  # a model change: the table is rebuilt
                self.night(i, backend, kind, dim, events.get(n, ()) if backend is local and kind is None else ())
        finally:
            self.proxy.__exit__()
            self.moto.stop()
            self.head.stop()
            shutil.rmtree(self.work, ignore_errors=True)
        self.summary["seconds"] = round(self.summary["seconds"], 1)
        return self.summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nights", type=int, default=45, help="nights in all (local, then S3)")
    p.add_argument("--s3-nights", type=int, default=15, help="how many of them on the loopback S3 server")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--faults-per-kind", type=int, default=3, help="local nights per fault kind")
    p.add_argument("--s3-kinds", default=",".join(KINDS + S3_KINDS), help="fault kinds on S3 nights, one each")
    p.add_argument("--model-change-every", type=int, default=12)
    p.add_argument("--faults", help='explicit faults instead of random ones: "local:1:pause,s3:1:late-lease"')
    p.add_argument("--per-shard", type=int, default=250, help="documents per shard")
    p.add_argument("--shard-events", help='explicit shard events on local nights: "4:append+touch+move,5:inplace"')
    p.add_argument("--out", help="write the summary JSON here too")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    summary = Soak(args).run()
    print(json.dumps({"summary": summary}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
