"""Opening a checkpoint: a path in, a config + lazy weights out, whichever format it is."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rlx.digests import digest_edges
from rlx.errors import RlxError
from rlx.frontends.config import GemmaConfig
from rlx.frontends.gguf_config import gguf_config
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.hf_config import read_hf_config
from rlx.frontends.weights import WeightStore

_ACCEPTED = "an HF model directory (config.json + *.safetensors) or a .gguf file"
# bytes hashed from each end of a weight file: headers (tensor table, offsets, dtypes) and a sample of data
_HEAD_BYTES = 1 << 20
_TAIL_BYTES = 1 << 16


@dataclass(frozen=True)
class Checkpoint:
    """One model on disk: where it is, what it is, and its (unread) weights."""

    path: Path
    config: GemmaConfig
    weights: WeightStore
    kind: str  # "hf" | "gguf"

    @property
    def directory(self) -> Path:
        """The directory holding the checkpoint's side files (tokenizer.json, generation_config.json)."""
        return self.path if self.path.is_dir() else self.path.parent

    def model_hash(self) -> str:
        """sha256 of the parsed config plus, per weight file, its name, size, first 1 MiB and last 64 KiB.

        Cheap (no full read) and content-based (stable across copies, unlike mtimes): the first MiB
        holds the whole safetensors/GGUF header, so any change of tensor names, shapes, dtypes or
        offsets changes the hash. An in-place edit of tensor data that keeps the size and avoids
        both sampled ends goes unnoticed.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for file in self.weights.files:
            digest.update(f"\0{file.name}\0{file.stat().st_size}\0".encode())
            digest_edges(digest, file, _HEAD_BYTES, _TAIL_BYTES)
        return digest.hexdigest()


def _open_hf(directory: Path, weights: Path) -> Checkpoint:
    config = read_hf_config(directory / "config.json")
    return Checkpoint(weights, config, WeightStore.open(weights, config), "hf")


def _open_gguf(path: Path) -> Checkpoint:
    gf = GGUFFile.open(path)  # parsed once, shared by config, weights and tokenizer
    config = gguf_config(gf, source=str(path))
    return Checkpoint(path, config, WeightStore.from_gguf(gf, config), "gguf")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open `path`: an HF directory, its config.json or a .safetensors in it, a .gguf, or a dir with one .gguf."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RlxError(f"checkpoint not found: {path}", hint=f"pass {_ACCEPTED}")
    if path.is_file():
        if path.suffix == ".gguf":
            return _open_gguf(path)
        if path.name == "config.json":
            return _open_hf(path.parent, path.parent)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise RlxError(f"{path} has no config.json next to it", hint="pass the model directory")
            return _open_hf(path.parent, path)
        raise RlxError(f"{path} is not a checkpoint file", hint=f"pass {_ACCEPTED}")
    if (path / "config.json").is_file():
        return _open_hf(path, path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _open_gguf(ggufs[0])
    found = f"it holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)})" if ggufs else \
        "it has no config.json and no .gguf file"
    raise RlxError(f"{path} is not a checkpoint directory: {found}", hint=f"pass {_ACCEPTED}")


__all__ = ["Checkpoint", "open_checkpoint"]
