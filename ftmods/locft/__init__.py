"""LocFT-BF: localized, breadth-first fine-tuning for model editing.

"Fine-tuning Done Right in Model Editing", arXiv:2509.22072.
"""
