"""Published D4RL normalised scores (x100) of MISA's Table 1, for the columns this project implements.

Source: MISA's Table 1 as reprinted in Table 1 of "Exclusively Penalized Q-learning for Offline RL"
(EPQ, NeurIPS 2024), whose nine gym-locomotion MISA values sum to the 742.9 of MISA's abstract;
its TD3+BC and CQL columns equal the IQL paper's. For Adroit and AntMaze, "CQL" is EPQ's
"CQL (reprod.)" column, the one most likely printed by MISA (see the project's research notes).
The paper used Adroit and AntMaze **v0** files; a v1/v2 run is a different dataset and gets no
paper number beside it. MISA's Kitchen scores and its Table 2 could not be recovered.
"""

PAPER_SOURCE = "MISA (Ma et al., NeurIPS 2023) Table 1, as reprinted in EPQ (NeurIPS 2024) Table 1"

_COLUMNS = ("td3_bc", "cql", "misa")
_ROWS = {
    "halfcheetah-medium-v2": (48.3, 44.0, 47.4),
    "hopper-medium-v2": (59.3, 58.5, 67.1),
    "walker2d-medium-v2": (83.7, 72.5, 84.1),
    "halfcheetah-medium-replay-v2": (44.6, 45.5, 45.6),
    "hopper-medium-replay-v2": (60.9, 95.0, 98.6),
    "walker2d-medium-replay-v2": (81.8, 77.2, 86.2),
    "halfcheetah-medium-expert-v2": (90.7, 91.6, 94.7),
    "hopper-medium-expert-v2": (98.0, 105.4, 109.8),
    "walker2d-medium-expert-v2": (110.1, 108.8, 109.4),
    "pen-human-v0": (64.8, 37.5, 88.1),
    "door-human-v0": (0.0, 9.9, 5.2),
    "hammer-human-v0": (1.8, 4.4, 8.1),
    "relocate-human-v0": (0.1, 0.2, 0.1),
    "pen-cloned-v0": (49.0, 39.2, 58.6),
    "door-cloned-v0": (0.0, 0.4, 0.5),
    "hammer-cloned-v0": (0.2, 2.1, 2.2),
    "relocate-cloned-v0": (-0.2, -0.1, -0.1),
    "antmaze-umaze-v0": (78.6, 80.4, 92.3),
    "antmaze-umaze-diverse-v0": (71.4, 56.3, 89.1),
    "antmaze-medium-play-v0": (10.6, 67.5, 63.0),
    "antmaze-medium-diverse-v0": (3.0, 62.5, 62.8),
    "antmaze-large-play-v0": (0.2, 35.0, 17.5),
    "antmaze-large-diverse-v0": (0.0, 13.3, 23.4),
}
PAPER_TABLE1: dict[str, dict[str, float]] = {d: dict(zip(_COLUMNS, v)) for d, v in _ROWS.items()}


def paper_score(dataset: str, algo: str) -> float | None:
    """The published score of `algo` on `dataset`, or None when the paper has none for it."""
    return PAPER_TABLE1.get(dataset, {}).get(algo)
