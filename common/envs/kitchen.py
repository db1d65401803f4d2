"""kitchen: D4RL evaluation env on gymnasium-robotics (being written)."""

DATASETS: list[str] = []


def make(name: str, **kwargs):
    raise NotImplementedError(name)
