"""Finding and loading SD3's frozen components from local directories, never from a hub.

A component directory is laid out like the diffusers SD3 repository
(stabilityai/stable-diffusion-3-medium-diffusers): `text_encoder/` (CLIP-L), `text_encoder_2/`
(OpenCLIP bigG), `text_encoder_3/` (T5-XXL), `tokenizer*/`, `vae/`. Any single component can be
taken from another directory instead. Every failure names the component, the path looked at and
how to provide it; every loaded component has an identity (path + config hash) that is recorded
wherever its outputs are stored, so stale caches are detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# subfolder -> what it is, for messages
ROLES: dict[str, str] = {
    "text_encoder": "CLIP-L text encoder",
    "text_encoder_2": "OpenCLIP bigG text encoder",
    "text_encoder_3": "T5-XXL text encoder",
    "tokenizer": "CLIP-L tokenizer",
    "tokenizer_2": "OpenCLIP bigG tokenizer",
    "tokenizer_3": "T5 tokenizer",
    "vae": "SD3 16-channel VAE",
}

_HOW_TO_PROVIDE = (
    "copy the SD3 diffusers repository (e.g. stabilityai/stable-diffusion-3-medium-diffusers, "
    "fetched once on a machine with internet) to local disk and pass its root as the "
    "components directory, or point this component at its own folder; for tests and demos, "
    "`mmdit-make-tiny-components --out DIR` writes a random tiny set"
)


class ComponentError(RuntimeError):
    """A frozen component is missing, of the wrong kind, or unreadable."""


class StaleEmbeddingsError(RuntimeError):
    """Stored embeddings/latents were made by other encoders than the ones loaded now."""


@dataclass(frozen=True)
class ComponentIdentity:
    name: str  # diffusers subfolder name, e.g. "text_encoder_3"
    path: str  # resolved directory
    config_sha256: str  # hash of the files that define the component's behaviour

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "config_sha256": self.config_sha256}


def resolve(name: str, root: str | os.PathLike | None, overrides: Mapping[str, Any]) -> Path:
    """The directory for component `name`: an explicit override, else root/name."""
    if name not in ROLES:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(ROLES)}")
    if overrides.get(name):
        path = Path(overrides[name]).expanduser()
    elif root is not None:
        path = Path(root).expanduser() / name
    else:
        raise ComponentError(
            f"{ROLES[name]} ('{name}'): no components directory and no path for it; "
            f"{_HOW_TO_PROVIDE}"
        )
    if not path.is_dir():
        raise ComponentError(
            f"{ROLES[name]} ('{name}') not found: looked at {path.resolve()}; {_HOW_TO_PROVIDE}"
        )
    return path


def _defining_files(path: Path) -> list[Path]:
    # Configs and tokenizer vocabularies define behaviour; weight files are identified by name
    # and size (hashing GBs of T5 weights at every start would cost minutes).
    return sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix in {".json", ".txt", ".model"} and not p.name.startswith(".")
    )


def identity(name: str, path: Path) -> ComponentIdentity:
    digest = hashlib.sha256()
    for file in _defining_files(path):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{file.name}:{file.stat().st_size}\0".encode())
    return ComponentIdentity(name, str(path.resolve()), digest.hexdigest())


def identity_hash(identities: Mapping[str, Any]) -> str:
    """One hash for a set of identities and settings (canonical JSON)."""
    return hashlib.sha256(json.dumps(identities, sort_keys=True).encode()).hexdigest()


def identity_differences(
    recorded: Any, current: Any, prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, current value) for every leaf where two identities differ."""
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(recorded) | set(current), key=str):
            out += identity_differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if recorded == current else [(prefix.rstrip("."), recorded, current)]


def check_identity(recorded: Mapping[str, Any], current: Mapping[str, Any], what: str) -> None:
    """Raise StaleEmbeddingsError naming every entry that differs between two identities."""
    differing = identity_differences(recorded, current)
    if differing:
        details = "; ".join(f"{k}: recorded {a!r}, loaded {b!r}" for k, a, b in differing)
        raise StaleEmbeddingsError(
            f"{what} was made with other encoders or settings ({details}); "
            "recompute it with mmdit-precompute or load the encoders it was made with"
        )


def load_pretrained(name: str, path: Path, loader, **kwargs):
    """Call a `from_pretrained` offline; any failure becomes one ComponentError line."""
    if not (path / "config.json").is_file() and not name.startswith("tokenizer"):
        raise ComponentError(
            f"{ROLES[name]} ('{name}') at {path.resolve()} has no config.json; "
            f"it is not a diffusers/transformers model folder. {_HOW_TO_PROVIDE}"
        )
    try:
        return loader(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # every loader error is reported the same way
        weights = sorted(p.name for p in path.glob("*.safetensors")) or ["no *.safetensors"]
        reason = " ".join(str(e).split())[:300]
        raise ComponentError(
            f"{ROLES[name]} ('{name}') at {path.resolve()} could not be loaded "
            f"({type(e).__name__}: {reason}); files: {', '.join(weights)}. If a weights file "
            "is truncated or corrupt, copy it again from the source repository"
        ) from e


def conditioning_identity(
    root: str | os.PathLike | None,
    paths: Mapping[str, Any],
    *,
    use_t5: bool,
    t5_max_length: int,
) -> dict[str, Any]:
    """What a precompute cache depends on, from the files alone (no weights loaded): every
    component's identity plus the settings. Precompute records it; the loader compares."""
    names = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"]
    if use_t5:
        names += ["tokenizer_3", "text_encoder_3"]
    return {
        "components": {n: identity(n, resolve(n, root, paths)).as_dict() for n in sorted(names)},
        "t5": use_t5,
        "t5_max_length": t5_max_length,
    }
