"""Random-number state of a training process: the per-micro-batch noise seed, and the
process-wide generators saved in (and restored from) each rank's checkpoint state.

The loop itself draws only from generators seeded by `micro_batch_seed`, so a step's noise
depends on (seed, step, micro batch, rank) alone and a resume reproduces it on any world size;
the process-wide states are kept as plain data (JSON + base64, no pickles) for user hooks and
libraries that draw from them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random

import numpy as np
import torch


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rng_state() -> dict:
    """Process-wide RNG states as plain data (nothing in the loop draws from them, but
    user hooks and libraries may; they are restored so a resume is complete)."""
    state = {
        "python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
        "numpy": base64.b64encode(json.dumps(_np_state()).encode()).decode(),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def _np_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]


def set_rng_state(state: dict) -> None:
    py = json.loads(base64.b64decode(state["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = json.loads(base64.b64decode(state["numpy"]))
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch_state = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(torch_state))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [
            torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
            for s in state["cuda"]
        ]
        torch.cuda.set_rng_state_all(cuda)
