import numpy as np
import pytest

from common import scores


def test_d4rl_normalisation_known_values():
    lo, hi = scores.d4rl_reference("hopper-medium-v2")
    assert (lo, hi) == (-20.272305, 3234.3)
    np.testing.assert_allclose(scores.normalized([lo, hi, (lo + hi) / 2], lo, hi), [0.0, 100.0, 50.0])
    lo, hi = scores.d4rl_reference("walker2d-medium-replay-v2")
    np.testing.assert_allclose(scores.normalized(np.array([2297.0]), lo, hi), 100 * (2297.0 - 1.629008) / (4592.3 - 1.629008))
    assert scores.d4rl_reference("antmaze-umaze-v0") == (0.0, 1.0)
    assert scores.d4rl_reference("kitchen-mixed-v0") == (0.0, 4.0)


def test_missing_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="no reference scores"):
        scores.normalized([1.0], None, None, "my-data")
    with pytest.raises(KeyError, match="no D4RL reference"):
        scores.d4rl_reference("maze2d-umaze-v1")
