"""Thread-safe LRU cache of prompt vectors, keyed on (export model hash, text)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class PromptCache:
    """LRU of ``(model_hash, text) -> vector``. Keys carry the export's model hash, so a cache shared
    across engine reloads can never hand out a vector computed by another model; each Engine also
    owns its own instance by default. ``capacity=0`` disables caching."""

    def __init__(self, capacity: int = 4096):
        if capacity < 0:
            raise ValueError(f"prompt cache size must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_many(self, model_hash: str, texts: list[str]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        get, touch, app = self._data.get, self._data.move_to_end, out.append
        hits = 0
        with self._lock:
            for t in texts:
                key = (model_hash, t)
                v = get(key)
                if v is not None:
                    hits += 1
                    touch(key)
                app(v)
            self.hits += hits
            self.misses += len(texts) - hits
        return out

    def put_many(self, model_hash: str, texts: list[str], vectors: np.ndarray) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            for t, v in zip(texts, vectors):
                v = np.array(v, dtype=np.float32, copy=True)
                v.setflags(write=False)
                self._data[(model_hash, t)] = v
                self._data.move_to_end((model_hash, t))
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.misses
            return {"hits": self.hits, "misses": self.misses, "size": len(self._data), "capacity": self.capacity,
                    "hit_rate": (self.hits / total) if total else 0.0}
