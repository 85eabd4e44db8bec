"""fastpeft: parameter-efficient fine-tuning with fused kernels, compatible with Hugging Face PEFT.

Importing fastpeft does not touch CUDA and needs neither a GPU, triton nor the compiled extension.  The public
names below are resolved on first use from the submodule that defines them (so ``import fastpeft`` stays light and
a missing optional dependency of one method cannot break the others).
"""

from __future__ import annotations

import importlib

from ._version import __version__  # noqa: E402

from . import functional, ops  # noqa: F401,E402
from ._backend import backend_info, select_backend  # noqa: E402

# public name -> submodule defining it
_EXPORTS = {
    # drop-in modules
    "LoRALinear": "fastpeft.modules",
    "AdaLoRALinear": "fastpeft.modules",
    "IA3Linear": "fastpeft.modules",
    # configs
    "PeftConfig": "fastpeft.config",
    "PeftType": "fastpeft.config",
    "TaskType": "fastpeft.config",
    "LoraConfig": "fastpeft.tuners.lora",
    "AdaLoraConfig": "fastpeft.tuners.adalora",
    "IA3Config": "fastpeft.tuners.ia3",
    "PromptTuningConfig": "fastpeft.tuners.prompt_tuning",
    "PromptTuningInit": "fastpeft.tuners.prompt_tuning",
    "PromptEncoderConfig": "fastpeft.tuners.p_tuning",
    "PrefixTuningConfig": "fastpeft.tuners.prefix_tuning",
    "AdaptionPromptConfig": "fastpeft.tuners.adaption_prompt",
    "BottleneckConfig": "fastpeft.tuners.bottleneck",
    # model API
    "PeftModel": "fastpeft.peft_model",
    "get_peft_model": "fastpeft.mapping",
    "get_peft_model_state_dict": "fastpeft.mapping",
    "set_peft_model_state_dict": "fastpeft.mapping",
    # quantized (bitsandbytes) bases
    "prepare_model_for_kbit_training": "fastpeft.utils.quantization",
    # speeding up models built by HF PEFT
    "accelerate": "fastpeft.integrations",
    "restore": "fastpeft.integrations",
}

__all__ = ["__version__", "backend_info", "functional", "ops", "select_backend", *_EXPORTS]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
    if mod != "fastpeft.modules":
        # Loading the method packages fills the config and tuner registries (they register themselves, from above),
        # so fastpeft.PeftConfig.from_pretrained and friends know every method.
        importlib.import_module("fastpeft.tuners")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
