"""PyTorch side: ``CacheDataset`` and ``kd_loss``.

``kd_loss`` is the mathematics of the crate's ``src/loss.rs`` (the Rust trainer's loss):
the teacher at a position is its top-k log-probs plus the log of the tail mass, and the
tail is one outcome of the divergence; a ``sample``/``hybrid`` cache's sparse estimate has
no tail outcome. The KD term is scaled by T² and mixed with next-token CE:
``kd_weight * T² * KD + ce_weight * CE``, each averaged over its positions (``mask`` for
KD, ``target_mask`` for CE). Tests compare it, value and gradient, with the Rust loss.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.utils.checkpoint

from . import Stream

__all__ = ["CacheDataset", "kd_loss", "to_torch"]

# Teacher log-probs below this count as zero probability (as in src/loss.rs).
LOG_ZERO = -1e4
LOSSES = ("fkl", "fkl-topk", "rkl", "jsd", "ce")


def to_torch(batch: Dict[str, Any], device: "torch.device | str | None" = None) -> Dict[str, Any]:
    """A :class:`logitcache.Batch` as tensors (ids as int64, the rest as float32), on
    ``device``; sizes and the cursor are kept as they are."""
    out: Dict[str, Any] = {}
    for name, v in batch.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v.astype(np.int64) if v.dtype in (np.uint32, np.uint64) else v)
            out[name] = t.to(device) if device is not None else t
        else:
            out[name] = v
    return out


def _divergence(z: torch.Tensor, ids: torch.Tensor, lp_raw: torch.Tensor, lpt_raw: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-position divergence [n] of the student's logits z [n, V] (already / T)."""
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    lq = z.gather(1, ids) - lse
    lp = lp_raw.clamp_min(LOG_ZERO)
    lpt = lpt_raw.clamp_min(LOG_ZERO).reshape(-1, 1)
    if kind == "fkl-topk":
        lpn = lp - torch.logsumexp(lp, dim=1, keepdim=True)
        lqn = lq - torch.logsumexp(lq, dim=1, keepdim=True)
        return (lpn.exp() * (lpn - lqn)).sum(1)
    # The student's tail: log-sum-exp of its logits outside the top-k (ids given a large
    # negative logit rather than -inf, so a top-k that is the whole vocabulary stays finite).
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids, True)
    lqt = (torch.logsumexp(z.masked_fill(in_top, LOG_ZERO), dim=1, keepdim=True) - lse).clamp_min(LOG_ZERO)
    p, pt = lp.exp(), lpt.exp()
    has_tail = (lpt > LOG_ZERO / 2.0).to(z.dtype)
    qt = lqt.exp() * has_tail
    if kind == "fkl":
        return ((p * (lp - lq)).sum(1, keepdim=True) + pt * (lpt - lqt)).reshape(-1)
    q = lq.exp()
    if kind == "rkl":
        return ((q * (lq - lp)).sum(1, keepdim=True) + qt * (lqt - lpt)).reshape(-1)
    # jsd
    lm = (p * beta + q * (1.0 - beta)).clamp_min(1e-30).log()
    lmt = (pt * beta + qt * (1.0 - beta)).clamp_min(1e-30).log()
    kl_pm = (p * (lp - lm)).sum(1, keepdim=True) + pt * (lpt - lmt)
    kl_qm = (q * (lq - lm)).sum(1, keepdim=True) + qt * (lqt - lmt)
    return (kl_pm * beta + kl_qm * (1.0 - beta)).reshape(-1)


def _chunk_terms(z, ids, lp, lpt, mask, targets, tmask, kind, temperature, beta, use_kd, use_ce):
    kd = z.new_zeros(())
    ce = z.new_zeros(())
    if use_kd:
        zt = z if temperature == 1.0 else z / temperature
        kd = (_divergence(zt, ids, lp, lpt, kind, beta) * mask).sum()
    if use_ce:
        c = torch.logsumexp(z, dim=1) - z.gather(1, targets.reshape(-1, 1)).reshape(-1)
        ce = (c * tmask).sum()
    return kd, ce


