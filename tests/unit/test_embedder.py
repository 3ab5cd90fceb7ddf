"""The embedder against the reference: sentence-transformers parity, batch invariance, decoders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpte_ray.config import ConfigError, ModelConfig
from gpte_ray.model.batching import flatten, plan_micro_batches
from gpte_ray.model.embedder import Embedder, postprocess
from gpte_ray.model.spec import resolve_model
from gpte_ray.model.tokenize import TextTokenizer


def embed_texts(spec, texts, role="document", budget=8192, max_rows=256, side=None):
    if side:
        spec = dataclasses.replace(spec, padding_side=side)
    tok, emb = TextTokenizer(spec), Embedder(spec)
    chunks = tok.encode(texts, role)
    lengths = TextTokenizer.lengths(chunks)
    out = np.zeros((len(chunks), spec.full_dim), np.float32)
    for rows in plan_micro_batches(lengths, budget, max_rows):
        out[rows] = emb.embed([chunks[i].input_ids for i in rows], [chunks[i].prompt_len for i in rows])
    return chunks, postprocess(out, spec, None)


def cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_parity_with_sentence_transformers(varied_docs, st_model):
    texts = [d["text"] for d in varied_docs[:120]]
    spec = resolve_model(ModelConfig(long_documents="truncate"))
    _, ours = embed_texts(spec, texts)
    ref = st_model.encode(texts, batch_size=16)
    assert cos(ours, ref).min() >= 0.9999


@pytest.mark.parametrize("prompt", ["query: ", "Instruct: {task}\nQuery: {text}"])
@pytest.mark.parametrize("include", [True, False])
def test_parity_with_prompts(st_model, prompt, include):
    texts = ["how do I read parquet", "a b c", "Ünïcödé and emoji 🎉 text"]
    cfg = ModelConfig(query_prompt=prompt, task="find code", include_prompt_in_pooling=include)
    spec = resolve_model(cfg)
    _, ours = embed_texts(spec, texts, role="query")
    st_prompt = prompt.replace("{task}", "find code").replace("{text}", "")
    st_model[1].include_prompt = include
    try:
        ref = st_model.encode(texts, prompt=st_prompt)
    finally:
        st_model[1].include_prompt = True
    assert cos(ours, ref).min() >= 0.9999


@pytest.mark.parametrize("budget,max_rows,side", [(1, 1, "right"), (64, 4, "left"), (10**6, 512, "right"),
                                                   (10**6, 512, "left")])
def test_batch_invariance(varied_docs, budget, max_rows, side):
    texts = [d["text"] for d in varied_docs[::5][:40]]
    spec = resolve_model(ModelConfig())
    _, alone = embed_texts(spec, texts, budget=1, max_rows=1)
    _, batched = embed_texts(spec, texts, budget=budget, max_rows=max_rows, side=side)
    assert np.abs(alone - batched).max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_last_token_padding_sides(tiny_qwen2, side):
    spec = resolve_model(ModelConfig(path=tiny_qwen2, padding_side=side))
    assert spec.pooling == "last-token" and spec.is_decoder
    texts = ["short", "a somewhat longer text than the first one", "mid length text"]
    _, alone = embed_texts(spec, texts, budget=1, max_rows=1)
    _, batched = embed_texts(spec, texts, budget=10**6, max_rows=64)
    assert np.abs(alone - batched).max() <= 1e-5


def test_sentence_transformers_decoder_folder(tiny_llama_st):
    from sentence_transformers import SentenceTransformer

    spec = resolve_model(ModelConfig(path=tiny_llama_st))
    assert (spec.pooling, spec.normalize, spec.max_length) == ("last-token", True, 128)
    texts = ["one", "two words", "three words here"]
    _, ours = embed_texts(spec, texts)
    ref = SentenceTransformer(tiny_llama_st, device="cpu").encode(texts)
    assert cos(ours, ref).min() >= 0.9999


def test_matryoshka_dim_and_renormalisation(st_model):
    spec = resolve_model(ModelConfig(dim=64))
    _, ours = embed_texts(spec, ["matryoshka test"])
    full = st_model.encode(["matryoshka test"])[:, :64]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert ours.shape == (1, 64)
    assert np.abs(ours - expected).max() < 1e-5


def test_long_document_chunks_cover_text_and_map_back():
    spec = resolve_model(ModelConfig(max_length=64, chunk_overlap=8))
    tok = TextTokenizer(spec)
    text = " ".join(f"word{i}" for i in range(400))
    chunks = tok.encode([text])
    assert len(chunks) > 1 and all(len(c.input_ids) <= 64 for c in chunks)
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)
    for a, b in zip(chunks, chunks[1:]):
        assert b.char_start < a.char_end  # overlapping windows: no token falls between chunks
    covered = np.zeros(len(text), dtype=bool)
    for c in chunks:
        covered[c.char_start : c.char_end] = True
    # every character that belongs to some token lies inside a chunk's span
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())


def test_megabyte_document_is_chunked_not_truncated():
    spec = resolve_model(ModelConfig())
    text = ("lorem ipsum dolor sit amet " * 40000)[: 1 << 20]
    chunks = TextTokenizer(spec).encode([text])
    assert len(chunks) > 1000 and not any(c.truncated for c in chunks)
    assert chunks[-1].char_end >= len(text.rstrip()) - 1


def test_truncation_is_counted_when_asked():
    spec = resolve_model(ModelConfig(long_documents="truncate", max_length=16))
    chunks = TextTokenizer(spec).encode(["tiny", "x " * 100])
    assert [c.truncated for c in chunks] == [False, True]


@pytest.mark.parametrize("cfg,key", [
    (ModelConfig(dim=1000), "model.dim"),
    (ModelConfig(max_length=100000), "model.max_length"),
    (ModelConfig(query_prompt="Instruct: {task}\nQuery: {text}"), "model.query_prompt"),
    # a typo in a field would be embedded as literal text in front of every document
    (ModelConfig(document_prompt="passage: {txt}"), r"model.document_prompt: unknown field \{txt\}"),
    (ModelConfig(query_prompt="{tsk} {text}", task="find"), r"model.query_prompt: unknown field \{tsk\}"),
])
def test_impossible_model_settings_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        resolve_model(cfg)


def test_sentence_transformers_folder_with_dense_and_cls(tmp_path, minilm_path):
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    st = SentenceTransformer(modules=[
        models.Transformer(minilm_path, max_seq_length=64),
        models.Pooling(384, pooling_mode="cls"),
        models.Dense(384, 96, activation_function=torch.nn.Tanh()),
        models.Normalize(),
    ], device="cpu")
    st.prompts = {"query": "query: ", "passage": "passage: "}
    folder = str(tmp_path / "st-dense")
    st.save(folder)
    spec = resolve_model(ModelConfig(path=folder))
    assert (spec.pooling, spec.full_dim, spec.max_length, spec.document_prefix) == ("cls", 96, 64, "passage: ")
    texts = ["dense projection", "a longer sentence for the dense head to project"]
    _, ours = embed_texts(spec, texts)
    ref = SentenceTransformer(folder, device="cpu").encode(texts, prompt_name="passage")
    assert cos(ours, ref).min() >= 0.9999
    _, q = embed_texts(spec, texts, role="query")
    assert cos(q, SentenceTransformer(folder, device="cpu").encode(texts, prompt_name="query")).min() >= 0.9999


@pytest.mark.parametrize("model", ["minilm", "qwen2"])
def test_packed_varlen_path_equals_padded(varied_docs, tiny_qwen2, model):
    """One packed sequence with block-diagonal attention (the reference for flash-attention's
    varlen kernel) gives the padded path's vectors: positions restart per row, no row sees
    another, pooling reads each row's own tokens."""
    spec = resolve_model(ModelConfig(path=tiny_qwen2 if model == "qwen2" else None, long_documents="truncate"))
    texts = [d["text"] for d in varied_docs[::7][:24]]
    ids = [c.input_ids for c in TextTokenizer(spec).encode(texts)]
    padded = Embedder(spec).embed(ids)
    emb = Embedder(spec, packed=True)
    assert emb.packed and "input_ids" in emb.prepare(*flatten(ids), np.arange(len(ids))) and \
        emb.prepare(*flatten(ids), np.arange(len(ids)))["input_ids"].shape == (1, sum(map(len, ids)))
    packed = emb.embed(ids)
    assert np.abs(padded - packed).max() <= 1e-5


