"""Eval stage: unlearning, core metrics, feature specialisation, reports."""
