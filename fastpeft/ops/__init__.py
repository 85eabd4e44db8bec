"""Ops: per op a torch reference, custom-op registration and autograd (see ``fastpeft.ops.lora``)."""

from . import dropout, ia3, lora  # noqa: F401  (importing registers the torch.ops.fastpeft.* custom ops)
