"""Evaluation: exact accuracy over a split, and what eval.py does once its flags are parsed."""
