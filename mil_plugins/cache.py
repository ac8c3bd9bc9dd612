"""Feature cache for frozen encoders: encode each file once, reuse the features in every epoch.

A cache entry is keyed by what determines the features:

* the **content** of the input file (sha256 of its bytes; a folder input -- video frames -- hashes
  its files' names and contents in order), not its path or modification time;
* the plugin's :meth:`~mil_plugins.modality.ModalityPlugin.fingerprint` (name + all options:
  preprocessing and encoder configuration);
* the encoder's weights, :func:`encoder_fingerprint` (hash of the state dict), passed in by the
  caller so that it is computed once per encoder, not once per file.

Entries are safetensors files ``<root>/<key[:2]>/<key>.safetensors`` holding one tensor
``"features"`` ``[T, D]``, written atomically (temporary file in the same folder, then
``os.replace``), so concurrent writers (data-loader workers, ranks) never leave a half-written
entry.
An unreadable entry is treated as a miss and rewritten.

Only use the cache for frozen encoders (``plugin.options["trainable"]`` false): features of a
trained encoder change every step, and the weights fingerprint would differ every time anyway.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mil_plugins.modality import ModalityPlugin

_CHUNK = 1 << 20


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 (hex) of an encoder's class name and state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(type(encoder).__qualname__.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of a file's bytes; for a folder, of its files' relative names and bytes, sorted."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(b"\0" + str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    """A directory of cached encoder features, addressed by :meth:`key`."""

    def __init__(self, root: str | Path, memoize_hashes: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # content hashes of files seen in this process, keyed by (path, size, mtime): hashing a
        # large video once per epoch is avoidable (``memoize_hashes=False``: hash every time)
        self.memoize_hashes = memoize_hashes
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.hits = 0
        self.misses = 0

    def _content_hash(self, path: str | Path) -> str:
        p = Path(path)
        st = p.stat()
        if p.is_dir() or not self.memoize_hashes:
            return content_hash(p)
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._hashes:
            self._hashes[memo] = content_hash(p)
        return self._hashes[memo]

    def key(self, plugin: ModalityPlugin, path: str | Path, encoder_fingerprint: str = "") -> str:
        """sha256 of (file content hash, plugin fingerprint, encoder weights fingerprint)."""
        parts = (self._content_hash(path), plugin.fingerprint(), encoder_fingerprint)
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self._file(key).is_file()

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor, or ``None`` (missing or unreadable entry)."""
        from safetensors.torch import load_file

        f = self._file(key)
        if not f.is_file():
            self.misses += 1
            return None
        try:
            tensor = load_file(str(f))["features"]
        except Exception:  # corrupt / foreign file: a miss, overwritten by the next put
            self.misses += 1
            return None
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> Path:
        """Store ``tensor`` under ``key`` atomically (tmp file + ``os.replace``)."""
        from safetensors.torch import save_file

        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=f.parent)
        os.close(fd)
        try:
            save_file({"features": tensor.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, f)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return f

    def clear(self) -> None:
        for f in self.root.glob("*/*.safetensors"):
            f.unlink(missing_ok=True)


def _key_or_input_error(cache: FeatureCache, plugin: ModalityPlugin, path: str | Path,
                        encoder_fingerprint: str) -> str:
    try:
        return cache.key(plugin, path, encoder_fingerprint)
    except OSError:
        plugin.preprocess(path)  # raises the plugin's ModalityInputError (missing, unreadable...)
        raise


def _encoder_input(x: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """``x`` on the encoder's device, floating inputs in its dtype (a CUDA or bf16 encoder, e.g.
    after DeepSpeed cast the model, gets what it can take; the preprocessors make CPU float32)."""
    p = next(encoder.parameters(), None)
    if p is None:
        return x
    return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)


def cached_encode(cache: FeatureCache, plugin: ModalityPlugin, encoder: nn.Module,
                  path: str | Path, encoder_fingerprint: str) -> torch.Tensor:
    """Features ``[T, D]`` of one file: from the cache, or preprocess + encode + store."""
    key = _key_or_input_error(cache, plugin, path, encoder_fingerprint)
    hit = cache.get(key)
    if hit is not None:
        return hit
    x = _encoder_input(plugin.preprocess(path), encoder)
    with torch.no_grad():
        features = encoder(x.unsqueeze(0))[0].detach().cpu()
    cache.put(key, features)
    return features


def cached_encode_batch(cache: FeatureCache, plugin: ModalityPlugin, encoder: nn.Module,
                        paths: Sequence[str | Path], encoder_fingerprint: str,
                        batch_size: int = 16) -> list[torch.Tensor]:
    """:func:`cached_encode` for many files, encoding the misses in batches of ``batch_size``."""
    keys = [_key_or_input_error(cache, plugin, p, encoder_fingerprint) for p in paths]
    out: list[torch.Tensor | None] = [cache.get(k) for k in keys]
    todo = [i for i, t in enumerate(out) if t is None]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        batch = _encoder_input(plugin.collate([plugin.preprocess(paths[i]) for i in chunk]), encoder)
        with torch.no_grad():
            features = encoder(batch)
        for i, f in zip(chunk, features):
            f = f.detach().cpu().contiguous()
            cache.put(keys[i], f)
            out[i] = f
    return out  # type: ignore[return-value]
