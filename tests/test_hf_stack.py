"""fastpeft inside the Hugging Face training stack, side by side with HF PEFT: transformers.Trainer, TRL's SFTTrainer,
accelerate (through Trainer), fastpeft.accelerate(peft_model), bf16 autocast.

Tiny Llama / GPT-2 models built from configs and small synthetic datasets on CPU.  fp32 losses must be identical step
by step, bf16 losses identical to bf16 rounding; checkpoints must hold PEFT's files (same list) and load in both
libraries; resuming must reproduce the uninterrupted run.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
import fastpeft.functional as FP  # noqa: E402
from fastpeft.integrations import is_accelerated  # noqa: E402

from testing_utils import STACK_IDS as IDS, STACK_VOCAB as VOCAB, eval_logits as logits  # noqa: E402,F401
from testing_utils import stack_lm_dataset as lm_dataset, stack_text_dataset as text_dataset  # noqa: E402
from testing_utils import stack_tiny_gpt2 as tiny_gpt2, stack_tiny_llama as tiny_llama  # noqa: E402
from testing_utils import stack_tiny_tokenizer as tiny_tokenizer  # noqa: E402


def lora_kw(make):
    return dict(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                target_modules=["q_proj", "v_proj"] if make is tiny_llama else ["c_attn"])


def build(lib, make, **kw):
    """(model, reference PEFT model whose adapter init it shares).  fastpeft models copy PEFT's random lora_A."""
    pm = peft.get_peft_model(make(), peft.LoraConfig(**lora_kw(make), **kw))
    if lib == "peft":
        return pm
    if lib == "accelerate":
        return fastpeft.accelerate(pm)
    fm = fastpeft.get_peft_model(make(), fastpeft.LoraConfig(**lora_kw(make), **kw))
    fastpeft.set_peft_model_state_dict(fm, peft.get_peft_model_state_dict(pm))
    return fm


def args(out, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=4, logging_steps=1, save_steps=2, report_to=[],
                use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]



def ckpt_files(path):
    """The checkpoint's file names, less fastpeft's save record (``fastpeft_save.json``: ties the adapter's config
    and weights together so an interrupted save is detected; HF PEFT ignores it)."""
    from fastpeft.save_load import SAVE_RECORD_NAME

    return sorted(f for f in os.listdir(path) if f != SAVE_RECORD_NAME)




# ---------------------------------------------------------------------------------------------------------------
# transformers.Trainer
# ---------------------------------------------------------------------------------------------------------------


def test_trainer_llama_side_by_side(tmp_path):
    """Default Trainer arguments (remove_unused_columns=True), evaluation, label smoothing, load_best_model_at_end,
    checkpoints every 2 steps: fastpeft, HF PEFT and fastpeft.accelerate(HF PEFT) agree exactly in fp32."""
    ds = lm_dataset()
    runs = {}
    for lib in ("peft", "fastpeft", "accelerate"):
        model = build(lib, tiny_llama)
        tr = transformers.Trainer(model=model, train_dataset=ds, eval_dataset=ds.select(range(4)),
                                  args=args(tmp_path / lib, eval_strategy="steps", eval_steps=2,
                                            load_best_model_at_end=True, label_smoothing_factor=0.1))
        tr.train()
        tr.save_model(str(tmp_path / lib / "final"))
        runs[lib] = tr
    ref = runs["peft"]
    assert len(losses(ref)) == 4 and len(losses(ref, "eval_loss")) == 2
    assert ref.label_smoother is not None
    for lib in ("fastpeft", "accelerate"):
        assert losses(runs[lib]) == losses(ref), lib                       # fp32: identical
        assert losses(runs[lib], "eval_loss") == losses(ref, "eval_loss"), lib
        for ck in ("checkpoint-2", "checkpoint-4", "final"):
            assert ckpt_files(tmp_path / lib / ck) == ckpt_files(tmp_path / "peft" / ck), (lib, ck)
    assert isinstance(runs["fastpeft"].model, fastpeft.PeftModel) and is_accelerated(runs["accelerate"].model)
    assert "model.safetensors" not in ckpt_files(tmp_path / "fastpeft" / "checkpoint-2")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(
        ckpt_files(tmp_path / "fastpeft" / "final"))

    # the checkpoints load in both libraries and reproduce the trained model
    fast, ck = runs["fastpeft"].model, str(tmp_path / "fastpeft" / "checkpoint-4")
    want = logits(fast, IDS)
    a = peft.PeftModel.from_pretrained(tiny_llama(), ck)
    b = fastpeft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft" / "checkpoint-4"))
    assert torch.equal(logits(a, IDS), want) and torch.equal(logits(b, IDS), want)

    # resuming from checkpoint-2 reproduces steps 3-4 of the uninterrupted run
    model = build("fastpeft", tiny_llama)
    tr = transformers.Trainer(model=model, train_dataset=ds, eval_dataset=ds.select(range(4)),
                              args=args(tmp_path / "fastpeft", eval_strategy="steps", eval_steps=2,
                                        label_smoothing_factor=0.1))
    tr.train(resume_from_checkpoint=str(tmp_path / "fastpeft" / "checkpoint-2"))
    # the log history restarts from the checkpoint's (steps 1-2); steps 3-4 are the resumed run's
    assert tr.state.global_step == 4 and losses(tr) == losses(ref)


