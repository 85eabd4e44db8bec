"""fastpeft: parameter-efficient fine-tuning with fused kernels, compatible with Hugging Face PEFT.

Importing fastpeft does not touch CUDA and needs neither a GPU, triton nor the compiled extension.  The public
names below are resolved on first use from the submodule that defines them (so ``import fastpeft`` stays light and
a missing optional dependency of one method cannot break the others).
"""

from __future__ import annotations

import importlib

import importlib.abc
import importlib.util
import os
import sys

from ._version import __version__  # noqa: E402


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """``fastpeft.kernels`` and ``fastpeft.benchmarks`` for a source checkout that was never installed (the
    repository on ``PYTHONPATH`` or the working directory, e.g. ``benchmarks/gpu_check.sh`` while its ``pip install
    -e .`` is still building): setup.py maps them from the top-level ``kernels/`` and ``benchmarks/`` folders
    (``package_dir``), a mapping only an install creates.  Sits last on ``sys.meta_path``, so any install's own
    finder answers first; the folders are imported lazily, like any submodule."""

    def __init__(self, folders: dict):
        self.folders = folders

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 (the finder protocol's signature)
        folder = self.folders.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def _register_checkout_finder() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "setup.py")):
        return  # an installed package: its own layout (or finder) provides the subpackages
    folders = {f"fastpeft.{sub}": os.path.join(root, sub) for sub in ("kernels", "benchmarks")
               if os.path.isfile(os.path.join(root, sub, "__init__.py"))}
    if folders and not any(type(f).__name__ == "_CheckoutFinder" for f in sys.meta_path):  # once, even on reload
        sys.meta_path.append(_CheckoutFinder(folders))


_register_checkout_finder()

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
    "PromptLearningConfig": "fastpeft.config",
    "PromptEncoderReparameterizationType": "fastpeft.tuners.p_tuning",
    # model API
    "PeftModel": "fastpeft.peft_model",
    "PeftModelForCausalLM": "fastpeft.peft_model",
    "PeftModelForSeq2SeqLM": "fastpeft.peft_model",
    "PeftModelForSequenceClassification": "fastpeft.peft_model",
    "PeftModelForTokenClassification": "fastpeft.peft_model",
    "PeftModelForQuestionAnswering": "fastpeft.peft_model",
    "PeftModelForFeatureExtraction": "fastpeft.peft_model",
    "AutoPeftModel": "fastpeft.auto",
    "AutoPeftModelForCausalLM": "fastpeft.auto",
    "AutoPeftModelForSeq2SeqLM": "fastpeft.auto",
    "AutoPeftModelForSequenceClassification": "fastpeft.auto",
    "AutoPeftModelForTokenClassification": "fastpeft.auto",
    "AutoPeftModelForQuestionAnswering": "fastpeft.auto",
    "AutoPeftModelForFeatureExtraction": "fastpeft.auto",
    "get_peft_model": "fastpeft.mapping",
    "inject_adapter_in_model": "fastpeft.mapping",
    "get_peft_config": "fastpeft.mapping",
    "get_peft_model_state_dict": "fastpeft.mapping",
    "set_peft_model_state_dict": "fastpeft.mapping",
    "load_peft_weights": "fastpeft.mapping",
    "get_layer_status": "fastpeft.peft_model",
    "get_model_status": "fastpeft.peft_model",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "fastpeft.mapping",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "fastpeft.mapping",
    "PEFT_TYPE_TO_TUNER_MAPPING": "fastpeft.mapping",
    # tuners (the model inside a PeftModel: peft_model.base_model) and prompt encoders
    "LoraModel": "fastpeft.tuners.lora",
    "AdaLoraModel": "fastpeft.tuners.adalora",
    "IA3Model": "fastpeft.tuners.ia3",
    "PromptEmbedding": "fastpeft.tuners.prompt_tuning",
    "PromptEncoder": "fastpeft.tuners.p_tuning",
    "PrefixEncoder": "fastpeft.tuners.prefix_tuning",
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
