"""Adapter training and subgroup audits on frozen encoder features, as the seed papers do.

A folder of DICOMs and a CSV of 0/1 labels (optionally a folder of masks) -> frozen features,
extracted once and cached by file sha256 (`features.py`) -> linear heads trained on a split
(`heads.py`) -> held-out AUROC with bootstrap 95% CIs and Dice (`metrics.py`) -> a new bundle
with the adapters and the evaluation in its manifest (`train.py`). `audit.py` evaluates a
bundle per subgroup (sex, age band, manufacturer, view) and flags gaps.
"""