def test_trainer_gpt2_tied_embeddings_and_embedding_layers(tmp_path):
    """GPT-2 ties lm_head to wte: checkpoints save (no "Some tensors share memory"); save_embedding_layers=True
    writes PEFT's keys for the tied pair."""
    ds = lm_dataset(n=8)
    runs = {}
    for lib in ("peft", "fastpeft"):
        tr = transformers.Trainer(model=build(lib, tiny_gpt2), train_dataset=ds,
                                  args=args(tmp_path / lib, max_steps=2))
        tr.train()
        runs[lib] = tr
    assert losses(runs["fastpeft"]) == losses(runs["peft"])
    assert ckpt_files(tmp_path / "fastpeft" / "checkpoint-2") == ckpt_files(tmp_path / "peft" / "checkpoint-2")
    from safetensors.torch import load_file

    for lib, m in runs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.model.save_pretrained(str(tmp_path / f"emb-{lib}"), save_embedding_layers=True)
    sp = load_file(str(tmp_path / "emb-peft" / "adapter_model.safetensors"))
    sf = load_file(str(tmp_path / "emb-fastpeft" / "adapter_model.safetensors"))
    assert sorted(sf) == sorted(sp) and "base_model.model.transformer.wte.weight" in sf
    assert all(torch.equal(sf[k], sp[k]) for k in sp)
    # both libraries read it back (embedding weights included)
    fresh = tiny_gpt2()
    with torch.no_grad():
        fresh.transformer.wte.weight.add_(1.0)
    back = fastpeft.PeftModel.from_pretrained(fresh, str(tmp_path / "emb-peft"))
    assert torch.equal(back.get_base_model().transformer.wte.weight, sp["base_model.model.transformer.wte.weight"])


@pytest.mark.parametrize("mode", ["peft", "keep"])
def test_trainer_bf16_autocast(tmp_path, mode):
    """bf16 mixed precision (SFTConfig's default): with the default casting fastpeft's losses equal PEFT's to bf16
    rounding (here: identical); set_adapter_autocast("keep") runs the adapter branch in fp32 instead, which moves the
    losses by about bf16 rounding."""
    ds = lm_dataset(n=8)
    out = {}
    prev = FP.set_adapter_autocast(mode)
    try:
        for lib in ("peft", "fastpeft", "accelerate"):
            tr = transformers.Trainer(model=build(lib, tiny_llama), train_dataset=ds,
                                      args=args(tmp_path / lib, max_steps=2, bf16=True, save_strategy="no"))
            tr.train()
            out[lib] = losses(tr)
    finally:
        FP.set_adapter_autocast(prev)
    rounding = 2.0 ** -8  # bf16 unit roundoff, relative
    for lib in ("fastpeft", "accelerate"):
        assert len(out[lib]) == 2
        for a, b in zip(out[lib], out["peft"]):
            assert abs(a - b) <= 4 * rounding * abs(b), (mode, out)
        if mode == "peft":
            assert out[lib] == out["peft"]


