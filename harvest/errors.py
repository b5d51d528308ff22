class HarvestError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable model): printed as one line."""
