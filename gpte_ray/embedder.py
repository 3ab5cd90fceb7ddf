"""The GPTE embedder: backbone forward, pooling, Dense, then post-processing.

Split as pre (pad token ids into tensors, on the CPU), core (forward + pool on the device)
and post (normalise, Matryoshka, quantise, in numpy), so every device copy and dtype cast
sits at a visible boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpte_ray.pooling import pool
from gpte_ray.quantize import quantize_binary, quantize_int8, truncate_dim
from gpte_ray.spec import ModelSpec

__all__ = ["Embedder", "postprocess"]


def postprocess(pooled: np.ndarray, spec: ModelSpec, calibration: dict | None) -> np.ndarray:
    """Pooled float32 (n, full_dim) -> stored vectors (n, dim) in the table's precision."""
    v = pooled
    if spec.normalize:
        # normalise before truncation too, as sentence-transformers' Normalize module does
        v = truncate_dim(v, None, True)
    v = truncate_dim(v, spec.dim, spec.normalize).astype(np.float32)
    if spec.precision == "float16":
        return v.astype(np.float16)
    if spec.precision == "int8":
        if calibration is None:
            raise ValueError("int8 output needs calibration ranges")
        return quantize_int8(v, np.asarray(calibration["low"]), np.asarray(calibration["high"]))
    if spec.precision == "binary":
        return quantize_binary(v)
    return v


class Embedder:
    """A loaded model on one device; `embed` maps token-id lists to pooled float32 vectors."""

    def __init__(self, spec: ModelSpec, device: str = "cpu"):
        import torch
        from transformers import AutoModel

        self.spec = spec
        self.device = torch.device(device)
        if spec.dtype == "auto":
            dtype = torch.float32 if device == "cpu" else (
                torch.bfloat16 if spec.is_decoder else torch.float16
            )
        else:
            dtype = getattr(torch, spec.dtype)
        self.dtype = dtype
        kwargs = {"dtype": dtype}
        folder = spec.local_folder()  # this node's copy of the model, fetched once per node
        try:
            self.model = AutoModel.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError):
            self.model = AutoModel.from_pretrained(folder, **kwargs)
        self.model.to(self.device).eval()
        self.dense = [self._load_dense(d, folder / d.path) for d in spec.dense]
        self.pad_id = self._pad_id()

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
        act = {"Tanh": torch.nn.Tanh(), "ReLU": torch.nn.ReLU(), "GELU": torch.nn.GELU()}.get(
            d.activation, torch.nn.Identity()
        )
        return torch.nn.Sequential(layer, act).to(self.device, self.dtype).eval()

    # ---- pre: CPU tensors -------------------------------------------------------------
    def pad(self, ids: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None) -> dict:
        """Pad to the longest row of this micro-batch only, on the configured side."""
        import torch

        n, longest = len(ids), max(len(x) for x in ids)
        input_ids = torch.full((n, longest), self.pad_id, dtype=torch.long)  # (bs, seq_len)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for r, row in enumerate(ids):
            if self.spec.padding_side == "left":
                input_ids[r, longest - len(row):] = torch.as_tensor(row)
                mask[r, longest - len(row):] = 1
            else:
                input_ids[r, : len(row)] = torch.as_tensor(row)
                mask[r, : len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.spec.positions_from_mask:
            # position of each real token counted from its own first token: left padding exact
            batch["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if prompt_lens is not None and any(prompt_lens):
            if self.spec.padding_side == "left":
                shift = torch.as_tensor([longest - len(x) for x in ids])
                batch["prompt_lens"] = torch.as_tensor(prompt_lens) + shift
            else:
                batch["prompt_lens"] = torch.as_tensor(prompt_lens)
        return batch

    # ---- core: on the device ------------------------------------------------------------
    def forward(self, batch: dict):
        import torch

        non_blocking = self.device.type == "cuda"
        on_dev = {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}
        prompt_lens = on_dev.pop("prompt_lens", None)
        with torch.inference_mode():
            out = self.model(**on_dev)
            hidden = out.last_hidden_state  # (bs, seq_len, hidden)
            pooled = pool(hidden.float(), on_dev["attention_mask"], self.spec.pooling, prompt_lens)
            for layer in self.dense:
                pooled = layer(pooled.to(self.dtype)).float()
        return pooled  # (bs, full_dim) float32 on the device

    # ---- post: numpy ------------------------------------------------------------------
    def embed(self, ids: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None) -> np.ndarray:
        """Pooled float32 vectors (n, full_dim) for one micro-batch."""
        return self.forward(self.pad(ids, prompt_lens)).cpu().numpy()