# ---------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------




def test_trl_refuses_an_lm_head_adapter_on_fastpeft_models_as_on_peft_models(tmp_path):
    """TRL's trainers refuse an adapter on lm_head where their loss reads lm_head.weight directly (it would never
    train); they ask isinstance(layer, peft's BaseTunerLayer), which fastpeft's layers answer (a virtual subclass:
    no PEFT code in them)."""
    trl = pytest.importorskip("trl")
    from peft.tuners.tuners_utils import BaseTunerLayer
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    fm = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw))
    head = fm.get_output_embeddings()
    assert isinstance(head, BaseTunerLayer)
    assert not any(c.__module__.startswith("peft.") for c in type(head).__mro__)
    # prompt-learning configs answer PEFT's PromptLearningConfig check too (TRL's distillation trainer refuses them:
    # its loss bypasses the virtual tokens); the other methods' configs do not
    for c in (fastpeft.PromptTuningConfig(num_virtual_tokens=2), fastpeft.PrefixTuningConfig(num_virtual_tokens=2),
              fastpeft.PromptEncoderConfig(num_virtual_tokens=2)):
        assert isinstance(c, peft.PromptLearningConfig)
    assert not isinstance(fastpeft.LoraConfig(), peft.PromptLearningConfig)
    cfg = trl.SFTConfig(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False)
    for model in (fm, peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))):
        with pytest.raises(ValueError, match="adapter to `lm_head` is not supported"):
            trl.SFTTrainer(model=model, args=cfg, train_dataset=text_dataset(), processing_class=tiny_tokenizer())


def test_sft_trainer(tmp_path):
    """SFTTrainer(peft_config=fastpeft.LoraConfig(...)) and SFTTrainer(model=<fastpeft model>) train like
    SFTTrainer(peft_config=peft.LoraConfig(...)): same losses, same checkpoint files, loadable by both."""
    trl = pytest.importorskip("trl")
    ds, tok = text_dataset(), tiny_tokenizer()

    def sft(out, **kw):
        cfg = trl.SFTConfig(str(out), per_device_train_batch_size=4, max_steps=2, logging_steps=1, save_steps=2,
                            report_to=[], use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0, bf16=False)
        tr = trl.SFTTrainer(args=cfg, train_dataset=ds, processing_class=tok, **kw)
        tr.train()
        return tr

    class Init(transformers.TrainerCallback):  # the adapter's initial values, to start the fastpeft model there
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.sd = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}

    init = Init()
    kw = lora_kw(tiny_llama)
    ref = sft(tmp_path / "peft", model=tiny_llama(), peft_config=peft.LoraConfig(**kw), callbacks=[init])
    by_cfg = sft(tmp_path / "cfg", model=tiny_llama(), peft_config=fastpeft.LoraConfig(**kw))
    # HF PEFT builds the model from the fastpeft config; its LoRA layers run fastpeft's ops
    assert is_accelerated(by_cfg.model)
    fm = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw))
    fastpeft.set_peft_model_state_dict(fm, init.sd)
    by_model = sft(tmp_path / "model", model=fm)
    assert isinstance(by_model.model, fastpeft.PeftModel)
    for tr, name in ((by_cfg, "cfg"), (by_model, "model")):
        assert losses(tr) == losses(ref), name
        assert ckpt_files(tmp_path / name / "checkpoint-2") == ckpt_files(tmp_path / "peft" / "checkpoint-2")
    want = logits(by_model.model, IDS)
    ck = str(tmp_path / "model" / "checkpoint-2")
    assert torch.equal(logits(peft.PeftModel.from_pretrained(tiny_llama(), ck), IDS), want)
    assert torch.equal(logits(fastpeft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft" /
                                                                                 "checkpoint-2")), IDS), want)
