"""Stages called directly (no Ray): OOM back-off, tokenize skipping staged chunks, columnar
token ids, writes overlapping the next window's embedding."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa

from gpte_ray.config import ModelConfig
from gpte_ray.model.spec import resolve_model
from gpte_ray.model.tokenize import TextTokenizer
from gpte_ray.run.stages import (
    CHUNK_SCHEMA,
    ActorFigures,
    EmbedOptions,
    EmbedStage,
    OutOfMemory,
    TokenizeEmbedStage,
    TokenizeStage,
)


def _chunks(texts):
    spec = resolve_model(ModelConfig())
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts,
                     "content_hash": ["h"] * len(texts)})
    return spec, TokenizeStage(spec)(docs)


def test_oom_halves_the_budget_and_keeps_every_row_once():
    texts = [("word " * n).strip() for n in (3, 50, 120, 7, 90, 15, 200, 33)]
    spec, chunks = _chunks(texts)
    ref = EmbedStage(spec, EmbedOptions("cpu", 1, 1, 0.0, 1))(chunks)  # one row at a time: the reference

    stage = EmbedStage(spec, EmbedOptions("cpu", 100_000, 256, 0.0, 1))
    real = stage.embedder.forward
    calls = []

    def flaky(batch):
        calls.append(len(batch["input_ids"]))
        if int(batch["attention_mask"].sum()) > 300:  # "device memory" holds 300 real tokens
            raise OutOfMemory("injected")
        return real(batch)

    stage.embedder.forward = flaky
    out, stats = stage.embed(chunks)
    assert out["doc_id"].to_pylist() == chunks["doc_id"].to_pylist()  # ids travel with rows
    a = np.stack(out["vector"].to_numpy(zero_copy_only=False))
    b = np.stack(ref["vector"].to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() <= 1e-5
    assert stats.oom_retries > 0 and stats.token_budget < 100_000
    assert len(stats.padded) == len(stats.first) == out.num_rows and stats.first.sum() >= 1
    assert stage.budget < 100_000  # the reduced budget sticks for the next windows


def test_tokenize_skips_chunks_already_staged():
    spec = resolve_model(ModelConfig(max_length=32, chunk_overlap=4))
    docs = pa.table({"doc_id": ["a", "b"], "text": ["short", "long " * 100], "content_hash": ["x", "y"]})
    full = TokenizeStage(spec)(docs)
    n_b = full["doc_id"].to_pylist().count("b")
    assert n_b > 2 and set(full["n_chunks"].to_pylist()) == {1, n_b}
    part = TokenizeStage(spec, frozenset({("b", 0), ("b", 1), ("a", 0)}))(docs)
    assert list(zip(part["doc_id"].to_pylist(), part["chunk"].to_pylist())) == [("b", c) for c in range(2, n_b)]


def test_tokenize_actor_uses_the_threads_it_holds(monkeypatch):
    """A worker does not inherit the driver's TOKENIZERS_PARALLELISM: the stage sets its own."""
    spec = resolve_model(ModelConfig())
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # what an unset variable means to the tokenizer
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    TokenizeStage(spec)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and os.environ["RAYON_NUM_THREADS"] == "1"
    TokenizeStage(spec, threads=3)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["RAYON_NUM_THREADS"] == "3"