def test_packed_path_refuses_unsupported_models(tmp_path, minilm_path):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    folder = str(tmp_path / "distil")
    cfg = DistilBertConfig(vocab_size=30522, dim=32, hidden_dim=64, n_layers=1, n_heads=2)
    DistilBertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    with pytest.raises(ValueError, match="distilbert"):
        Embedder(resolve_model(ModelConfig(path=folder)), packed=True)


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(max_length=24, chunk_overlap=4),  # some texts split into chunks
    ModelConfig(max_length=24, long_documents="truncate"),
    ModelConfig(document_prompt="passage: {text}", include_prompt_in_pooling=False),
    ModelConfig(document_prompt="passage: {text}"),
])
def test_columnar_encoding_equals_chunks(varied_docs, cfg):
    spec = resolve_model(cfg)
    tok = TextTokenizer(spec)
    texts = [d["text"] for d in varied_docs[:60]]
    chunks = tok.encode(texts)
    # both first passes: ids only, and ids with offsets (chunks cut from them, not a second call)
    for share in (0.0, 1.0):
        tok._long_share = share
        enc = tok.encode_arrays(texts)
        rows = [enc.values[s:e].tolist() for s, e in zip(enc.offsets[:-1], enc.offsets[1:])]
        assert rows == [c.input_ids for c in chunks]
        for name in ("doc_index", "chunk", "char_start", "char_end", "prompt_len", "truncated"):
            assert getattr(enc, name).tolist() == [getattr(c, name) for c in chunks], name


