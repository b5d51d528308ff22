"""Train stage (issue 4): labelled shards into device batches, baseline and ratio-ranked SAEs."""
