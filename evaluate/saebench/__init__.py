"""SAEBench's own unlearning and core evals, run through the sae-bench package."""