def test_sequence_offsets_equal_a_call_without_special_tokens(minilm_path):
    """Chunks are cut from the own tokens' spans of the with-special-tokens call: the same spans
    as tokenising the text alone, for a BERT template and a byte-level BPE with offset trimming,
    special-token strings inside the text included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    from gpte_ray.model.tokenize import _sequence_offsets

    texts = ["", "plain words", "  spaces  around  ", "a [SEP] inside [CLS] it", "<s> and </s> too",
             "ünïcödé 😀 emoji, tabs\tand\nnewlines", "x" * 300]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    bpe.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=True)
    bert = AutoTokenizer.from_pretrained(minilm_path).backend_tokenizer
    bert.no_truncation()
    bert.no_padding()
    for tok in (bert, bpe):
        with_special = tok.encode_batch(texts, add_special_tokens=True)
        alone = tok.encode_batch(texts, add_special_tokens=False)
        assert [_sequence_offsets(e) for e in with_special] == [e.offsets for e in alone]


def _fake_varlen_attn(causal_kw: str):
    """A CPU stand-in with torch's varlen_attn signature (torch 2.10's `is_causal`, or the
    later `window_size`, `scale` and `enable_gqa`): SDPA row by row, checking the layout it is
    given the way the CUDA kernel requires it."""
    import torch

    def run(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, scale=None, gqa=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        assert max_q == max_k == int(cu_q.diff().max()) and q.shape[0] == int(cu_q[-1])
        assert gqa or k.shape[1] == q.shape[1]
        rows = [torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
            is_causal=causal, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
            for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(rows)

    if causal_kw == "is_causal":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=window_size == (-1, 0),
                       scale=scale, gqa=enable_gqa)
    return varlen_attn


@pytest.mark.parametrize("causal_kw", ["is_causal", "window_size"])
@pytest.mark.parametrize("model", ["minilm", "qwen2"])
def test_packed_path_through_torch_varlen_equals_padded(monkeypatch, varied_docs, tiny_qwen2, model, causal_kw):
    """The packed path through torch's own varlen_attn (CUDA only; here a CPU stand-in with its
    signature) gives the padded path's vectors: layouts, causal masking, grouped-query heads."""
    from torch.nn.attention import varlen

    from gpte_ray.model import attention

    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen_attn(causal_kw))
    from transformers import AttentionInterface

    monkeypatch.setattr(attention, "reference_varlen", attention.torch_varlen)  # CPU takes the torch adapter
    # the registry is global: put the reference back under its name when the test ends
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.REFERENCE, attention.reference_varlen)
    spec = resolve_model(ModelConfig(path=tiny_qwen2 if model == "qwen2" else None, long_documents="truncate"))
    texts = [d["text"] for d in varied_docs[::7][:24]]
    ids = [c.input_ids for c in TextTokenizer(spec).encode(texts)]
    padded = Embedder(spec).embed(ids)
    emb = Embedder(spec, packed=True)
    assert emb.packed and emb.model.config._attn_implementation == attention.REFERENCE
    assert np.abs(padded - emb.embed(ids)).max() <= 1e-5


