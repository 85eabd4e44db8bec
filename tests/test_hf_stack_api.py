"""Hub conventions and PEFT's public API on fastpeft models, against HF PEFT: save_pretrained keywords and model
card, push_to_hub (huggingface_hub's upload calls intercepted), Hub ids in from_pretrained (a fake populated HF cache,
offline), PEFT's remaining PeftModel methods, LoraConfig.runtime_config/check_kwargs/from_peft_type, fastpeft without
peft installed, and the README's Trainer / SFTTrainer quickstart."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
huggingface_hub = pytest.importorskip("huggingface_hub")

import fastpeft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from testing_utils import STACK_IDS as IDS, eval_logits as logits, stack_lm_dataset as lm_dataset  # noqa: E402
from testing_utils import stack_text_dataset as text_dataset, stack_tiny_llama as tiny_llama  # noqa: E402
from testing_utils import stack_tiny_tokenizer as tiny_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def pair(**kw):
    p = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**{**KW, **kw}))
    f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**{**KW, **kw}))
    fastpeft.set_peft_model_state_dict(f, peft.get_peft_model_state_dict(p))
    with torch.no_grad():  # a non-trivial adapter
        for (n, a), (_, b) in zip(p.named_parameters(), f.named_parameters()):
            if "lora_B" in n:
                a.normal_()
                b.copy_(a)
    return p, f


def test_is_a_peft_model_without_peft_code():
    """isinstance answers what transformers/TRL/accelerate ask; no public PeftModel attribute is PEFT's code."""
    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import _is_peft_model

    _, f = pair()
    assert isinstance(f, peft.PeftModel) and _is_peft_model(f) and is_peft_model(f)
    assert isinstance(fastpeft.LoraConfig(), peft.PeftConfig)
    def owner(cls, name):
        return next(k for k in cls.__mro__ if name in k.__dict__).__module__

    for cls in (fastpeft.PeftModel, type(f)):
        inherited = [n for n in dir(cls) if not n.startswith("_") and owner(cls, n).startswith(("peft.", "transformers."))]
        assert inherited == [], inherited


def test_save_pretrained_keywords_and_model_card(tmp_path):
    p, f = pair()
    f.add_adapter("other", fastpeft.LoraConfig(**KW))
    p.add_adapter("other", peft.LoraConfig(**KW))
    for lib, m in (("peft", p), ("fast", f)):
        m.save_pretrained(str(tmp_path / lib))
        m.save_pretrained(str(tmp_path / f"{lib}-sel"), selected_adapters=["other"])
        m.save_pretrained(str(tmp_path / f"{lib}-bin"), safe_serialization=False)
        m.save_pretrained(str(tmp_path / f"{lib}-none"), is_main_process=False)
    for suffix in ("", "-sel", "-bin", "-none"):
        a, b = tmp_path / f"peft{suffix}", tmp_path / f"fast{suffix}"
        assert os.path.isdir(a) == os.path.isdir(b), suffix
        if os.path.isdir(a):
            # fastpeft adds its save record (fastpeft_save.json, HF PEFT ignores it) beside each adapter's files
            walk = lambda d: sorted(os.path.relpath(os.path.join(r, x), d) for r, _, fs in os.walk(d) for x in fs
                                    if x != "fastpeft_save.json")
            assert walk(b) == walk(a), suffix
    # the model card: PEFT's metadata
    cp = huggingface_hub.ModelCard.load(str(tmp_path / "peft" / "README.md"))
    cf = huggingface_hub.ModelCard.load(str(tmp_path / "fast" / "README.md"))
    assert cf.data.to_dict() == cp.data.to_dict()
    assert cf.data.library_name == "peft" and "lora" in cf.data.tags and cf.data.pipeline_tag == "text-generation"
    assert "### Framework versions" in cf.text and "- fastpeft" in cf.text
    # state_dict=: the values come from the given full state dict (what FSDP / ZeRO-3 saves pass)
    sd = {k: v.clone() for k, v in f.state_dict().items()}
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].fill_(0.25)
    f.save_pretrained(str(tmp_path / "sd"), state_dict=sd, selected_adapters=["default"])
    got = load_file(str(tmp_path / "sd" / "adapter_model.safetensors"))
    assert torch.all(got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == 0.25)
    assert torch.equal(got["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"],
                       f.base_model.model.model.layers[0].self_attn.v_proj.lora_A["default"].weight)
    with pytest.raises(ValueError, match="selected_adapters"):
        f.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])


