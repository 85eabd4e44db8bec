"""Structure of the package and of the test suite.

- No import cycle among fastpeft's modules (module-level and function-level imports alike) - also as a checker sees
  them that does not know setup.py's package_dir mapping - and ``kernels/`` (installed as ``fastpeft.kernels``)
  imports nothing from the rest of fastpeft but ``fastpeft._numerics``, a leaf that imports nothing of fastpeft.
- The public API: every name fastpeft exported on main at c6fc26b still imports from the same place, and names that
  were one object under two import paths still are.  Internal paths that the one-package-per-method layout moved
  are listed in MOVED with their new place (they are not user API: HF PEFT has no ``peft.config.LoraConfig`` either,
  and the ops' lookup tables / the first-word Philox alias were implementation details).
- No test module imports another test module (shared helpers live in tests/testing_utils.py).
"""

from __future__ import annotations

import ast
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
# source folder -> the package name it is installed as (setup.py's package_dir)
PACKAGE_DIRS = {"fastpeft": "fastpeft", "kernels": "fastpeft.kernels"}


# ---------------------------------------------------------------------------------------------------------------
# import graph
# ---------------------------------------------------------------------------------------------------------------


def _modules() -> dict[str, str]:
    """{dotted module name: file path} for every .py file of fastpeft and kernels/."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, top)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for fn in filenames:
                if fn.endswith(".py"):
                    out[prefix if fn == "__init__.py" else prefix + "." + fn[:-3]] = os.path.join(dirpath, fn)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """fastpeft modules that ``name`` imports anywhere in its file (module level, in functions, in try blocks; only
    ``if TYPE_CHECKING:`` blocks are skipped, they never run).  ``from P import X`` is an edge to ``P`` and, when that
    is a module, to ``P.X``; ``import fastpeft.a.b`` is an edge to ``fastpeft``, ``fastpeft.a`` and ``fastpeft.a.b``; a
    string constant that is exactly a fastpeft module's name counts as an import by name, and so does
    ``import_module("fastpeft")`` (the bare name elsewhere is a label: a dict key, a logger name)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node) if n is not node}
    # the else branch of `if TYPE_CHECKING:` does run
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for n in node.orelse:
                skip -= {id(m) for m in ast.walk(n)}
    found = set()

    def add(target):
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and node.args[0].value == "fastpeft" and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__"):
            found.add("fastpeft")   # the root package imported by name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value != "fastpeft" \
                and node.value in modules and node.value != name:
            # a module named in a string is imported by name (importlib.import_module(table[key]), lazy
            # __getattr__ maps, implementation tables): the same dependency as an import statement
            found.add(node.value)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fastpeft" or a.name.startswith("fastpeft."):
                    # ``import fastpeft.x.y`` binds the root package and runs every __init__ on the way
                    parts = a.name.split(".")
                    for i in range(1, len(parts) + 1):
                        add(".".join(parts[:i]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == "fastpeft" or mod.startswith("fastpeft.")):
                continue
            # ``from P import X`` depends on P's __init__ as well as on P.X: counted both ways, as the stricter
            # cycle checkers do (``from .. import functional`` inside fastpeft.modules was a cycle through the root
            # package, whose __init__ imports functional).  A package importing its own submodules is no edge.
            add(mod)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in modules:
                    add(sub)
    return found


def import_graph(mapped: bool = True) -> dict[str, set[str]]:
    """{module: the fastpeft modules it imports}.  `mapped=False`: the graph a checker builds from the fastpeft/
    folder alone, without setup.py's package_dir mapping - an import of ``fastpeft.kernels.x`` it cannot find is
    then an edge to the longest prefix it knows, ``fastpeft``, the root package."""
    modules = _modules()
    if not mapped:
        modules = {m: p for m, p in modules.items() if not (m == "fastpeft.kernels" or m.startswith("fastpeft.kernels."))}
    return {name: _imports(name, path, modules) for name, path in sorted(modules.items())}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected component with more than one module (or a self-loop)."""
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan, iterative enough for a package this size
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    out = []
    for comp in sccs:
        if len(comp) == 1 and comp[0] not in graph.get(comp[0], ()):
            continue
        members, start = set(comp), comp[0]
        # breadth-first from start back to start inside the component
        prev, frontier, seen = {}, [start], {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v != start:
            path.append(v)
            v = prev[v]
        path = [start] + path[1:][::-1] + [start]
        out.append((comp, path))
    return out


def test_import_graph_sees_lazy_imports():
    """The graph is built from every import statement, including those inside functions."""
    g = import_graph()
    assert "fastpeft.functional" in g and "fastpeft.kernels.lora" in g
    assert g["fastpeft"], "fastpeft/__init__.py imports its submodules"
    lazy = [m for m, path in _modules().items()
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "fastpeft" in ast.dump(n)
                   for fn in ast.walk(ast.parse(open(path, encoding="utf-8").read()))
                   if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(fn))]
    assert lazy, "no function-level import found: the scanner is not looking inside functions"


def test_from_package_import_is_an_edge_to_the_package(tmp_path):
    """``from .. import functional`` runs the parent package's __init__ (which may import the importer back): the
    scanner records the package itself, not only the submodule."""
    f = tmp_path / "x.py"
    f.write_text("from .. import functional as FP\nfrom . import lora\n", encoding="utf-8")
    found = _imports("fastpeft.modules.x", str(f), _modules())
    assert {"fastpeft", "fastpeft.functional", "fastpeft.modules", "fastpeft.modules.lora"} <= found
    # ``import fastpeft.a.b`` runs (and binds) the root package; a "fastpeft" string is the root imported by name
    f.write_text("import fastpeft.ops.lora as L\n", encoding="utf-8")
    assert {"fastpeft", "fastpeft.ops", "fastpeft.ops.lora"} <= _imports("fastpeft.modules.x", str(f), _modules())
    f.write_text("import importlib\nv = importlib.import_module('fastpeft')\n", encoding="utf-8")
    assert "fastpeft" in _imports("fastpeft.modules.x", str(f), _modules())


@pytest.mark.parametrize("mapped", [True, False], ids=["package_dir", "fastpeft_folder_only"])
def test_no_import_cycles(mapped):
    """No cycle among fastpeft modules, counting function-level (lazy) imports: a lazy import hides a cycle from the
    interpreter, not from a reader.  Also as a checker that reads only the fastpeft/ folder sees them (it takes an
    import of ``fastpeft.kernels.x`` for one of the root package: ops/dropout.py importing the dropout threshold
    from kernels/_mask.py once looked like ops -> fastpeft -> functional -> ops to it)."""
    graph = import_graph(mapped)
    cycles = _cycles(graph)
    report = "\n".join(
        f"  cycle: {' -> '.join(path)}\n    strongly connected component of {len(comp)} modules; its edges:\n"
        + "\n".join(f"      {a} -> {b}" for a in comp for b in sorted(graph[a] & set(comp)))
        for comp, path in cycles)
    print(report)
    assert not cycles, f"{len(cycles)} import cycle(s) among fastpeft modules:\n{report}"


def test_kernels_do_not_import_upwards():
    """kernels/ (fastpeft.kernels) is the bottom layer: it may import its own modules and the leaf beneath it,
    ``fastpeft._numerics`` (the numbers the torch references share with the launchers), which imports nothing of
    fastpeft; never the rest of fastpeft."""
    g = import_graph()
    assert g["fastpeft._numerics"] == set(), "fastpeft._numerics must stay a leaf"
    bad = {m: sorted(t for t in deps if not (t == "fastpeft.kernels" or t.startswith("fastpeft.kernels.")
                                             or t == "fastpeft._numerics"))
           for m, deps in g.items() if m == "fastpeft.kernels" or m.startswith("fastpeft.kernels.")}
    bad = {m: deps for m, deps in bad.items() if deps}
    assert not bad, "kernels/ imports upwards:\n" + "\n".join(f"  {m} -> {', '.join(d)}" for m, d in bad.items())


# ---------------------------------------------------------------------------------------------------------------
# public API (taken from main at c6fc26b)
# ---------------------------------------------------------------------------------------------------------------

PUBLIC_API = {
    'fastpeft': [
        'AdaLoRALinear', 'AdaLoraConfig', 'AdaptionPromptConfig', 'BottleneckConfig', 'IA3Config', 'IA3Linear',
        'LoRALinear', 'LoraConfig', 'PeftConfig', 'PeftModel', 'PeftType', 'PrefixTuningConfig',
        'PromptEncoderConfig', 'PromptTuningConfig', 'PromptTuningInit', 'TaskType', '__version__', 'accelerate',
        'backend_info', 'functional', 'get_peft_model', 'get_peft_model_state_dict', 'ops',
        'prepare_model_for_kbit_training', 'restore', 'select_backend', 'set_peft_model_state_dict'
    ],
    'fastpeft.modules': [
        'AdaLoRALinear', 'IA3Linear', 'LoRALinear'
    ],
    'fastpeft.functional': [
        'adalora_linear', 'draw_seed', 'ia3_linear', 'lora_linear', 'select_backend', 'set_adapter_autocast'
    ],
    'fastpeft.ops': [
        'dropout', 'ia3', 'lora'
    ],
    'fastpeft.ops.lora': [
        'LoRALinearFunction', 'base_weight_grad', 'dropout_keep_mask', 'dropout_scale', 'host_seed',
        'lora_apply', 'lora_bwd_ref', 'lora_fwd_ref'
    ],
    'fastpeft.ops.ia3': [
        'IA3LinearFunction', 'ia3_apply', 'ia3_bwd_ref', 'ia3_fwd_ref', 'ia3_weight_grad'
    ],
    'fastpeft.ops.dropout': [
        'dropout_keep_mask', 'dropout_scale', 'dropout_threshold', 'dropout_uniform16',
        'philox4x32_10', 'seeded_dropout'
    ],
    'fastpeft.recompute': [
        'FAMILIES', 'RecomputeStats', 'install', 'is_enabled', 'last_stats', 'saved_tensor_bytes', 'set_enabled',
        'uninstall'
    ],
    'fastpeft.hub': [
        'push_adapter_to_hub', 'resolve_adapter_dir', 'split_hub_kwargs', 'write_model_card'
    ],
    'fastpeft.save_load': [
        'AdapterFileError', 'AdapterSaveError', 'InterruptedSaveError', 'SAFETENSORS_WEIGHTS_NAME',
        'SAVE_RECORD_NAME', 'WEIGHTS_NAME', 'atomic_write_bytes', 'config_fingerprint',
        'embedding_layer_state_dict', 'get_peft_model_state_dict', 'load_peft_weights', 'save_adapter_files',
        'save_peft_weights', 'set_peft_model_state_dict', 'split_embedding_weights'
    ],
    'fastpeft.prompt': [
        'AdaptionPromptConfig', 'BottleneckConfig', 'PrefixEncoder', 'PrefixTuningConfig', 'PromptEmbedding',
        'PromptEncoder', 'PromptEncoderConfig', 'PromptEncoderReparameterizationType', 'PromptLearningConfig',
        'PromptTuningConfig', 'PromptTuningInit'
    ],
    'fastpeft.tuners': [
        'BaseTuner', 'BaseTunerLayer', 'ModulesToSaveWrapper', 'get_tuner_class', 'register_tuner'
    ],
    'fastpeft.config': [
        'CONFIG_CLASSES', 'CONFIG_NAME',
        'PEFT_FORMAT_VERSION', 'PeftConfig', 'PeftType', 'TaskType', 'register_config'
    ],
    'fastpeft.mapping': [
        'get_peft_model', 'get_peft_model_state_dict', 'set_peft_model_state_dict'
    ],
    'fastpeft.peft_model': [
        'MODEL_TYPE_TO_PEFT_MODEL_MAPPING', 'PeftModel', 'PeftModelForCausalLM', 'PeftModelForFeatureExtraction',
        'PeftModelForQuestionAnswering', 'PeftModelForSeq2SeqLM', 'PeftModelForSequenceClassification',
        'PeftModelForTokenClassification', 'TunerLayerStatus', 'TunerModelStatus'
    ],
    'fastpeft.integrations': [
        'accelerate', 'fallback_reason', 'is_accelerated', 'restore'
    ],
}
# internal names of c6fc26b that moved: old dotted path -> new dotted path (the new one must exist)
MOVED = {
    "fastpeft.config.LoraConfig": "fastpeft.tuners.lora.LoraConfig",
    "fastpeft.config.LoraRuntimeConfig": "fastpeft.tuners.lora.LoraRuntimeConfig",
    "fastpeft.config.AdaLoraConfig": "fastpeft.tuners.adalora.AdaLoraConfig",
    "fastpeft.config.IA3Config": "fastpeft.tuners.ia3.IA3Config",
    "fastpeft.tuners.base.BaseTuner": "fastpeft.tuners.tuners_utils.BaseTuner",
    "fastpeft.tuners.base.BaseTunerLayer": "fastpeft.tuners.tuners_utils.BaseTunerLayer",
    "fastpeft.tuners.base.TUNER_CLASSES": "fastpeft.tuners.tuners_utils.TUNER_CLASSES",
    "fastpeft.tuners.base.register_tuner": "fastpeft.tuners.tuners_utils.register_tuner",
    "fastpeft.tuners.base.ModulesToSaveWrapper": "fastpeft.utils.other.ModulesToSaveWrapper",
    "fastpeft.tuners.base.SEQ_CLS_HEAD_NAMES": "fastpeft.utils.constants.SEQ_CLS_HEAD_NAMES",
    "fastpeft.tuners.base.check_target_module_exists": "fastpeft.tuners._targets.check_target_module_exists",
    "fastpeft.ops.lora.ImplTable": "fastpeft.ops._registry.impl",
    "fastpeft.ops.ia3.ImplTable": "fastpeft.ops._registry.impl",
    "fastpeft.ops.dropout.philox4x32": "fastpeft.ops.dropout.philox4x32_10",
}
SAME_OBJECT = [
    ('fastpeft.AdaLoRALinear', 'fastpeft.modules.AdaLoRALinear'),
    ('fastpeft.AdaLoraConfig', 'fastpeft.tuners.adalora.AdaLoraConfig'),
    ('fastpeft.AdaptionPromptConfig', 'fastpeft.prompt.AdaptionPromptConfig'),
    ('fastpeft.BottleneckConfig', 'fastpeft.prompt.BottleneckConfig'),
    ('fastpeft.IA3Config', 'fastpeft.tuners.ia3.IA3Config'),
    ('fastpeft.IA3Linear', 'fastpeft.modules.IA3Linear'),
    ('fastpeft.LoRALinear', 'fastpeft.modules.LoRALinear'),
    ('fastpeft.LoraConfig', 'fastpeft.tuners.lora.LoraConfig'),
    ('fastpeft.PeftConfig', 'fastpeft.config.PeftConfig'),
    ('fastpeft.PeftModel', 'fastpeft.peft_model.PeftModel'),
    ('fastpeft.PeftType', 'fastpeft.config.PeftType'),
    ('fastpeft.PrefixTuningConfig', 'fastpeft.prompt.PrefixTuningConfig'),
    ('fastpeft.PromptEncoderConfig', 'fastpeft.prompt.PromptEncoderConfig'),
    ('fastpeft.PromptTuningConfig', 'fastpeft.prompt.PromptTuningConfig'),
    ('fastpeft.PromptTuningInit', 'fastpeft.prompt.PromptTuningInit'),
    ('fastpeft.TaskType', 'fastpeft.config.TaskType'),
    ('fastpeft.accelerate', 'fastpeft.integrations.accelerate'),
    ('fastpeft.get_peft_model', 'fastpeft.mapping.get_peft_model'),
    ('fastpeft.get_peft_model_state_dict', 'fastpeft.save_load.get_peft_model_state_dict',
     'fastpeft.mapping.get_peft_model_state_dict'),
    ('fastpeft.restore', 'fastpeft.integrations.restore'),
    ('fastpeft.select_backend', 'fastpeft.functional.select_backend'),
    ('fastpeft.set_peft_model_state_dict', 'fastpeft.save_load.set_peft_model_state_dict',
     'fastpeft.mapping.set_peft_model_state_dict'),
    ('fastpeft.ops.lora.dropout_keep_mask', 'fastpeft.ops.dropout.dropout_keep_mask'),
    ('fastpeft.ops.lora.dropout_scale', 'fastpeft.ops.dropout.dropout_scale'),
    ('fastpeft.tuners.BaseTuner', 'fastpeft.tuners.tuners_utils.BaseTuner'),
    ('fastpeft.tuners.BaseTunerLayer', 'fastpeft.tuners.tuners_utils.BaseTunerLayer'),
    ('fastpeft.tuners.ModulesToSaveWrapper', 'fastpeft.utils.other.ModulesToSaveWrapper'),
    ('fastpeft.tuners.register_tuner', 'fastpeft.tuners.tuners_utils.register_tuner'),
]


@pytest.mark.parametrize("module", sorted(PUBLIC_API))
def test_public_names_import_from_the_same_place(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC_API[module] if not hasattr(mod, n)]
    assert not missing, f"{module} no longer exports: {missing}"


def test_public_aliases_are_one_object():
    def get(path):
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    split = [group for group in SAME_OBJECT if any(get(p) is not get(group[0]) for p in group[1:])]
    assert not split, f"names that were one object are now different objects: {split}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_internal_names_exist_at_their_new_place(old):
    module, _, name = MOVED[old].rpartition(".")
    assert hasattr(importlib.import_module(module), name), f"{old} moved to {MOVED[old]}, which does not exist"


def test_all_lists_only_existing_names():
    for module in PUBLIC_API:
        mod = importlib.import_module(module)
        for n in getattr(mod, "__all__", ()):
            assert hasattr(mod, n), f"{module}.__all__ names {n!r}, which it does not define"


# ---------------------------------------------------------------------------------------------------------------
# the test suite itself
# ---------------------------------------------------------------------------------------------------------------


def test_no_test_module_imports_another():
    """Shared helpers live in tests/testing_utils.py; a test module importing another runs its module-level code
    (and its importorskips) in the importer and ties two test files together.  String literals count too (a
    subprocess script that imports a test module)."""
    names = {fn[:-3] for fn in os.listdir(TESTS) if fn.startswith("test_") and fn.endswith(".py")}
    pattern = re.compile(r"^\s*(?:from\s+(test_\w+)\s+import|import\s+(test_\w+))", re.M)
    bad = []
    for fn in sorted(os.listdir(TESTS)):
        if fn.endswith(".py"):
            with open(os.path.join(TESTS, fn), encoding="utf-8") as f:
                for m in pattern.finditer(f.read()):
                    if (m.group(1) or m.group(2)) in names:
                        bad.append(f"{fn}: {m.group(0).strip()}")
    assert not bad, "test modules import other test modules:\n  " + "\n  ".join(bad)
