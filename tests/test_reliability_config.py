"""Config validation at construction, for every config class: finite numbers, ranges, types, module names."""

import math

import pytest
import torch

from fastpeft import AdaLoraConfig, IA3Config, LoraConfig
from fastpeft.functional import adalora_linear
from fastpeft.modules import LoRALinear
from fastpeft.prompt import (AdaptionPromptConfig, BottleneckConfig, PrefixTuningConfig, PromptEncoderConfig,
                             PromptTuningConfig)

NAN, INF = float("nan"), float("inf")
ADA = dict(total_step=10)
PROMPT = dict(num_virtual_tokens=4)

BAD = [
    # (class, kwargs, exception, message regex)
    (LoraConfig, dict(lora_alpha=NAN), ValueError, r"lora_alpha must be finite, got nan"),
    (LoraConfig, dict(lora_alpha=INF), ValueError, r"lora_alpha must be finite, got inf"),
    (LoraConfig, dict(lora_alpha=-INF), ValueError, r"lora_alpha must be finite, got -inf"),
    (LoraConfig, dict(lora_alpha="8"), TypeError, r"lora_alpha must be a number"),
    (LoraConfig, dict(lora_dropout=NAN), ValueError, r"lora_dropout must be in \[0, 1\), got nan"),
    (LoraConfig, dict(r=0), ValueError, r"r must be a positive int, got 0"),
    (LoraConfig, dict(r=2.0), TypeError, r"r must be an int"),
    (LoraConfig, dict(alpha_pattern={"q": NAN}), ValueError, r"alpha_pattern\['q'\] must be finite, got nan"),
    (LoraConfig, dict(rank_pattern={"q": -1}), ValueError, r"rank_pattern\['q'\] must be a positive int"),
    (LoraConfig, dict(target_modules=["q", ""]), ValueError,
     r"target_modules entries must be non-empty module names, got '' in target_modules"),
    (LoraConfig, dict(target_modules="q_proj("), ValueError,
     r"target_modules='q_proj\(' is not a valid regular expression"),
    (LoraConfig, dict(exclude_modules="[", target_modules=["q"]), ValueError,
     r"exclude_modules='\[' is not a valid regular expression"),
    (LoraConfig, dict(modules_to_save=[" "]), ValueError, r"modules_to_save entries must be non-empty"),
    (LoraConfig, dict(target_modules=["q"], layers_to_transform=[0], layers_pattern=[3]), TypeError,
     r"layers_pattern must be a str, a list of str or None"),
    (LoraConfig, dict(base_model_name_or_path=3), TypeError, r"base_model_name_or_path must be a str or None"),
    (LoraConfig, dict(revision=["main"]), TypeError, r"revision must be a str or None"),
    (AdaLoraConfig, dict(lora_alpha=NAN, **ADA), ValueError, r"lora_alpha must be finite, got nan"),
    (AdaLoraConfig, dict(orth_reg_weight=NAN, **ADA), ValueError, r"orth_reg_weight must be finite, got nan"),
    (AdaLoraConfig, dict(orth_reg_weight=INF, **ADA), ValueError, r"orth_reg_weight must be finite, got inf"),
    (AdaLoraConfig, dict(beta1=NAN, **ADA), ValueError, r"beta1 must be in \[0, 1\], got nan"),
    (AdaLoraConfig, dict(total_step=0), ValueError, r"AdaLoRA needs total_step > 0"),
    (IA3Config, dict(target_modules=["q", ""], feedforward_modules=[]), ValueError,
     r"target_modules entries must be non-empty module names"),
    (IA3Config, dict(target_modules=["q"], feedforward_modules="(("), ValueError,
     r"feedforward_modules='\(\(' is not a valid regular expression"),
    (PromptTuningConfig, dict(num_virtual_tokens=0), ValueError, r"num_virtual_tokens must be a positive int"),
    (PromptTuningConfig, dict(prompt_tuning_init_text=3, **PROMPT), TypeError,
     r"prompt_tuning_init_text must be a str or None, got 3"),
    (PromptTuningConfig, dict(tokenizer_kwargs=[1], **PROMPT), TypeError, r"tokenizer_kwargs must be a dict or None"),
    (PromptEncoderConfig, dict(encoder_dropout=NAN, **PROMPT), ValueError, r"encoder_dropout must be a number in"),
    (PrefixTuningConfig, dict(num_virtual_tokens=-2), ValueError, r"num_virtual_tokens must be a positive int"),
    (AdaptionPromptConfig, dict(adapter_len=0, adapter_layers=1), ValueError, r"adapter_len must be a positive int"),
    (BottleneckConfig, dict(reduction_factor=INF), ValueError, r"reduction_factor must be finite, got inf"),
    (BottleneckConfig, dict(reduction_factor=NAN), ValueError, r"reduction_factor must be a positive number"),
    (BottleneckConfig, dict(adapter_dropout=INF), ValueError, r"adapter_dropout must be a number in \[0, 1\)"),
    (BottleneckConfig, dict(target_modules=[""]), ValueError, r"target_modules entries must be non-empty"),
]


@pytest.mark.parametrize("cls,kw,exc,msg", BAD, ids=[f"{c.__name__}-{sorted(k)[0]}-{i}"
                                                     for i, (c, k, _, _) in enumerate(BAD)])
def test_bad_values_rejected(cls, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        cls(**kw)


def test_same_message_as_module():
    with pytest.raises(ValueError) as a:
        LoraConfig(lora_alpha=NAN)
    with pytest.raises(ValueError) as b:
        LoRALinear(4, 4, lora_alpha=NAN)
    assert str(a.value) == str(b.value)


def test_good_values_still_accepted():
    LoraConfig(lora_alpha=16.5, target_modules="q|v", alpha_pattern={"q": 4})
    AdaLoraConfig(total_step=10, orth_reg_weight=0.0)
    IA3Config(target_modules=["q"], feedforward_modules=[])
    BottleneckConfig(reduction_factor=4)
    cfg = LoraConfig(r=4, lora_alpha=8)
    assert cfg.copy().r == 4  # copies are validated too and stay valid


def test_from_dict_validates():
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        LoraConfig.from_dict({"peft_type": "LORA", "lora_alpha": math.nan})


def test_merge_cannot_write_nan_through_config():
    """The issue's case: LoraConfig(lora_alpha=nan) used to be accepted and merge_and_unload wrote NaN."""
    with pytest.raises(ValueError):
        LoraConfig(lora_alpha=NAN, target_modules=["q"])


@pytest.mark.parametrize("ranknum", [0.0, -1e-5, -3.0])
def test_adalora_linear_ranknum(ranknum):
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    A, E, B = torch.randn(2, 4), torch.randn(2, 1), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"ranknum must be > 0 \(AdaLoRA's initial rank, a float\), got"):
        adalora_linear(x, w, None, A, E, B, 1.0, ranknum)
    adalora_linear(x, w, None, A, E, B, 1.0, 2.0)
