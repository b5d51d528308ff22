"""Feature specialisation: the ratio r_i on held-out labelled text against a label-permutation null."""
