"""The ``hpcai`` alias, the runner (``python -m hpcai_async.compat``) and ``hpcai_async.cookbook``'s loader.

These need no official SDK: a stand-in ``hpcai`` package on the path plays the installed official one (its
``__init__`` refuses to be imported, so a test fails if anything reaches the official client instead of ours).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hpcai_async.server import LocalServer

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
import hpcai
from hpcai import types
from hpcai.types import Datum
from hpcai.types.tensor_data import TensorData
from hpcai.lib.public_interfaces import APIFuture
import hpcai.types as types2
import hpcai_async

assert hpcai is hpcai_async and types is hpcai_async.types and types2 is types
assert Datum is hpcai_async.types.Datum and TensorData is hpcai_async.types.TensorData
assert APIFuture is hpcai_async.APIFuture
service = hpcai.ServiceClient()
tc = service.create_lora_training_client(base_model="null/instant", rank=4)
datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
fb = tc.forward_backward([datum], loss_fn="cross_entropy").result()
print("ran", __name__, sys.argv[1:], type(service).__module__, sorted(fb.metrics))
"""


def _env(server: LocalServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCAI_")}
    env.update(HPCAI_BASE_URL=server.url, HPCAI_API_KEY=server.api_key, **extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _fake_official(root: Path) -> Path:
    """An installed-looking official package: its client refuses to load; its cookbook imports ``hpcai``."""
    pkg = root / "site" / "hpcai"
    (pkg / "cookbook" / "rl").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the official client was imported')\n")
    (pkg / "cookbook" / "__init__.py").write_text("OFFICIAL_INIT_RAN = True\n")
    (pkg / "cookbook" / "rl" / "__init__.py").write_text("")
    (pkg / "cookbook" / "rl" / "train.py").write_text(
        textwrap.dedent("""
        import hpcai
        from hpcai import types
        from hpcai.cookbook import helpers
        CLIENT = hpcai.ServiceClient
        TYPES = types
        HELPERS = helpers
        """)
    )
    (pkg / "cookbook" / "helpers.py").write_text("import hpcai.types\nVALUE = 42\n")
    return root / "site"


def test_the_runner_runs_an_unchanged_script_on_our_client(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    (tmp_path / "train.py").write_text(SCRIPT)
    proc = _run(["-m", "hpcai_async.compat", "train.py", "--lr", "1e-4"], _env(server), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran __main__ ['--lr', '1e-4'] hpcai_async.service ['loss:mean'" in proc.stdout
    # the same script without the runner needs the official package, which this interpreter does not have
    plain = _run(["train.py"], _env(server), tmp_path)
    assert plain.returncode != 0 and "No module named 'hpcai'" in plain.stderr


def test_the_runner_prefers_our_client_over_an_installed_official_one(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    site = _fake_official(tmp_path)
    (tmp_path / "train.py").write_text(SCRIPT)
    proc = _run(["-m", "hpcai_async.compat", "train.py"], _env(server, PYTHONPATH=str(site)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran __main__" in proc.stdout


def test_the_runner_runs_a_module_and_reports_its_usage(tmp_path: Path) -> None:
    site = _fake_official(tmp_path)
    (site / "hpcai" / "cookbook" / "rl" / "main.py").write_text(
        "import sys, hpcai\nprint('module', __name__, hpcai.__name__, sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = _run(["-m", "hpcai_async.compat", "-m", "hpcai.cookbook.rl.main", "x=1"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "module __main__ hpcai_async ['x=1']"
    usage = _run(["-m", "hpcai_async.compat"], env, tmp_path)
    assert usage.returncode != 0 and "usage: python -m hpcai_async.compat" in usage.stderr


def test_the_cookbook_is_the_official_files_on_our_client(tmp_path: Path) -> None:
    site = _fake_official(tmp_path)
    code = """
import hpcai_async
from hpcai_async.cookbook.rl import train
import hpcai.cookbook.rl.train as via_alias
import hpcai_async.cookbook as cookbook
assert train.CLIENT is hpcai_async.ServiceClient and train.TYPES is hpcai_async.types
assert via_alias is train and train.HELPERS.VALUE == 42 and cookbook.OFFICIAL_INIT_RAN
print(train.__file__)
"""
    proc = _run(["-c", code], {**os.environ, "PYTHONPATH": str(site)}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(site / "hpcai" / "cookbook" / "rl" / "train.py")


def test_without_the_official_package_the_cookbook_says_to_install_it(tmp_path: Path) -> None:
    proc = _run(["-c", "import hpcai_async.cookbook"], dict(os.environ), tmp_path)
    assert proc.returncode != 0
    assert "ImportError: hpcai_async.cookbook runs the official SDK's recipe library" in proc.stderr
    assert "pip install hpcai==0.2.0" in proc.stderr


def test_install_in_a_notebook_replaces_an_official_hpcai_imported_before(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "hpcai").mkdir(parents=True)
    (site / "hpcai" / "__init__.py").write_text("OFFICIAL = True\n")
    code = """
import hpcai
assert hpcai.OFFICIAL
import hpcai_async.compat
hpcai_async.compat.install()
hpcai_async.compat.install()  # twice is once
import sys, hpcai, hpcai_async
assert hpcai is hpcai_async
assert sum(type(f).__name__ == "AliasFinder" for f in sys.meta_path) == 1
try:
    import hpcai.no_such_module
except ModuleNotFoundError as exc:
    print(exc.name)
"""
    proc = _run(["-c", code], {**os.environ, "PYTHONPATH": str(site)}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "hpcai.no_such_module"