def test_torch_varlen_check_refuses_a_kernel_that_gets_the_causal_mask_wrong(monkeypatch):
    """The once-per-process check before the packed path takes torch's varlen_attn: a kernel
    that agrees with SDPA passes; one that attends bidirectionally in a decoder is caught."""
    import torch
    from torch.nn.attention import varlen

    from gpte_ray.model import attention

    cu = torch.tensor([0, 5, 22, 62], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 62, 16), torch.randn(1, 2, 62, 16), torch.randn(1, 2, 62, 16)
    right = _fake_varlen_attn("window_size")
    monkeypatch.setattr(varlen, "varlen_attn", right)
    assert attention._matches_sdpa(None, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, 40)
    assert attention._matches_sdpa(attention._Causal(), q, k, v, cu, 40)

    def never_causal(*args, window_size=(-1, -1), **kwargs):
        return right(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", never_causal)
    assert not attention._matches_sdpa(attention._Causal(), q, k, v, cu, 40)


def test_a_binding_sliding_window_is_never_packed(tmp_path, minilm_path):
    """The varlen adapters apply no sliding-window mask: a model whose window is shorter than
    max_length takes the padded path (its SDPA mask applies the window), and asking for packed
    is one line; the torch adapter refuses such a row outright."""
    import torch
    from transformers import Qwen2Config, Qwen2Model

    from gpte_ray.model import attention
    from tests.support.models import save_tiny

    cfg = Qwen2Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      use_sliding_window=True, sliding_window=16, max_window_layers=0)
    spec = resolve_model(ModelConfig(path=save_tiny(str(tmp_path / "swa"), cfg, Qwen2Model, minilm_path)))
    assert spec.max_length > 16
    with pytest.raises(ValueError, match="sliding window"):
        Embedder(spec, packed=True)
    assert not Embedder(spec).packed
    x = torch.zeros(1, 2, 40, 8)
    with pytest.raises(ValueError, match="sliding window"):
        attention.torch_varlen(None, x, x, x, None, cu_seq_lens_q=torch.tensor([0, 40], dtype=torch.int32),
                               max_length_q=40, sliding_window=16)


def test_packed_only_in_half_precision_on_a_gpu():
    """torch's and flash-attn's varlen kernels take float16 / bfloat16 only: a float32 model on a
    GPU runs padded, and asking it to pack is one line; CPU tests may pack in float32."""
    import torch

    from gpte_ray.model.embedder import wants_packed

    assert wants_packed(None, True, True, torch.float16) and wants_packed(None, True, True, torch.bfloat16)
    assert not wants_packed(None, True, True, torch.float32)
    assert not wants_packed(None, True, False, torch.float16) and not wants_packed(False, True, True, torch.float16)
    assert not wants_packed(None, False, True, torch.float32) and wants_packed(True, False, True, torch.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        wants_packed(True, True, True, torch.float32)