def test_push_to_hub_uploads_the_adapter(monkeypatch, tmp_path):
    """Intercept huggingface_hub's calls: one commit with the adapter files (never the base model)."""
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls.setdefault("repo", []).append((repo_id, kw.get("private")))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kw):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            with open(src, "rb") if isinstance(src, str) else open(os.devnull, "rb") as fh:
                files[op.path_in_repo] = fh.read() if isinstance(src, str) else src
        calls.setdefault("commit", []).append((repo_id, files, kw))
        return "commit-info"

    def create_branch(self, repo_id, branch, **kw):
        calls.setdefault("branch", []).append(branch)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    import transformers.utils.hub as th

    monkeypatch.setattr(th, "create_and_tag_model_card",  # PEFT's route asks the Hub for an existing card
                        lambda *a, **k: huggingface_hub.ModelCard.from_template(huggingface_hub.ModelCardData()))
    p, f = pair()
    assert p.push_to_hub("user/adapter", private=True) == "commit-info"
    assert f.push_to_hub("user/adapter", private=True, revision="dev", commit_message="hi") == "commit-info"
    (_, pfiles, _), (repo, ffiles, kw) = calls["commit"]
    assert repo == "user/adapter" and calls["repo"] == [("user/adapter", True)] * 2 and calls["branch"] == ["dev"]
    assert kw["commit_message"] == "hi" and kw["revision"] == "dev"
    assert sorted(pfiles) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(ffiles) == sorted(pfiles) + ["fastpeft_save.json"]  # fastpeft's save record travels too
    from safetensors.torch import load as st_load

    up = st_load(ffiles["adapter_model.safetensors"])
    want = fastpeft.get_peft_model_state_dict(f)
    assert sorted(up) == sorted(want) and all(torch.equal(up[k], want[k]) for k in want)
    assert json.loads(ffiles["adapter_config.json"])["peft_type"] == "LORA"


def _fake_cache(tmp_path, src_dir, sub=None):
    """A populated HF cache: models--user--adapter with refs main -> c1 and v2 -> c2 (files optionally under sub)."""
    import shutil

    repo = tmp_path / "cache" / "models--user--adapter"
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        snap = repo / "snapshots" / commit / (sub or "")
        snap.mkdir(parents=True)
        for fn in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(src_dir / ref / fn, snap / fn)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return str(tmp_path / "cache")


@pytest.mark.parametrize("sub", [None, "sub"])
def test_from_pretrained_hub_id_from_cache(tmp_path, sub):
    """Hub ids resolve through huggingface_hub's cache offline (HF_HUB_OFFLINE=1 in the test session), with
    revision and subfolder; HF PEFT reads the same cache the same way; not cached -> a clear error."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    p1, f1 = pair()
    p2, _ = pair()
    with torch.no_grad():
        for n, q in p2.named_parameters():
            if "lora_B" in n:
                q.mul_(-2)
    p1.save_pretrained(str(tmp_path / "src" / "main"))
    p2.save_pretrained(str(tmp_path / "src" / "v2"))
    cache = _fake_cache(tmp_path, tmp_path / "src", sub)
    for rev, ref in ((None, p1), ("v2", p2)):
        kw = dict(cache_dir=cache, subfolder=sub, **({"revision": rev} if rev else {}))
        fm = fastpeft.PeftModel.from_pretrained(tiny_llama(), "user/adapter", **kw)
        assert torch.equal(logits(fm, IDS), logits(ref, IDS))
        if sub is None:  # PEFT 0.21.2 offline joins the subfolder twice (load_peft_weights), so it fails there
            pm = peft.PeftModel.from_pretrained(tiny_llama(), "user/adapter", **kw)
            assert torch.equal(logits(pm, IDS), logits(ref, IDS))
    cfg = fastpeft.PeftConfig.from_pretrained("user/adapter", cache_dir=cache, subfolder=sub)
    assert isinstance(cfg, fastpeft.LoraConfig) and cfg.r == 4
    # load_adapter takes Hub ids too
    fm.load_adapter("user/adapter", "second", cache_dir=cache, subfolder=sub)
    assert "second" in fm.peft_config
    with pytest.raises(ValueError, match=r"'user/missing'.*offline.*not in the Hugging Face cache"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(), "user/missing", cache_dir=cache)


def test_peft_public_methods():
    p, f = pair(modules_to_save=["lm_head"])
    asdict = lambda xs: [dataclasses.asdict(x) for x in xs]  # noqa: E731
    assert asdict(f.get_layer_status()) == asdict(p.get_layer_status())
    assert dataclasses.asdict(f.get_model_status()) == dataclasses.asdict(p.get_model_status())
    assert f.modules_to_save == p.modules_to_save == {"lm_head"}
    assert f.base_model_torch_dtype == p.base_model_torch_dtype == torch.float32
    assert f.supports_lora_conversion() is p.supports_lora_conversion() is True
    assert f.has_active_enabled_adapter and p.has_active_enabled_adapter
    with f.disable_adapter(), p.disable_adapter():
        assert f.has_active_enabled_adapter is p.has_active_enabled_adapter is False
        assert f.get_model_status().enabled is p.get_model_status().enabled is False
    assert "adapter_names" in f.special_peft_forward_args
    assert f.base_model_prepare_inputs_for_generation == f.get_base_model().prepare_inputs_for_generation
    for m in (p, f):
        m.set_requires_grad("default", requires_grad=False)
    assert asdict(f.get_layer_status()) == asdict(p.get_layer_status())
    assert not any(q.requires_grad for q in f.parameters())
    f.set_requires_grad(["default"])
    assert f.get_model_status().requires_grad == {"default": True}
    base = tiny_llama()
    f.prepare_model_for_gradient_checkpointing(base)
    assert base.model.embed_tokens(torch.tensor([1])).requires_grad
    # prompt methods
    pp = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    fp = fastpeft.get_peft_model(tiny_llama(), fastpeft.PromptTuningConfig(num_virtual_tokens=3,
                                                                           task_type="CAUSAL_LM"))
    fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(pp))
    assert torch.equal(fp.get_prompt_embedding_to_save("default"), pp.get_prompt_embedding_to_save("default"))
    assert torch.equal(fp.get_prompt(2), pp.get_prompt(2))
    with pytest.raises(TypeError, match="prompt learning"):
        fp.set_requires_grad("default")


def test_lora_config_methods(tmp_path):
    c = fastpeft.LoraConfig(r=4, runtime_config={"ephemeral_gpu_offload": True})
    pc = peft.LoraConfig(r=4)
    assert c.runtime_config.ephemeral_gpu_offload is True
    assert fastpeft.LoraConfig().runtime_config == fastpeft.tuners.lora.LoraRuntimeConfig()
    assert "runtime_config" not in c.to_dict() and "runtime_config" not in pc.to_dict()
    c.save_pretrained(str(tmp_path))
    assert "runtime_config" not in json.load(open(tmp_path / "adapter_config.json"))
    assert fastpeft.LoraConfig.check_kwargs(r=3, x=1) == peft.LoraConfig.check_kwargs(r=3, x=1) == {"r": 3, "x": 1}
    got = fastpeft.PeftConfig.from_peft_type(peft_type="LORA", r=5, lora_alpha=3)
    assert type(got) is fastpeft.LoraConfig and got.r == 5 and got.lora_alpha == 3
    assert type(fastpeft.LoraConfig.from_peft_type(r=2)) is fastpeft.LoraConfig
    with pytest.warns(UserWarning, match="newer_key"):
        fastpeft.PeftConfig.from_peft_type(peft_type="LORA", newer_key=1)
    ada = fastpeft.PeftConfig.from_peft_type(peft_type="ADALORA", total_step=10)
    assert type(ada) is fastpeft.AdaLoraConfig


NO_PEFT = r"""
import sys
sys.modules["peft"] = None  # `import peft` raises ImportError
import torch, torch.nn as nn, tempfile, os
import fastpeft
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 4)
    def forward(self, x):
        return self.o(torch.relu(self.q(x)))
