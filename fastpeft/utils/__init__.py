"""Helpers below the tuners: constants, adapter files on disk, module lookup and wrappers, quantized bases.

Nothing here imports a method package, the model API or the ops (dependencies point down into this package).
"""
