import numpy as np
import pytest

from common import evaluation
from common.data import EnvSpec
from common.errors import UserError

PENDULUM = EnvSpec(name="pendulum-test", source="file", obs_dim=3, act_dim=1, max_episode_steps=20, eval_env_id="Pendulum-v1")


def test_shapes_lengths_and_one_policy_call_per_step():
    calls = []

    def policy(obs):
        calls.append(obs.shape)
        return np.zeros(obs.shape[:2] + (1,), np.float32)

    ev = evaluation.Evaluator(PENDULUM, seeds=[0, 1, 2], episodes=4)
    returns, lengths = ev.run(policy)
    assert returns.shape == (3, 4) and (lengths == 20).all()
    assert len(calls) == 20 and calls[0] == (3, 4, 3)  # one batched call per env step
    assert (returns < 0).all()


def test_episodes_depend_only_on_the_agent_seed():
    """seed 5 sees the same start states in a 2-seed evaluation as on its own."""
    policy = lambda obs: np.tanh(obs[..., :1]).astype(np.float32)  # deterministic, state dependent
    both, _ = evaluation.Evaluator(PENDULUM, seeds=[3, 5], episodes=3).run(policy)
    alone, _ = evaluation.Evaluator(PENDULUM, seeds=[5], episodes=3).run(policy)
    np.testing.assert_allclose(both[1], alone[0])
    assert not np.allclose(both[0], both[1])
    assert len(set(np.round(alone[0], 6))) == 3  # episodes differ from each other


def test_actions_are_rescaled_to_the_env_bounds():
    # Pendulum's torque is in [-2, 2]; a policy action of +1 must apply +2.
    env = evaluation.make_env(PENDULUM)
    env.reset(seed=0)
    env.step(np.array([1.0], np.float32))
    assert env.unwrapped.last_u == pytest.approx(2.0)


def test_unsupported_env_fails_clearly():
    spec = EnvSpec(name="mystery.hdf5", source="file", obs_dim=3, act_dim=1, max_episode_steps=10,
                   eval_unsupported="mystery.hdf5 does not say which environment it came from")
    with pytest.raises(UserError, match="mystery.hdf5.*does not say"):
        evaluation.Evaluator(spec, seeds=[0], episodes=1)


def test_ant_observations_are_padded_to_d4rl_layout():
    from common import data

    spec = EnvSpec(name="ant-medium-v2", source="d4rl", obs_dim=111, act_dim=8, **data.d4rl_spec_fields("ant-medium-v2"))
    ev = evaluation.Evaluator(spec, seeds=[0], episodes=1)
    seen = []
    ev.run(lambda obs: (seen.append(obs.copy()), np.zeros((1, 1, 8), np.float32))[1])
    assert seen[0].shape == (1, 1, 111) and np.all(seen[0][..., 27:] == 0) and np.any(seen[0][..., :27] != 0)
