"""Harvest stage: run a causal LM up to one block and write its labelled activations to a shard store."""
