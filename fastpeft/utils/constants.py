"""File names and format constants shared by the config, the adapter files and the model API (HF PEFT's values)."""

from __future__ import annotations

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
# Sidecar file tying adapter_model.safetensors to the adapter_config.json written with it.  It holds the sha256 of the
# weights file and a fingerprint of the config.  The weights file and the config stay byte-for-byte HF PEFT's (PEFT
# warns about unknown config keys, and its files carry only {"format": "pt"} as metadata), and PEFT ignores other
# files in the directory.
SAVE_RECORD_NAME = "fastpeft_save.json"
# The HF PEFT release whose file format fastpeft writes; it goes into the file's "peft_version" key so that PEFT sees
# a version it knows.
PEFT_FORMAT_VERSION = "0.21.2"
# added to modules_to_save for SEQ_CLS (PEFT's order)
SEQ_CLS_HEAD_NAMES = ["classifier", "score"]
