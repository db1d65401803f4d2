"""The copy contract: README's example, run as written there, trains each offline algorithm file
copied on its own into another project, with jax, equinox, optax and blackjax alone, even where
`common` is someone else's package (here: made unimportable). Only `main` (the runner) needs this
repository's `common/`."""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ["td3_bc", "cql", "misa", "misa_dv", "misa_f"]

CHECK = textwrap.dedent("""
    import re, sys
    sys.path.insert(0, ".")  # the copied files (python -I adds no script folder)
    sys.modules["common"] = None  # any `import common...` now fails, as in a project without ours
    sys.modules["algorithms"] = None
    import jax, numpy as np
    example = open("example.py").read()
    for name in sys.argv[1:]:
        scope = {}
        exec(re.sub(r"\\bmisa\\b", name, example), scope)  # README's lines, with this file's name
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(scope["metrics"])), name
        print(name, "trained")
""")


def readme_example() -> str:
    """The python block of README's copy-contract paragraph."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("**The copy contract.**")) + len("```python\n")
    return text[start:text.index("```", start)]


def test_readme_example_trains_each_file_copied_alone(tmp_path):
    example = readme_example()
    assert re.search(r"\bmisa\.make_train\(args, obs_dim, act_dim\)", example) and "misa.Args()" in example
    for name in OFFLINE:
        shutil.copy(ROOT / "algorithms" / f"{name}.py", tmp_path / f"{name}.py")
    (tmp_path / "example.py").write_text(example)
    (tmp_path / "check.py").write_text(CHECK)
    out = subprocess.run([sys.executable, "-I", "check.py", *OFFLINE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800)  # five compiles: minutes on a busy 2-core machine
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line.split()[0] for line in out.stdout.splitlines() if line.endswith(" trained")] == OFFLINE
