"""The GPTE embedder: backbone forward, pooling, Dense, then post-processing.

Split as pre (pad token ids into tensors, on the CPU), core (forward + pool on the device)
and post (normalise, Matryoshka, quantise, in numpy: `outputs.py`), so every device copy and
dtype cast sits at a visible boundary. The backbone is loaded by the class sentence-transformers
uses for it (`spec.backbone_class`): the encoder alone for T5, the MLM head for sparse models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpte_ray.model.attention import packed_attention
from gpte_ray.model.batching import flatten, gather_packed, gather_padded
from gpte_ray.model.outputs import Embeddings, WindowOutputs, postprocess
from gpte_ray.model.pooling import pool, splade_pool, unpack
from gpte_ray.model.spec import ENCODER_ONLY, ModelSpec, backbone_class

__all__ = ["PACKABLE", "Embedder", "postprocess", "skiplist_ids"]


def skiplist_ids(folder, words) -> list[int]:
    """Token ids of skiplist words, as sentence-transformers' MultiVectorMask resolves them: a
    word that is no single token of the vocabulary (it maps to the unknown token) is dropped."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = []
    for word in words:
        token_id = tok.convert_tokens_to_ids(word)
        if token_id != tok.unk_token_id or word == tok.unk_token:
            ids.append(token_id)
    return ids


# model types whose forward takes a packed batch: absolute positions counted from 0 (BERT) or
# rotary positions (the decoders), and attention that reads `cu_seq_lens_*` from its kwargs
PACKABLE = frozenset({"bert", "llama", "mistral", "qwen2", "qwen3"})


def wants_packed(packed: bool | None, cuda: bool, packable: bool, dtype) -> bool:
    """Whether to look for a varlen kernel: asked for, or (None) a packable model on a GPU in
    half precision; the GPU kernels take float16 and bfloat16 only."""
    import torch

    half = dtype in (torch.float16, torch.bfloat16)
    if packed and cuda and not half:
        raise ValueError(f"packed attention on a GPU needs float16 or bfloat16, not {dtype} (model.dtype)")
    return bool(packed) or (packed is None and cuda and packable and half)


