"""Fed-SB / LoRA-SB (https://arxiv.org/abs/2502.15436): ΔW = B R A with B and A frozen and shared, R
(r×r) the only tensor that trains and travels. Layers, initialisation, the averaging rule, the method.

Import the modules themselves (``pollinate.methods.lora_sb.method``); this package imports nothing, so
that reading its settings needs no torch.
"""
