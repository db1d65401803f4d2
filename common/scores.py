"""Reference returns and normalised scores.

normalised score = 100 * (R - ref_min) / (ref_max - ref_min)

D4RL's reference returns come from `d4rl/infos.py` (REF_MIN_SCORE / REF_MAX_SCORE; the same
pair for every split and version of a task): ref_min is a random policy's average return and
ref_max an expert's. Minari datasets and the datasets this project generates (`ours/...`) store
their own pair in the file; `common.data.load` puts it on the `EnvSpec`.
"""

from __future__ import annotations

import numpy as np

# task prefix -> (REF_MIN_SCORE, REF_MAX_SCORE), from d4rl/infos.py.
D4RL_REFERENCE = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
    "kitchen": (0.0, 4.0),
}


def d4rl_reference(name: str) -> tuple[float, float]:
    """(ref_min, ref_max) of a D4RL dataset name such as 'hopper-medium-v2'."""
    task = name.split("-")[0]
    if task not in D4RL_REFERENCE:
        raise KeyError(f"no D4RL reference scores for {name!r}; known tasks: {sorted(D4RL_REFERENCE)}")
    return D4RL_REFERENCE[task]


def normalized(returns: np.ndarray, ref_min: float | None, ref_max: float | None, name: str = "") -> np.ndarray:
    """100 * (R - ref_min) / (ref_max - ref_min), elementwise."""
    if ref_min is None or ref_max is None:
        raise ValueError(
            f"dataset {name!r} has no reference scores, so returns cannot be normalised. "
            "D4RL names and Minari datasets created with ref_min_score/ref_max_score carry them; "
            "for a local HDF5 file add scalar datasets 'metadata/ref_min_score' and "
            "'metadata/ref_max_score' (random-policy and expert mean returns)."
        )
    if ref_max == ref_min:
        raise ValueError(f"dataset {name!r}: ref_max_score equals ref_min_score ({ref_min}); cannot normalise")
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)
