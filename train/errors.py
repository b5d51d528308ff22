class TrainError(Exception):
    """A problem the user can fix (bad option, unusable store, diverged run): printed as one line."""