class Embedder:
    """A loaded model on one device; `embed` maps token ids to pooled float32 vectors.

    `packed`: run each micro-batch as one packed sequence with variable-length attention (no
    padding computed). None = where it is supported: CUDA, a varlen kernel there (flash-attn,
    or torch's own: `attention.packed_attention`), and a dense model type in PACKABLE. True on
    CPU uses a reference varlen attention (tests only). `attention` names what runs.
    """

    def __init__(self, spec: ModelSpec, device: str = "cpu", packed: bool | None = None, role: str = "document"):
        import torch
        import transformers

        self.spec = spec
        self.device = torch.device(device)
        if spec.dtype == "auto":
            # T5 activations overflow float16
            wide = spec.is_decoder or spec.model_type in ENCODER_ONLY
            dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if wide else torch.float16)
        else:
            dtype = getattr(torch, spec.dtype)
        self.dtype = dtype
        kwargs = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
        folder = spec.local_folder()  # this node's copy of the model, fetched once per node
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        model_type = getattr(config, "model_type", "")
        cuda = self.device.type == "cuda"
        packable = model_type in PACKABLE and spec.output == "dense"  # token outputs read the padded layout
        if packed and not packable:
            raise ValueError(f"packed attention is not supported for model type {model_type!r} ({spec.output})")
        window = getattr(config, "sliding_window", None)  # None where the model does not use one
        if window is not None and window < spec.max_length:
            # a sliding window that can bind is a mask the varlen adapters do not apply
            if packed:
                raise ValueError(f"packed attention is not supported with a sliding window ({window}) shorter "
                                 f"than max_length ({spec.max_length})")
            packable = False
        attn = packed_attention(self.device) if wants_packed(packed, cuda, packable, dtype) else None
        if packed and attn is None:
            raise ValueError("packed attention needs flash-attn or torch >= 2.10 on an sm80+ GPU")
        self.packed = attn is not None
        self.attention = attn or "sdpa"
        backbone = getattr(transformers, backbone_class(spec))
        if self.packed:
            self.model = backbone.from_pretrained(folder, attn_implementation=attn, **kwargs)
        else:
            try:
                self.model = backbone.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
            except (ValueError, ImportError):
                self.model = backbone.from_pretrained(folder, **kwargs)
        self.model.to(self.device).eval()
        self.dense = [self._load_dense(d, folder / d.path) for d in spec.dense]
        self.pad_id = self._pad_id()
        self.pin = cuda  # page-locked staging so the host-to-device copy can run asynchronously
        self.skip_ids = None  # multi-vector: token ids whose vectors this role leaves out
        if spec.skiplist and (role != "query" or spec.skiplist_queries):
            self.skip_ids = torch.tensor(skiplist_ids(folder, spec.skiplist), dtype=torch.long, device=self.device)

    def _pad_id(self) -> int:
        cfg = self.model.config
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(cfg, attr, None)
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return 0

    def _load_dense(self, d, folder):
        import os

        import torch

        layer = torch.nn.Linear(d.in_features, d.out_features, bias=d.bias)
        st = os.path.join(folder, "model.safetensors")
        if os.path.exists(st):
            from safetensors.torch import load_file

            state = load_file(st)
        else:
            state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu")
        layer.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
        # every name modules.ACTIVATIONS admits; another never reaches this point
        act = {"Tanh": torch.nn.Tanh(), "ReLU": torch.nn.ReLU(), "GELU": torch.nn.GELU(), "Sigmoid": torch.nn.Sigmoid(),
               "Identity": torch.nn.Identity()}[d.activation]
        return torch.nn.Sequential(layer, act).to(self.device, self.dtype).eval()

    # ---- pre: CPU tensors -------------------------------------------------------------
    def prepare(self, values: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                prompt_lens: np.ndarray | None = None) -> dict:
        """CPU tensors for rows `rows` of the flat token ids (values, offsets): padded to the
        longest of these rows on the configured side, or packed; pinned on CUDA."""
        import torch

        if self.packed:
            ids, positions, cu = gather_packed(values, offsets, rows)
            lens = np.diff(cu)
            batch = {"input_ids": torch.from_numpy(ids)[None], "position_ids": torch.from_numpy(positions)[None],
                     "cu_seq_lens": torch.from_numpy(cu), "lengths": torch.from_numpy(lens.astype(np.int64))}
            shift = None
        else:
            left = self.spec.padding_side == "left"
            ids, mask = gather_padded(values, offsets, rows, self.pad_id, left)
            batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}  # (bs, seq_len)
            if self.spec.positions_from_mask:
                # position of each real token counted from its own first token: left padding exact
                batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
            shift = ids.shape[1] - mask.sum(axis=1) if left else None
        if prompt_lens is not None:
            plens = np.asarray(prompt_lens, dtype=np.int64)[rows]
            if plens.any():
                batch["prompt_lens"] = torch.from_numpy(plens + shift if shift is not None else plens)
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    # ---- core: on the device ------------------------------------------------------------
    def forward(self, batch: dict):
        """On the device, returning before it finishes: dense, pooled (bs, full_dim) float32;
        sparse, the pooled vocabulary weights (bs, vocab) float32; multi-vector, (token vectors
        (bs, seq_len, full_dim) float32, the mask of the tokens kept (bs, seq_len))."""
        import torch

        non_blocking = self.pin
        on_dev = {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}
        prompt_lens = on_dev.pop("prompt_lens", None)
        with torch.inference_mode():
            if self.packed:
                hidden, mask = self._forward_packed(on_dev, batch["lengths"])
            elif self.spec.output == "sparse":
                # MLM logits (bs, seq_len, vocab): pooled at once, they are the largest tensor here
                mask = on_dev["attention_mask"]
                return splade_pool(self.model(**on_dev).logits, mask, self.spec.pooling, self.spec.sparse_activation)
            else:
                hidden, mask = self.model(**on_dev).last_hidden_state, on_dev["attention_mask"]
            if self.spec.output == "multi-vector":
                return self._tokens(hidden, mask, on_dev["input_ids"])
            # hidden (bs, seq_len, hidden); pooling and normalisation always in float32
            pooled = pool(hidden.float(), mask, self.spec.pooling, prompt_lens)
            for layer in self.dense:
                pooled = layer(pooled.to(self.dtype)).float()
        return pooled  # (bs, full_dim) float32 on the device

    def _tokens(self, hidden, mask, input_ids):
        """Multi-vector: every token's state through the Dense layers, and the tokens kept
        (real ones, less the skiplist's)."""
        import torch

        for layer in self.dense:
            hidden = layer(hidden.to(self.dtype))
        keep = mask.bool()
        if self.skip_ids is not None:
            keep &= ~torch.isin(input_ids, self.skip_ids)
        return hidden.float(), keep  # (bs, seq_len, full_dim), (bs, seq_len)

    def _forward_packed(self, on_dev: dict, lengths):
        """One packed sequence through the model, unpacked to right-padded (bs, longest, hidden)
        so that pooling is the same code as on the padded path."""
        cu = on_dev["cu_seq_lens"]
        longest = int(lengths.max())  # from the host copy: no device sync
        out = self.model(input_ids=on_dev["input_ids"], position_ids=on_dev["position_ids"],
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return unpack(out.last_hidden_state[0], on_dev["position_ids"][0], on_dev["lengths"], longest)

    # ---- post: numpy ------------------------------------------------------------------
    def embed(self, ids: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None) -> np.ndarray:
        """Pooled float32 vectors (n, full_dim) for one micro-batch of token-id lists (dense models)."""
        if self.spec.output != "dense":
            raise ValueError(f"embed() gives pooled vectors; a {self.spec.output} model's come from embed_outputs()")
        values, offsets = flatten(ids)
        rows = np.arange(len(ids))
        return self.forward(self.prepare(values, offsets, rows, prompt_lens)).cpu().numpy()

    def embed_outputs(self, ids: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None,
                      calibration: dict | None = None) -> Embeddings:
        """One micro-batch of token-id lists -> its stored outputs, whatever the output kind."""
        values, offsets = flatten(ids)
        rows = np.arange(len(ids))
        window = WindowOutputs(self.spec, len(ids))
        window.add(rows, self.forward(self.prepare(values, offsets, rows, prompt_lens)))
        return window.finish(calibration)