class _FklCe(torch.autograd.Function):
    """Forward KL (tail as one outcome) and CE sums of a chunk, with the gradient written out
    (as src/loss.rs has it) instead of autograd's: the backward pass is one softmax over the
    chunk, and nothing of size [positions, vocab] is kept between the passes.

    With q = softmax(z/T), p the teacher's top-k probabilities, pt its tail mass, qt the
    student's, the divergence's gradient in z/T is q·A − p at the top-k ids and q·(A − B)
    elsewhere, A = Σp + pt, B = pt/qt (the pt terms vanish where lqt is clamped, as autograd's
    clamp makes them); CE adds softmax(z) − onehot(target).
    """

    @staticmethod
    def forward(ctx, z, ids, lp, lpt, wk, targets, wc, temperature, use_kd, use_ce):
        zf = z.float()
        zt = zf if temperature == 1.0 else zf / temperature
        kd = zf.new_zeros(())
        ce = zf.new_zeros(())
        lse = lset = zf.new_zeros((zf.shape[0], 1))
        if use_kd:
            lse = torch.logsumexp(zt, dim=1, keepdim=True)
            lq = zt.gather(1, ids) - lse
            lpc = lp.clamp_min(LOG_ZERO)
            lptc = lpt.clamp_min(LOG_ZERO).reshape(-1, 1)
            lset = torch.logsumexp(zt.scatter(1, ids, LOG_ZERO), dim=1, keepdim=True)
            lqt = (lset - lse).clamp_min(LOG_ZERO)
            d = (lpc.exp() * (lpc - lq)).sum(1, keepdim=True) + lptc.exp() * (lptc - lqt)
            kd = (d.reshape(-1) * wk).sum()
        lse1 = lse
        if use_ce:
            if not (use_kd and temperature == 1.0):
                lse1 = torch.logsumexp(zf, dim=1, keepdim=True)
            c = lse1.reshape(-1) - zf.gather(1, targets.reshape(-1, 1)).reshape(-1)
            ce = (c * wc).sum()
        ctx.save_for_backward(z, ids, lp, lpt, wk, targets, wc, lse, lset, lse1)
        ctx.conf = (temperature, use_kd, use_ce)
        return kd, ce

    @staticmethod
    def backward(ctx, gkd, gce):
        z, ids, lp, lpt, wk, targets, wc, lse, lset, lse1 = ctx.saved_tensors
        temperature, use_kd, use_ce = ctx.conf
        zf = z.float()
        grad = None
        wc2 = gce * wc.reshape(-1, 1)
        ce_done = False
        if use_kd:
            zt = zf if temperature == 1.0 else zf / temperature
            grad = (zt - lse).exp_()  # q
            p = lp.clamp_min(LOG_ZERO).exp()
            pt = lpt.clamp_min(LOG_ZERO).exp().reshape(-1, 1)
            live = ((lset - lse) >= LOG_ZERO).to(zf.dtype)
            a = p.sum(1, keepdim=True) + pt * live
            b = pt * live * (lse - lset).exp()
            w = gkd * wk.reshape(-1, 1) / temperature
            q_top = grad.gather(1, ids)
            coef = w * (a - b)
            top = w * q_top * a
            # At T = 1 the CE's softmax is q: one pass for both.
            ce_done = use_ce and temperature == 1.0
            if ce_done:
                coef = coef + wc2
                top = top + wc2 * q_top
            grad.mul_(coef)
            # Top-k ids: q·A − p (scatter for q·A, the same value for a repeated id; scatter_add
            # for −p, so a repeated id with log-prob −inf adds nothing).
            grad.scatter_(1, ids, top)
            grad.scatter_add_(1, ids, -w * p)
            if ce_done:
                grad.scatter_add_(1, targets.reshape(-1, 1), -wc2)
        if use_ce and not ce_done:
            soft = (zf - lse1).exp_()
            soft.mul_(wc2)
            soft.scatter_add_(1, targets.reshape(-1, 1), -wc2)
            grad = soft if grad is None else grad.add_(soft)
        return grad.to(z.dtype), None, None, None, None, None, None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    batch: Dict[str, Any],
    loss: str = "fkl",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    jsd_beta: float = 0.5,
    chunk: Optional[int] = 4096,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The distillation loss of ``student_logits`` ([batch, len, V] or [positions, V])
    against a cache batch (from :func:`to_torch`, or NumPy arrays, converted here).

    Returns ``(total, {"kd": mean divergence before T² and weight, "ce": mean CE})``;
    differentiate ``total``. ``chunk`` positions are computed at a time, so no
    ``[positions, vocab]`` intermediate exists whole (``None``: all positions at once).
    ``fkl`` and ``ce`` have their gradient written out (one softmax pass in backward,
    nothing of the vocabulary's size kept between the passes); the other losses use autograd
    and recompute each chunk in the backward pass (``torch.utils.checkpoint``).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, not {temperature!r}")
    if kd_weight < 0 or ce_weight < 0:
        raise ValueError(f"kd_weight and ce_weight must be >= 0, not {kd_weight!r}, {ce_weight!r}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be None or >= 1, not {chunk!r}")
    dev = student_logits.device
    if any(isinstance(v, np.ndarray) for v in batch.values()):
        batch = to_torch(batch, dev)
    v = student_logits.shape[-1]
    z = student_logits.reshape(-1, v)
    n = z.shape[0]
    k = batch["topk_ids"].shape[-1]
    ids = batch["topk_ids"].reshape(n, k).to(dev, torch.int64)
    if k == 0:
        ids = torch.zeros((n, 1), dtype=torch.int64, device=dev)
        lp = torch.full((n, 1), -math.inf, device=dev)
    else:
        lp = batch["topk_logprobs"].reshape(n, k).to(dev, torch.float32)
    lpt = batch["tail_logprob"].reshape(n).to(dev, torch.float32)
    mask = batch["mask"].reshape(n).to(dev, torch.float32)
    targets = batch["target_ids"].reshape(n).to(dev, torch.int64)
    tmask = batch["target_mask"].reshape(n).to(dev, torch.float32)
    if ids.numel() and (int(ids.max()) >= v):
        raise ValueError(f"the batch has token id {int(ids.max())} but the student's logits have {v} entries: the student's vocabulary must cover the teacher's")
    use_kd = loss != "ce" and kd_weight != 0.0
    use_ce = loss == "ce" or ce_weight != 0.0
    step = n if chunk is None else chunk
    kd_sum = z.new_zeros(())
    ce_sum = z.new_zeros(())
    for s in range(0, n, step):
        e = min(n, s + step)
        args = (z[s:e], ids[s:e], lp[s:e], lpt[s:e], mask[s:e], targets[s:e], tmask[s:e])
        rest = (loss, float(temperature), float(jsd_beta), use_kd, use_ce)
        if loss in ("fkl", "ce"):
            kd_c, ce_c = _FklCe.apply(*args, float(temperature), use_kd, use_ce)
        elif chunk is not None and z.requires_grad:
            kd_c, ce_c = torch.utils.checkpoint.checkpoint(_chunk_terms, *args, *rest, use_reentrant=False)
        else:
            kd_c, ce_c = _chunk_terms(*args, *rest)
        kd_sum = kd_sum + kd_c
        ce_sum = ce_sum + ce_c
    kd = kd_sum / mask.sum().clamp_min(1.0)
    ce = ce_sum / tmask.sum().clamp_min(1.0)
    w_ce = 1.0 if loss == "ce" else ce_weight
    total = kd * (kd_weight * temperature * temperature if use_kd else 0.0) + ce * w_ce
    return total, {"kd": kd, "ce": ce}


class CacheDataset(torch.utils.data.IterableDataset):
    """A cache as an ``IterableDataset`` of batches (``batch_size=None`` in the DataLoader:
    batching is the stream's, with length bucketing).

    The stream is split across ``world_size`` DDP ranks *and* the DataLoader's workers: rank
    ``r`` worker ``w`` of ``W`` reads stream part ``r * W + w`` of ``world_size * W``, so
    every window of the split is seen exactly once per epoch across all of them. ``rank``
    and ``world_size`` default to ``torch.distributed``'s when it is initialised, else to
    the ``RANK`` / ``WORLD_SIZE`` environment variables, else 0 / 1. Batches come as
    tensors (:func:`to_torch`).
    """

    def __init__(
        self,
        path: "os.PathLike[str] | str",
        batch_size: int,
        *,
        split: str = "train",
        eval_fraction: float = 0.02,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        shuffle: bool = True,
        epochs: Optional[int] = 1,
    ):
        super().__init__()
        if rank is None or world_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        self.path = os.fspath(path)
        self.kw = dict(batch_size=batch_size, split=split, eval_fraction=eval_fraction, seed=seed, shuffle=shuffle, epochs=epochs)
        self.rank, self.world_size = int(rank), int(world_size)
        # Check every argument now, in the main process, not in a worker.
        self._stream(0, 1)
        self._state: Optional[Dict[str, Any]] = None

    def _stream(self, worker: int, workers: int) -> Stream:
        return Stream(self.path, rank=self.rank * workers + worker, world_size=self.world_size * workers, **self.kw)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resumes (with ``num_workers=0``) from a batch's ``state``: ``Stream.state_dict``."""
        self._state = state

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = self._stream(worker, workers)
        if self._state is not None:
            if workers != 1:
                raise ValueError("resuming a CacheDataset needs num_workers=0 (one stream per rank)")
            stream.load_state_dict(self._state)
        for b in stream:
            t = to_torch(b)
            t["state"] = stream.state_dict()
            yield t