torch.manual_seed(0)
m = fastpeft.get_peft_model(M(), fastpeft.LoraConfig(r=2, target_modules=["q"], init_lora_weights=False))
assert fastpeft.PeftModel.__mro__[1] is nn.Module and fastpeft.PeftConfig.__mro__[1] is object
x = torch.randn(3, 8)
y = m(x)
y.sum().backward()
assert m.base_model.model.q.lora_B["default"].weight.grad is not None
d = tempfile.mkdtemp()
m.save_pretrained(d)
torch.manual_seed(0)
back = fastpeft.PeftModel.from_pretrained(M(), d)
assert torch.equal(back(x), y.detach())
assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                "fastpeft_save.json"], os.listdir(d)
assert "peft" not in [k for k, v in sys.modules.items() if v is not None]
print("ok")
"""


def test_works_without_peft():
    r = subprocess.run([sys.executable, "-c", NO_PEFT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"<!-- tested by tests/test_hf_stack_api.py -->\s*```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2, "README's Trainer and SFTTrainer quickstart blocks must carry the tested marker"
    return blocks


def test_readme_trainer_quickstart(monkeypatch, tmp_path):
    """The README's Trainer and SFTTrainer examples run as written, with a tiny model, 2 steps and the CPU
    substituted."""
    pytest.importorskip("trl")
    from fastpeft.integrations import is_accelerated

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())
    monkeypatch.chdir(tmp_path)
    # CPU-only test machines: the examples' argument objects get use_cpu=True (bf16 then runs as CPU autocast)
    trainer_block, sft_block = [b.replace('Arguments("out", ', 'Arguments("out", use_cpu=True, ')
                                .replace('SFTConfig("out", ', 'SFTConfig("out", use_cpu=True, ')
                                for b in readme_blocks()]
    ns = {"train_dataset": lm_dataset(n=8), "dataset": text_dataset(n=8)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(trainer_block.replace("max_steps=100", "max_steps=2"), "README.md[Trainer]", "exec"), ns)
        assert isinstance(ns["trainer"].model, fastpeft.PeftModel)
        assert sorted(os.listdir("out/final"))[:3] == ["README.md", "adapter_config.json",
                                                       "adapter_model.safetensors"]
        assert "model.safetensors" not in os.listdir("out/final")
        exec(compile(sft_block.replace("max_steps=100", "max_steps=2"), "README.md[SFTTrainer]", "exec"), ns)
    assert is_accelerated(ns["trainer"].model) and ns["trainer"].state.global_step == 2
