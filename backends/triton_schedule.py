"""Kernel scheduling for the Triton backend: tile sizes, warps and stages per site, chosen by
timing candidates on the GPU and kept on disk, and the split count of the decode path.

A configuration is keyed on what changes the best choice (kernel, pattern, dtype, head dims,
a power-of-two bucket of the lengths, the GPU's name), so one measurement serves every call
in the bucket and a second run starts warm from the cache file. Under Triton's interpreter
timings mean nothing: the default configuration is used and nothing is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from backends.capabilities import interpreting

CACHE_ENV = "ATTNFORGE_CACHE_DIR"
MAX_SPLITS = 64


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    blocks_inner: bool = False  # launch a head's query blocks next to each other instead of its heads

    def text(self) -> str:
        order = "blocks" if self.blocks_inner else "heads"
        return (f"block_m={self.block_m} block_n={self.block_n} warps={self.num_warps} stages={self.num_stages} "
                f"inner={order}")


def dense_candidates(head_dim: int) -> list[KernelConfig]:
    """Tiles that fit shared memory for the head dim (the padded power of two)."""
    if head_dim > 128:
        tiles = [KernelConfig(64, 32, 4, 2), KernelConfig(64, 64, 8, 2), KernelConfig(32, 64, 4, 2)]
    else:
        tiles = [KernelConfig(64, 64, 4, 2), KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 4, 3),
                 KernelConfig(64, 32, 4, 3), KernelConfig(128, 128, 8, 2)]
    return tiles + [replace(c, blocks_inner=True) for c in tiles[:2]]


def sparse_candidates(block: int) -> list[KernelConfig]:
    """A sparse layout fixes the tiles to its block; only warps and stages are free."""
    return [KernelConfig(block, block, w, s, inner) for w, s in ((4, 2), (8, 2), (8, 3)) for inner in (False, True)]


def bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "interpreter" if interpreting() else device.type


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count: the interpreter then exercises the same split choices


def decode_splits(programs: int, key_tiles: int, sms: int) -> int:
    """Splits of the key range so that a launch of ``programs`` query tiles fills the GPU.

    Each split must still walk a few tiles, or merging costs more than it saves.
    """
    if programs >= sms or key_tiles < 8:
        return 1
    wanted = -(-2 * sms // programs)  # two waves of programs
    return max(1, min(wanted, key_tiles // 4, MAX_SPLITS))


@dataclass
class Choice:
    config: KernelConfig
    source: str  # "cache", "tuned", "default"
    key: str


class ConfigCache:
    """Chosen configurations, in memory and in a JSON file (written atomically)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path or Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "attnforge")) / "triton_configs.json"
        self._table: Optional[dict] = None

    def _load(self) -> dict:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}  # no cache yet, or a damaged one: tune again
        return self._table

    def get(self, key: str) -> Optional[KernelConfig]:
        entry = self._load().get(key)
        try:
            return KernelConfig(**entry) if entry else None
        except TypeError:
            return None  # written by another version

    def put(self, key: str, config: KernelConfig) -> None:
        table = self._load()
        table[key] = asdict(config)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


class Scheduler:
    """Chooses a configuration per key; ``timer(run) -> ms`` measures a candidate."""

    def __init__(self, cache: Optional[ConfigCache] = None, timer: Optional[Callable] = None, tune: Optional[bool] = None):
        self.cache = cache or ConfigCache()
        self.timer = timer or _do_bench
        # ATTNFORGE_TUNE=0: take the first candidate without timing (quick test runs on a GPU).
        self.tune = (not interpreting() and os.environ.get("ATTNFORGE_TUNE") != "0") if tune is None else tune
        self.chosen: dict[str, Choice] = {}

    def choose(self, key: str, candidates: Sequence[KernelConfig], run: Callable[[KernelConfig], object]) -> Choice:
        if key in self.chosen:
            return self.chosen[key]
        cached = self.cache.get(key)
        if cached is not None:
            choice = Choice(cached, "cache", key)
        elif not self.tune:
            choice = Choice(candidates[0], "default", key)
        else:
            timings = {}
            for c in candidates:
                try:
                    timings[c] = self.timer(lambda c=c: run(c))
                except Exception:  # noqa: BLE001 - a tile that does not fit this GPU is skipped
                    continue
            if not timings:
                raise RuntimeError(f"no kernel configuration ran for {key}")
            best = min(timings, key=timings.get)
            self.cache.put(key, best)
            choice = Choice(best, "tuned", key)
        self.chosen[key] = choice
        return choice


def _do_bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


def make_key(kernel: str, pattern: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: str = "") -> str:
    b, hq, sq, d = q.shape
    return "|".join([kernel, pattern or "-", str(q.dtype).removeprefix("torch."), f"d{d}v{v.shape[-1]}",
                     f"g{hq // k.shape[1]}", f"sq{bucket(sq)}", f"sk{bucket(k.shape[2])}", extra,
                     device_name(q.device)])


SCHEDULER = Scheduler()
