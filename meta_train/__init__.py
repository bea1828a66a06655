"""The learning-to-learn stage: meta-trains perturbation tuners per base model.

It imports zoft and is never imported by it.
"""
