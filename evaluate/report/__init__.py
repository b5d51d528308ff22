"""The report across runs: tables, plots and the comparisons of arms."""
