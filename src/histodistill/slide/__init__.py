"""Slide-level pretraining (SLPD, Yu, Lin & Xu, MICCAI 2023): regions of tile embeddings, a region ViT trained
with DINO plus intra- and inter-slide prototype distillation, and slide-level evaluation."""
