"""Importing fastpeft is light: no CUDA initialisation, no triton import, and it works when triton is unimportable.

Every check runs in a fresh interpreter (a subprocess), because this test process has long imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the child; prints one JSON line.  A meta-path finder that refuses triton makes it unimportable.
_BLOCK_TRITON = """
import importlib.abc, sys
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by test_import")
        return None
sys.meta_path.insert(0, _NoTriton())
"""

_BODY = """
import json, sys
import torch
import fastpeft
after_import = {"triton": "triton" in sys.modules, "cuda_init": torch.cuda.is_initialized(),
                "transformers": "transformers" in sys.modules, "peft": "peft" in sys.modules}
m = fastpeft.LoRALinear(8, 4, r=2)
ia3 = fastpeft.IA3Linear(8, 4)
ada = fastpeft.AdaLoRALinear(8, 4, r=2)
after_modules = {"triton": "triton" in sys.modules, "cuda_init": torch.cuda.is_initialized()}
x = torch.randn(3, 8)
y = m(x) + ia3(x) + ada(x)
y.sum().backward()
# (the dropout stream's threshold the ops share with the kernels lives in fastpeft._numerics, not in kernels/)
after_forward = {"kernels": any(k.startswith("fastpeft.kernels") for k in sys.modules),
                 "cuda_init": torch.cuda.is_initialized()}
info = fastpeft.backend_info()
after_info = {"triton": "triton" in sys.modules, "cuda_init": torch.cuda.is_initialized()}
print(json.dumps({"after_import": after_import, "after_modules": after_modules, "after_forward": after_forward, "after_info": after_info,
                  "triton_available": info["backends"]["triton"]["available"],
                  "triton_reason": info["backends"]["triton"]["reason"], "torch_ok": info["backends"]["torch"]["available"],
                  "grad_ok": m.lora_A.grad is not None}))
"""


def _run(block_triton: bool) -> dict:
    code = (_BLOCK_TRITON if block_triton else "") + _BODY
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTPEFT_BACKEND", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"child failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_is_lean():
    r = _run(block_triton=False)
    assert r["after_import"] == {"triton": False, "cuda_init": False, "transformers": False, "peft": False}, r
    assert r["after_modules"] == {"triton": False, "cuda_init": False}, r
    # A CPU forward/backward (auto backend -> torch) loads no fastpeft kernels and does not touch CUDA.  (It may
    # import triton indirectly: torch's custom_op machinery imports torch._dynamo on the first call of any custom op,
    # and torch._dynamo probes for the triton package.  That is torch's doing, not fastpeft's.)
    assert r["after_forward"] == {"kernels": False, "cuda_init": False}, r
    # backend_info() probes triton on purpose (to report its version) but must not initialise CUDA
    assert r["after_info"]["cuda_init"] is False, r
    assert r["torch_ok"] and r["grad_ok"]


def test_import_and_use_without_triton():
    r = _run(block_triton=True)
    assert r["after_import"]["cuda_init"] is False and r["after_import"]["triton"] is False
    assert r["after_info"]["triton"] is False, r
    assert r["triton_available"] is False and "triton" in r["triton_reason"], r
    assert r["torch_ok"] and r["grad_ok"]



_NO_INSTALL = """
import json, sys
# What a checkout that was never installed sees: no install's finder for fastpeft (this test environment has an
# editable install, whose finder maps fastpeft.kernels -> kernels/), the repository first on sys.path.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
sys.path.insert(0, REPO)
import fastpeft
from fastpeft.kernels import _mask
from fastpeft.ops.dropout import dropout_threshold
import fastpeft.benchmarks
print(json.dumps({"fastpeft": fastpeft.__file__, "mask": _mask.__file__,
                  "same": dropout_threshold is _mask.dropout_threshold,
                  "benchmarks": fastpeft.benchmarks.__path__[0], "triton": "triton" in sys.modules}))
"""


def test_import_from_a_checkout_that_was_never_installed():
    """setup.py installs kernels/ and benchmarks/ as fastpeft.kernels / fastpeft.benchmarks (package_dir).  From a
    bare checkout (the repository on PYTHONPATH, as benchmarks/gpu_check.sh runs its phases while `pip install -e .`
    still builds the extension) fastpeft must import all the same: its finder maps the two folders."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    code = f"REPO = {REPO!r}\n" + textwrap.dedent(_NO_INSTALL)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(REPO))
    assert proc.returncode == 0, f"child failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["fastpeft"] == os.path.join(REPO, "fastpeft", "__init__.py"), r
    assert r["mask"] == os.path.join(REPO, "kernels", "_mask.py") and r["same"], r
    assert r["benchmarks"] == os.path.join(REPO, "benchmarks") and r["triton"] is False, r


def test_compile_check_script_finds_a_checkout_that_was_never_installed():
    """``.ci/compile_triton.py`` run as a script (only ``.ci/`` on sys.path, no install - how gpu_check.sh's
    Triton precompile runs while its ``pip install -e .`` builds) still imports the checkout's fastpeft."""
    code = f"REPO = {REPO!r}\n" + textwrap.dedent("""
        import runpy, sys
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        sys.path_importer_cache.clear()
        sys.path[0] = REPO + "/.ci"
        runpy.run_path(REPO + "/.ci/compile_triton.py", run_name="not_main")
        import fastpeft.kernels.lora as KL
        print(KL.__file__)
        """)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(REPO))
    assert proc.returncode == 0, f"child failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    assert proc.stdout.strip().splitlines()[-1] == os.path.join(REPO, "kernels", "lora.py")
