"""Unlearning: select features from the store, clamp them, measure forget against retain damage, score."""
