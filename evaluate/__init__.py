"""Eval stage (issue 5): unlearning, core metrics, feature specialisation, reports."""
