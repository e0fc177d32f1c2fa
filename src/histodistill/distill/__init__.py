"""Distillation: DINO (CLS) + iBOT (patch tokens) from a frozen teacher into a small student.

heads.py projection heads · centering.py teacher softmax centering / Sinkhorn-Knopp · losses.py the loss
terms as small pure-tensor functions · schedules.py per-iteration schedules precomputed as arrays ·
objectives.py the objectives (DINO+iBOT, feature) as plug-ins · trainer.py the loop, DDP, checkpoints.
"""
