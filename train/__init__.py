"""Train stage: labelled shards into device batches, baseline and ratio-ranked SAEs."""