def test_cpu_actor_tokenizes_its_windows_as_the_tokenize_stage_does():
    """On a CPU run one actor tokenizes and embeds (stages.TokenizeEmbedStage): two windows at
    once, from two threads, give the rows the two stages give one after the other; a window
    whose chunks were all staged comes out empty."""
    spec = resolve_model(ModelConfig(max_length=32, chunk_overlap=4))
    texts = ["short", "long " * 100, "mid sized text here", "x " * 40, "alpha beta " * 30, "z"]
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts,
                     "content_hash": [str(i) for i in range(len(texts))], "meta_hash": ["m"] * len(texts)})
    windows = [docs.slice(0, 3), docs.slice(3)]
    options = EmbedOptions("cpu", 256, 64, 0.5, torch_threads=2, cpu_lanes=2)
    ref = [EmbedStage(spec, options)(TokenizeStage(spec)(w)) for w in windows]

    stage = TokenizeEmbedStage({"spec": spec}, {"spec": spec, "options": options})
    assert stage.embed.threads == 2 and os.environ["RAYON_NUM_THREADS"] == "2"  # the actor's threads
    out = [None, None]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, stage(windows[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(out, ref):
        assert got.column_names == want.column_names and got.num_rows == want.num_rows
        assert got.drop_columns(["vector"]).equals(want.drop_columns(["vector"]))
        a = np.stack(got["vector"].to_numpy(zero_copy_only=False))
        b = np.stack(want["vector"].to_numpy(zero_copy_only=False))
        assert np.abs(a - b).max() <= 1e-6
    assert stage.embed.figures.load > 0  # the tokenizer's load counted in the actor's

    done = frozenset(zip(ref[0]["doc_id"].to_pylist(), ref[0]["chunk"].to_pylist()))
    empty = TokenizeEmbedStage({"spec": spec, "staged": done}, {"spec": spec, "options": options})(windows[0])
    assert empty.num_rows == 0 and empty.schema.equals(ref[0].schema)


def test_tokenize_columns_match_the_chunks():
    spec = resolve_model(ModelConfig(max_length=32, chunk_overlap=4))
    texts = ["short", "long " * 100, "mid sized text here", "x " * 40]
    docs = pa.table({"doc_id": ["a", "b", "c", "d"], "text": texts, "content_hash": ["1", "2", "3", "4"]})
    out = TokenizeStage(spec)(docs)
    chunks = TextTokenizer(spec).encode(texts)
    assert out.schema == CHUNK_SCHEMA
    assert out["input_ids"].to_pylist() == [c.input_ids for c in chunks]
    assert out["doc_id"].to_pylist() == [docs["doc_id"][c.doc_index].as_py() for c in chunks]
    assert out["text"].to_pylist() == [texts[c.doc_index][c.char_start : c.char_end] for c in chunks]
    assert out["n_tokens"].to_pylist() == [len(c.input_ids) for c in chunks]
    assert out["content_hash"].to_pylist() == [str(c.doc_index + 1) for c in chunks]


class _Writer:
    """Stands in for WindowWriter: the first window's write blocks until the second window
    reaches the device, or fails outright."""

    def __init__(self, fail_first: bool = False):
        self.fail_first = fail_first
        self.writing = threading.Event()
        self.next_on_device = threading.Event()
        self.overlapped = None

    def __call__(self, out: pa.Table, stats) -> pa.Table:
        if not self.writing.is_set():
            self.writing.set()
            if self.fail_first:
                raise OSError("injected write failure")
            self.overlapped = self.next_on_device.wait(60)
        return pa.table({"rows": [out.num_rows]})


def _two_windows(stage, writer, windows):
    real = stage.embedder.forward

    def forward(batch):
        if writer.writing.is_set():
            writer.next_on_device.set()
        return real(batch)

    stage.embedder.forward = forward
    results: dict = {}

    def call(i):
        try:
            results[i] = stage(windows[i])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert writer.writing.wait(60)  # window 0 embedded, its write under way
    second = threading.Thread(target=call, args=(1,))
    second.start()
    for t in (first, second):
        t.join(120)
    return results


def test_window_is_written_while_the_next_one_embeds():
    spec, chunks = _chunks([("word " * n).strip() for n in (3, 50, 120, 7, 90, 15)])
    writer = _Writer()
    stage = EmbedStage(spec, EmbedOptions("cpu", 8192, 256, 0.9, 1), writer=writer)
    results = _two_windows(stage, writer, [chunks.slice(0, 3), chunks.slice(3)])
    assert writer.overlapped is True  # window 1 ran on the device while window 0 was being written
    for r in results.values():
        assert r["rows"].to_pylist() == [3]
        fig = r.select(list(ActorFigures.COLUMNS)).to_pylist()[0]
        assert 0 < fig["actor_forward_s"] <= fig["actor_held_s"] - fig["actor_load_s"]
        assert fig["actor_input_wait_s"] >= 0 and fig["actor_cpu_s"] > 0
    assert results[0]["actor"].to_pylist() == results[1]["actor"].to_pylist()


def test_failed_write_fails_its_window_only():
    spec, chunks = _chunks([("word " * n).strip() for n in (3, 50, 120, 7)])
    writer = _Writer(fail_first=True)
    stage = EmbedStage(spec, EmbedOptions("cpu", 8192, 256, 0.9, 1), writer=writer)
    results = _two_windows(stage, writer, [chunks.slice(0, 2), chunks.slice(2)])
    assert isinstance(results[0], OSError)
    assert results[1]["rows"].to_pylist() == [2]


def test_cost_line_from_embed_actor_figures():
    from gpte_ray.report.run_report import RunReport

    def actor(node, node_type, born, end, forward):
        return {"node": node, "actor_node_type": node_type, "actor_born": born, "actor_end": end,
                "actor_held_s": end - born, "actor_load_s": 10.0, "actor_forward_s": forward,
                "actor_input_wait_s": 5.0, "actor_cpu_s": 30.0}

    report = RunReport(tokens=2_000_000)
    # two actors share node n1 (overlapping: the node is charged once for its span), one on n2
    actors = [actor("n1", "gpu-1x", 0, 3600, 3000), actor("n1", "gpu-1x", 1800, 5400, 3000),
              actor("n2", "cpu-big", 0, 1800, 1500)]
    report.add_embed_actors(actors, 1.0, {"gpu-1x": 2.0, "default": 0.5})
    report.finish()
    c = report.cost
    assert c["embed_actors"] == 3 and c["accelerator_seconds"] == 3600 + 3600 + 1800
    assert c["node_seconds"] == {"gpu-1x": 5400, "cpu-big": 1800}
    assert c["cost"] == 1.5 * 2.0 + 0.5 * 0.5
    assert c["cost_per_million_tokens"] == c["cost"] / 2
    assert c["tokens_per_accelerator_second"] == round(2_000_000 / 9000, 1)
    assert c["outside_forward_share"] == round(1 - 7500 / (9000 - 30), 4)
    assert c["embed_input_wait_seconds"] == 15 and c["embed_cpu_seconds"] == 90

    cpu_only = RunReport(tokens=1000)
    cpu_only.add_embed_actors([actor("n1", "cpu", 0, 100, 50)], 0.0, {})
    cpu_only.finish()
    assert cpu_only.cost["accelerator_seconds"] == 0 and cpu_only.cost["tokens_per_accelerator_second"] is None
    assert "cost" not in cpu_only.cost


def _texts():
    return [("word " * n).strip() for n in (3, 50, 120, 7, 90, 15, 200, 33, 64, 11, 150, 2)]


def test_cpu_lanes_run_micro_batches_side_by_side_and_match_one_forward():
    spec, chunks = _chunks(_texts())
    one = EmbedStage(spec, EmbedOptions("cpu", 256, 256, 0.0, 1))
    assert one.lanes is None  # one thread: one forward at a time, as before
    ref, _ = one.embed(chunks)
    stage = EmbedStage(spec, EmbedOptions("cpu", 256, 256, 0.0, 2, cpu_lanes=2))
    assert stage.lanes.n == 2
    real = stage.embedder.forward
    both = threading.Barrier(2, timeout=60)  # broken unless two forwards run at once
    lanes = set()

    def forward(batch):
        name = threading.current_thread().name
        if name not in lanes:  # each lane's first forward waits for the other's
            lanes.add(name)
            both.wait()
        return real(batch)

    stage.embedder.forward = forward
    out, stats = stage.embed(chunks)
    assert len(lanes) == 2 and not both.broken
    assert out["doc_id"].to_pylist() == chunks["doc_id"].to_pylist()
    a = np.stack(out["vector"].to_numpy(zero_copy_only=False))
    b = np.stack(ref["vector"].to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() <= 1e-6
    assert stats.first.sum() > 2 and stats.seconds > 0


def test_cpu_lanes_halve_a_micro_batch_that_runs_out_of_memory():
    spec, chunks = _chunks(_texts())
    ref, _ = EmbedStage(spec, EmbedOptions("cpu", 1, 1, 0.0, 1)).embed(chunks)
    stage = EmbedStage(spec, EmbedOptions("cpu", 100_000, 256, 0.0, 2, cpu_lanes=2))
    real = stage.embedder.forward

    def flaky(batch):
        if int(batch["attention_mask"].sum()) > 300:
            raise OutOfMemory("injected")
        return real(batch)

    stage.embedder.forward = flaky
    out, stats = stage.embed(chunks)
    a = np.stack(out["vector"].to_numpy(zero_copy_only=False))
    b = np.stack(ref["vector"].to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() <= 1e-5 and stats.oom_retries > 0 and stage.budget < 100_000


def test_cpu_lanes_take_the_next_window_before_this_one_ends():
    """A window's last micro-batch leaves a lane free: the next window's first one takes it."""
    spec, chunks = _chunks(["one short text", "another short text"])
    stage = EmbedStage(spec, EmbedOptions("cpu", 8192, 256, 0.0, 2, cpu_lanes=2))
    real = stage.embedder.forward
    second_started = threading.Event()
    calls = []

    def forward(batch):
        calls.append(1)
        if len(calls) == 1:  # window 0's only micro-batch waits for window 1's
            assert second_started.wait(60)
        else:
            second_started.set()
        return real(batch)

    stage.embedder.forward = forward
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stage(chunks.slice(i, 1))))
               for i in (0, 1)]
    threads[0].start()
    while not calls:
        threading.Event().wait(0.01)
    threads[1].start()
    for t in threads:
        t.join(120)
    assert second_started.is_set() and [results[i].num_rows for i in (0, 1)] == [1, 1]
    assert stage.figures.forward > 0 and stage.figures.busy == 0


def test_lanes_only_for_a_forward_that_changes_no_state(tmp_path, minilm_path):
    """A dynamic or longrope rotary embedding rewrites inv_freq in each forward: two lanes
    could run with each other's frequencies, so such a model gets one forward at a time."""
    from transformers import BertModel, LlamaConfig, LlamaModel

    from gpte_ray.run.lanes import forward_is_reentrant
    from tests.support.models import _tiny_bert_config, save_tiny

    def llama(rope=None):
        return LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=64,
                           **({"rope_scaling": rope} if rope else {}))

    assert forward_is_reentrant(BertModel(_tiny_bert_config()))
    assert forward_is_reentrant(LlamaModel(llama()))
    assert not forward_is_reentrant(LlamaModel(llama({"rope_type": "dynamic", "factor": 2.0})))
    folder = save_tiny(str(tmp_path / "dyn"), llama({"rope_type": "dynamic", "factor": 2.0}), LlamaModel, minilm_path)
    spec = resolve_model(ModelConfig(path=folder, pooling="mean"))
    stage = EmbedStage(spec, EmbedOptions("cpu", 8192, 256, 0.0, 2, cpu_lanes=2))
    assert stage.lanes is None
    import torch

    assert torch.get_num_threads() == 2  # the one forward gets every thread


def test_default_budget_follows_how_the_forward_runs():
    """Unset, the budget is the small per-lane one under CPU lanes (a 1-thread lane keeps a
    small batch's activations in its core's cache) and the large one for a single forward over
    several threads; a budget the user sets is kept either way."""
    from gpte_ray.run.stages import DEFAULT_BUDGET, default_budget

    spec = resolve_model(ModelConfig())

    def budget(token_budget, lanes):
        return EmbedStage(spec, EmbedOptions("cpu", token_budget, torch_threads=2, cpu_lanes=lanes)).budget

    assert budget(None, 2) == DEFAULT_BUDGET["cpu_lane"]
    assert budget(None, 1) == DEFAULT_BUDGET["cpu"]
    assert budget(4096, 2) == 4096
    assert default_budget("cuda", 1) == DEFAULT_BUDGET["cuda"] > DEFAULT_BUDGET["cpu"] > DEFAULT_BUDGET["cpu_lane"]
