"""LoRA through peft (https://arxiv.org/abs/2106.09685): adapter, variants, trainee, memory, export.

Import the modules themselves (``pollinate.methods.lora.method``); this package imports nothing, so that
reading its settings needs no torch.
"""
