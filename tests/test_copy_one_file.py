"""The copy contract: an algorithm file copied on its own into another project imports and trains
with jax, equinox, optax and blackjax alone, even where `common` is someone else's package (here:
made unimportable). Only `main` (the runner) needs this repository's `common/`."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# misa_dv.py and misa_f.py are misa.py outside their bound (tests/test_misa.py checks it), so misa stands for them
OFFLINE = ["td3_bc", "cql", "misa"]

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, ".")  # the copied files (python -I adds no script folder)
    sys.modules["common"] = None  # any `import common...` now fails, as in a project without ours
    sys.modules["algorithms"] = None
    import importlib
    import jax, jax.numpy as jnp, numpy as np
    for name in sys.argv[1:]:
        algo = importlib.import_module(name)
        small = dict(num_seeds=1, num_updates=4, log_every=2, eval_every=2, hidden_dim=16, batch_size=8)
        fields = algo.Args.__dataclass_fields__
        small.update({k: v for k, v in dict(num_layers=2, num_samples=2, hmc_burnin=1, lagrange=False, lagrange_tau=1.0,
                                             lagrange_gap=1.0, reward_norm=False, reward_scale=1.0, reward_bias=0.0, eval_episodes=1, actor_lr=3e-4,
                                             bc_steps=0, max_target_backup=False, clip_diff_min=-np.inf).items()
                      if k in fields})
        args = algo.Args(**small)
        rng = np.random.default_rng(0)
        n, obs_dim, act_dim = 64, 5, 2
        dataset = algo.Transitions(obs=jnp.asarray(rng.normal(size=(n, obs_dim)), jnp.float32),
                                   action=jnp.asarray(rng.uniform(-1, 1, (n, act_dim)), jnp.float32),
                                   reward=jnp.asarray(rng.normal(size=n), jnp.float32),
                                   next_obs=jnp.asarray(rng.normal(size=(n, obs_dim)), jnp.float32),
                                   done=jnp.zeros(n, jnp.float32))
        init, train = algo.make_train(args, obs_dim, act_dim)
        keys = jax.random.split(jax.random.PRNGKey(0), 2)[None]
        state, key, metrics = train(dataset, init(keys[:, 0]), keys[:, 1], jnp.int32(2))
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics)), name
        print(name, "trained one chunk")
""")


def test_each_algorithm_file_works_when_copied_alone(tmp_path):
    for name in OFFLINE:
        shutil.copy(ROOT / "algorithms" / f"{name}.py", tmp_path / f"{name}.py")
    (tmp_path / "check.py").write_text(SCRIPT)
    out = subprocess.run([sys.executable, "-I", "check.py", *OFFLINE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trained one chunk") == len(OFFLINE)
