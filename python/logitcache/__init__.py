"""Read logitcache teacher caches from Python.

The reading is the Rust crate's own code (``logitcache._native``): the same manifest checks,
the same shard checks and the same training stream, so a :class:`Stream` with the seed,
split and rank of a ``logitcache train`` run yields the batches that run trains on.

- :class:`Cache`: a cache's manifest, ``verify()`` and the tokenizer check.
- :class:`Stream`: padded batches as NumPy arrays, resumable with ``state_dict()``.
- :mod:`logitcache.torch`: ``CacheDataset`` (DataLoader workers x DDP ranks) and ``kd_loss``.

Every problem the reader finds raises :class:`CacheError` (or ``ValueError`` for a bad
argument) with a message naming the problem and the fix.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from . import _native

CacheError = _native.CacheError

__all__ = ["Cache", "CacheError", "Stream", "Batch"]


def _path(path: "os.PathLike[str] | str") -> str:
    return os.fspath(path)


class Cache:
    """A cache directory (``manifest.json`` + ``shards/``), opened and its manifest checked.

    Raises :class:`CacheError` for a missing or edited manifest.
    """

    def __init__(self, path: "os.PathLike[str] | str"):
        self.path = _path(path)
        self.manifest: Dict[str, Any] = json.loads(_native.manifest_json(self.path))

    @property
    def params(self) -> Dict[str, Any]:
        return self.manifest["params"]

    @property
    def mode(self) -> str:
        """``topk``, ``sample`` or ``hybrid``."""
        return self.params.get("mode", "topk")

    @property
    def k(self) -> int:
        """Exact top-k ids per position (0 for a ``sample`` cache)."""
        return int(self.params["top_k"])

    @property
    def samples(self) -> int:
        """Draws per position (0 for a ``topk`` cache)."""
        return int(self.params.get("samples", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.params["seq_len"])

    @property
    def temperature(self) -> float:
        return float(self.params["temperature"])

    @property
    def sequences(self) -> int:
        return int(self.manifest["totals"]["sequences"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["totals"]["tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["totals"]["complete"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def verify(self) -> Dict[str, Any]:
        """Checks every shard (sha256, schema, values); returns the report (``ok``,
        ``problems``, ``warnings``, counts) as ``logitcache verify --json`` prints it."""
        return json.loads(_native.verify_json(self.path))

    def check_tokenizer(self, tokenizer: "os.PathLike[str] | str") -> None:
        """Raises :class:`CacheError` naming both files when ``tokenizer`` is not the one the
        cache was built with (compared by sha256)."""
        _native.check_tokenizer(self.path, _path(tokenizer))

    def __repr__(self) -> str:
        return (
            f"Cache({self.path!r}, mode={self.mode!r}, k={self.k}, samples={self.samples}, "
            f"vocab_size={self.vocab_size}, sequences={self.sequences}, tokens={self.tokens})"
        )


class Batch(dict):
    """A padded batch: NumPy arrays by name (and ``batch``, ``len``, ``k``, ``cursor``).

    - ``input_ids``, ``target_ids`` (uint32) and ``mask``, ``target_mask`` (float32):
      ``[batch, len]``; ``mask`` is 1 at every real position (distillation positions),
      ``target_mask`` where ``target_ids`` is a real next token (cross-entropy positions).
    - ``topk_ids`` (uint32), ``topk_logprobs`` (float32): ``[batch, len, k]``;
      ``tail_logprob`` (float32) ``[batch, len]``, the log of the teacher's mass outside
      the top-k. A ``sample``/``hybrid`` cache arrives as its sparse estimate of the whole
      distribution: ``k`` is the batch's widest position, unused entries have log-prob
      ``-inf`` and ``tail_logprob`` is ``-inf`` (no tail outcome).
    - ``seq_ids`` (uint64) ``[batch]``: the windows (global window numbers).
    """

    @property
    def cursor(self) -> Tuple[int, int, int]:
        return self["cursor"]


_FIELDS = {
    "seq_ids": (np.uint64, 1),
    "input_ids": (np.uint32, 2),
    "target_ids": (np.uint32, 2),
    "target_mask": (np.float32, 2),
    "mask": (np.float32, 2),
    "topk_ids": (np.uint32, 3),
    "topk_logprobs": (np.float32, 3),
    "tail_logprob": (np.float32, 2),
}


def _batch(raw: Dict[str, Any]) -> Batch:
    b, n, k = raw["batch"], raw["len"], raw["k"]
    shapes = {1: (b,), 2: (b, n), 3: (b, n, k)}
    out = Batch(batch=b, len=n, k=k, cursor=tuple(raw["cursor"]))
    for name, (dtype, rank) in _FIELDS.items():
        # A view of the Rust vector (no copy, writable); the array keeps it alive.
        a = np.asarray(raw[name])
        assert a.dtype == dtype, (name, a.dtype)
        out[name] = a.reshape(shapes[rank])
    return out


_SPLITS = ("train", "eval", "all")


class Stream:
    """The training stream of a cache: padded :class:`Batch` es, decoded ahead on a Rust
    thread from the memory-mapped shards.

    The same ``seed``, ``split``, ``eval_fraction``, ``rank``/``world_size`` and
    ``batch_size`` give the same batches as ``logitcache train`` (which streams
    ``split="train"``, ``epochs=None``, ``eval_fraction=--eval-fraction``). Ranks are
    disjoint and together cover the split. ``epochs=None`` streams forever.

    ``state_dict()`` after a batch, given to ``load_state_dict()`` of a new stream with the
    same arguments, continues exactly after that batch.
    """

    def __init__(
        self,
        path: "os.PathLike[str] | str",
        batch_size: int,
        *,
        split: str = "train",
        eval_fraction: float = 0.02,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: Optional[int] = 1,
    ):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, not {split!r}")
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, not {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}: ranks are 0 .. world_size - 1")
        if not (0.0 <= float(eval_fraction) < 1.0):
            raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None (endless) or an integer >= 1, not {epochs!r}")
        self.path = _path(path)
        self.cache = Cache(self.path)
        self._args = dict(
            batch_size=int(batch_size),
            seed=int(seed),
            shuffle=bool(shuffle),
            epochs=epochs,
            rank=int(rank),
            world_size=int(world_size),
            split=split,
            eval_fraction=float(eval_fraction),
        )
        self._cursor: Tuple[int, int, int] = (0, 0, 0)
        self._native: Optional[Any] = None

    def _identity(self) -> Dict[str, Any]:
        a = dict(self._args)
        a["manifest_checksum"] = self.cache.manifest.get("checksum")
        return a

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._native is None:
            a = self._args
            self._native = _native.NativeStream(
                self.path,
                a["batch_size"],
                a["seed"],
                a["shuffle"],
                a["epochs"],
                a["rank"],
                a["world_size"],
                a["split"],
                a["eval_fraction"],
                self._cursor,
            )
        raw = next(self._native, None)
        if raw is None:
            raise StopIteration
        batch = _batch(raw)
        self._cursor = batch.cursor
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """Where the stream stands (after the last batch returned) and what it streams."""
        epoch, group, offset = self._cursor
        return {"cursor": {"epoch": epoch, "group": group, "offset": offset}, "stream": self._identity()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues from ``state`` (from :meth:`state_dict` of a stream with the same
        arguments over the same cache); refuses a state of another stream."""
        mine = self._identity()
        theirs = state.get("stream", {})
        diff = [k for k in mine if k != "epochs" and theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(
                "the state is of a different stream ("
                + ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in diff)
                + "); resume with the arguments and cache it was saved with"
            )
        c = state["cursor"]
        self._cursor = (int(c["epoch"]), int(c["group"]), int(c["offset"]))
        self._native = None
