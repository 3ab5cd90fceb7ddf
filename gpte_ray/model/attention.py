"""Variable-length attention for the packed path: a micro-batch runs as one packed sequence.

On CUDA the packed path takes, in this order: flash-attention's kernel (the `flash-attn`
package, through transformers' "flash_attention_2"); PyTorch's own `varlen_attn` (torch >= 2.10,
flash kernels shipped with torch, nothing to build; sm80 or newer, checked against SDPA once per
process); else none, and the padded SDPA path runs. On CPU a reference (SDPA under a
block-diagonal mask) stands in, for tests.

Each function takes transformers' attention-interface arguments: query (1, heads, T, d), key and
value (1, kv_heads, T, d), `cu_seq_lens_q` (rows + 1,) int32 and `max_length_q` in the kwargs,
and returns (1, T, heads, d).
"""

from __future__ import annotations

import functools
import inspect
import math

__all__ = ["REFERENCE", "TORCH", "flash_attention_available", "packed_attention", "reference_varlen",
           "torch_varlen"]

REFERENCE = "gpte_varlen_reference"
TORCH = "gpte_varlen_torch"


def _causal(module, kwargs) -> bool:
    # as transformers' own attention functions: an `is_causal` argument overrides the module's
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if causal is None else causal)


def reference_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with a block-diagonal mask built from cu_seq_lens_q: computes the full T x T scores,
    so it is for tests, not speed."""
    import torch

    cu = kwargs["cu_seq_lens_q"].long()
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=query.device), cu.diff())  # (T,)
    allowed = seg[:, None] == seg[None, :]  # (T, T): a token sees its own row only
    if _causal(module, kwargs):
        allowed &= torch.ones_like(allowed).tril()
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (1, T, heads, d)


@functools.lru_cache(maxsize=4)
def _params(fn) -> frozenset:
    # torch 2.10 takes `is_causal`; later releases take `window_size`, `scale` and `enable_gqa`
    return frozenset(inspect.signature(fn).parameters)


def torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """PyTorch's `varlen_attn` on the packed tokens (T, heads, d)."""
    from torch.nn.attention import varlen

    fn = varlen.varlen_attn
    params = _params(fn)
    cu = kwargs["cu_seq_lens_q"].int()
    longest = int(kwargs["max_length_q"])
    window = kwargs.get("sliding_window")
    if window is not None and longest > window:  # the Embedder does not pack such a model; never a wrong mask
        raise ValueError(f"a sliding window ({window}) shorter than a packed row ({longest}) is not applied here")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("attention soft-capping and sinks are not applied by torch's varlen_attn here")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, d)
    extra = {}
    if _causal(module, kwargs):
        extra.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    if scaling is not None and "scale" in params:
        extra["scale"] = float(scaling)
    elif scaling is not None and not math.isclose(scaling, q.shape[-1] ** -0.5, rel_tol=1e-6):
        raise ValueError(f"this torch's varlen_attn takes no scale; the model scales attention by {scaling}")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, **extra)
    return out.unsqueeze(0), None  # (1, T, heads, d)


def flash_attention_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    return bool(is_flash_attn_2_available())


def _register(name: str, fn) -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    return name


class _Causal:
    is_causal = True  # stands for a decoder's attention module in the check below


def _matches_sdpa(module, q, k, v, cu, longest) -> bool:
    """torch_varlen on (1, heads, T, d) tensors against SDPA row by row, in float32."""
    import torch

    got = torch_varlen(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest)[0][0].float()
    rep = q.shape[1] // k.shape[1]
    want = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[:, :, a:b].float() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=module is not None)
        want.append(out[0].transpose(0, 1))
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), torch.cat(want).flatten(1), dim=1)
    return bool(cos.min() >= 0.999)


@functools.lru_cache(maxsize=8)
def _torch_varlen_works(device: str) -> bool:
    """torch has varlen_attn, the GPU is sm80+, and on three rows of random tensors it gives
    what SDPA gives per row (cosine >= 0.999), bidirectional in float16 (encoders) and causal
    with grouped-query heads in bfloat16 (decoders): a kernel that is missing or wrong here leaves
    the padded path, never a wrong vector."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    dev = torch.device(device)
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return False
    gen = torch.Generator(device=dev).manual_seed(0)
    lens = [5, 17, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)

    def rand(heads, dtype=torch.float16):
        return torch.randn(1, heads, sum(lens), 64, device=dev, dtype=dtype, generator=gen)

    bf16 = torch.bfloat16
    try:
        return (_matches_sdpa(None, rand(4), rand(4), rand(4), cu, max(lens))
                and _matches_sdpa(_Causal(), rand(4, bf16), rand(2, bf16), rand(2, bf16), cu, max(lens)))
    except Exception:  # an unsupported build or device: the padded path runs
        return False


def packed_attention(device) -> str | None:
    """The attention implementation the packed path uses on `device` ('cuda:0', 'cpu'), or None
    where it has none there."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return _register(REFERENCE, reference_varlen)
    if device.type != "cuda":
        return None
    if flash_attention_available():
        return "flash_attention_2"
    if _torch_varlen_works(str(device)):
        return _register(TORCH, torch_varlen)
    return None
