"""Which runs are the same run: a rerun is not a second seed.

Two run directories with the same resolved training config (seed included) or byte-identical SAE
weights are one SAE trained twice (a user who reruns a sweep gets exactly that). Counted as two
seeds they would show a spread of 0 and an interval of zero width, so the report keeps the first
(lowest run number) and says so in one line per duplicate. Runs are replicates of one arm only when
their resolved configs differ in nothing but the seed and the data order.
"""

from .inputs import weights_digest

NOT_THE_SAE = frozenset({
    "runs_dir", "shards", "wandb", "lockstep_group", "log_every", "checkpoint_every", "device", "resident",
})
"""Config keys that say where and how a run was driven, not what it trained (the store is named by
`shards_fingerprint`)."""
REPLICATE_KEYS = ("seed", "data_seed")


def resolved_config(train: dict) -> tuple:
    """The training config that decides the SAE, as a comparable value."""
    keep = {k: v for k, v in train.items() if k not in NOT_THE_SAE}
    if "shards_fingerprint" not in train:  # a run from before fingerprints: its store path is all we have
        keep["shards"] = train.get("shards")
    return tuple(sorted((k, repr(v)) for k, v in keep.items()))


def collapse_duplicates(loaded: list[dict]) -> tuple[list[dict], list[str]]:
    """The runs with every duplicate after the first left out, and one line per duplicate."""
    kept, notes = [], []
    first_by_config: dict[tuple, dict] = {}
    first_by_weights: dict[str, dict] = {}
    for data in loaded:
        config, digest = resolved_config(data["train"]), weights_digest(data["dir"])
        original, why = first_by_config.get(config), "same resolved config and seed"
        if original is None and digest is not None:
            original, why = first_by_weights.get(digest), "identical weights"
        if original is not None:
            notes.append(f"note: {data['dir'].name} is {original['dir'].name} again ({why}): counted once, "
                         f"as {original['dir'].name}")
            continue
        first_by_config[config] = data
        if digest is not None:
            first_by_weights[digest] = data
        kept.append(data)
    return kept, notes


def arm(train: dict) -> tuple:
    """The resolved config less the seed and the data order: runs with one arm are replicates."""
    return tuple((k, v) for k, v in resolved_config(train) if k not in REPLICATE_KEYS)


def replicate(train: dict) -> tuple:
    """What makes two runs of one arm two replicates: the initialisation seed and the data order."""
    return train.get("seed"), train.get("data_seed")
