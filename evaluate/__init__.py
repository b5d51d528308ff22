"""Eval stage: one folder per measurement, the stage's shared pieces beside them.

- unlearning/: select, clamp, curve and score (the offline unlearning measurement)
- core/: reconstruction and spliced-model metrics
- specialization/: the dangerous/safe ratio of features against a permutation null
- saebench/: SAEBench's own evals through the sae-bench package
- browser/: the static feature browser
- report/: tables, plots and arm comparisons across runs
- shared: config (EvalConfig), cli and runner (one eval call over its targets), heldout (held-out
  documents), splice (the model with an SAE spliced in), measure (passes over held-out text),
  bootstrap (document resamples), resume, plots (per-run plots)
"""
