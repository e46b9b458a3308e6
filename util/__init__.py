"""Plumbing behind the paper files (model.py, train.py, evaluate.py): none of it is in the paper.
dist.py torchrun and collectives; backbone.py loading/saving Qwen2-VL checkpoints and the tiny
offline models; speed.py optimisations proven equal to the plain path; run.py checkpoints,
resume, logs, result files."""
