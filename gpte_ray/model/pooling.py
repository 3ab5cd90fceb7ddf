"""Pooling of token states into one vector per text. Plain torch, no Ray."""

from __future__ import annotations

import torch

__all__ = ["POOLING_MODES", "last_token_index", "pool", "splade_pool", "unpack"]

POOLING_MODES = ("cls", "mean", "last-token", "weighted-mean")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, under left or right padding.

    The position of the last 1 in each row: correct for either side, and for a row that
    has no padding at all.
    """
    seq_len = attention_mask.shape[1]
    positions = torch.arange(seq_len, device=attention_mask.device)  # (seq_len,)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)  # (bs,)


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool `hidden` (bs, seq_len, dim) into (bs, dim).

    `prompt_lengths` (bs,) excludes each row's leading prompt tokens from mean pooling
    (right padding assumed for that option, as sentence-transformers does).
    """
    # zero padded positions outright: 0 * NaN would leak NaN from fully-masked rows
    hidden = hidden.masked_fill(attention_mask[..., None] == 0, 0.0)
    mask = attention_mask.to(hidden.dtype)  # (bs, seq_len)
    if mode == "cls":
        # the first real token: under left padding it is not at position 0
        first = (attention_mask.long().cumsum(dim=1) == 1).long().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if mode == "last-token":
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if prompt_lengths is not None:
        positions = torch.arange(mask.shape[1], device=mask.device)
        mask = mask * (positions[None, :] >= prompt_lengths[:, None]).to(mask.dtype)
    if mode == "mean":
        weights = mask
    elif mode == "weighted-mean":
        # SGPT: weight i for the i-th real token (1-based), whatever the padding side
        weights = mask.cumsum(dim=1) * mask
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    summed = (hidden * weights.unsqueeze(-1)).sum(dim=1)  # (bs, dim)
    return summed / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)


def splade_pool(logits: torch.Tensor, attention_mask: torch.Tensor, mode: str, activation: str) -> torch.Tensor:
    """SPLADE: MLM logits (bs, seq_len, vocab) -> vocabulary weights (bs, vocab), the max or
    sum over real tokens of log(1 + relu(logit)) (log1p once more for `log1p_relu`), in
    float32, as sentence-transformers' SpladePooling computes them."""
    x = logits.float() * attention_mask[..., None].to(torch.float32)  # a new tensor: in place from here
    x = x.relu_().log1p_()
    if activation == "log1p_relu":
        x = x.log1p_()
    if mode == "max":
        return x.amax(dim=1)
    if mode == "sum":
        return x.sum(dim=1)
    raise ValueError(f"unknown SPLADE pooling {mode!r}; expected max or sum")


def unpack(flat: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
           longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed sequence's states (T, dim) -> right-padded (bs, longest, dim) and its mask.

    `positions` (T,) is each token's index within its own row, `lengths` (bs,) the rows'
    token counts (summing to T).
    """
    bs = lengths.shape[0]
    rows = torch.repeat_interleave(torch.arange(bs, device=flat.device), lengths, output_size=flat.shape[0])
    padded = flat.new_zeros((bs, longest, flat.shape[-1]))  # (bs, longest, dim)
    padded[rows, positions] = flat
    mask = (torch.arange(longest, device=flat.device)[None, :] < lengths[:, None]).long()  # (bs, longest)
    return padded, mask
