"""The training configuration: one validated object per SAE, from YAML, a sweep file and flags.

Every field is a key of `configs/*.yaml`, of a sweep's `base:`/`grid:`, and a flag of
`pipeline train` (underscores become dashes). `train_config.json` records them all by these names.
"""

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from harvest.config import booleans_are_not_numbers, closest, closest_file, describe_validation_error
from harvest.errors import yaml_problem

from .errors import TrainError

TRAINERS = ("baseline", "ratio", "seed_halves", "seed_coactivation")
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
FIXED_L0_ARCHS = ("topk", "batchtopk", "matryoshka")
LOADER_KEYS = ("shards", "batch_size", "dangerous_fraction", "data_seed", "tokens", "window_chunks", "device",
               "resident")
"""Runs that agree on these can share every batch: a sweep trains each such group in lockstep."""


class TrainConfig(BaseModel):
    # inf or nan in a weight or rate would only surface as a non-finite loss after the run had started
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    shards: Path | None = None
    """Shard store to train on. Default: the only complete store under `shards/`."""
    trainer: Literal["baseline", "ratio", "seed_halves", "seed_coactivation"] = "ratio"
    """`baseline` (the seed's run 0), `ratio` (ratio-ranked orthogonality with true labels), or the seed's
    own variants `seed_halves` (runs 1-4) and `seed_coactivation` (runs 5-10), bugs included; see
    configs/seed/."""
    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = "relu"
    """SAE architecture (docs/architectures.md): `relu` (the seed's SAE, sparsity by `l1`), `topk` (the
    `k` largest pre-activations per token, Gao et al. 2024), `batchtopk` (the top `k` x batch over the
    batch, Bussmann et al. 2024; saved as a JumpReLU SAE with the threshold it learnt), `jumprelu`
    (learnt per-feature thresholds and an L0 term, Rajamanoharan et al. 2024) or `matryoshka` (BatchTopK
    whose nested prefixes of the dictionary each reconstruct the input, Bussmann et al. 2025; saved as
    a JumpReLU SAE, as SAELens does). Every trainer and the ratio penalty work with each."""
    ortho: float = Field(0.001, ge=0)
    """lambda_2, weight of the orthogonality term (ratio and seed trainers); 0 turns the ratio term off."""
    ortho_weighting: Literal["rank", "top", "uniform", "shuffled"] = "rank"
    """Feature weights s_i of the ratio term: `rank` (the seed's rank(r_i)/n, tied r at their average
    rank), `top` (1 for features with r above `ortho_top_r` that fired on at least `ortho_min_count`
    rows of the batch, else 0), or the controls `uniform` (1 for every feature that fired) and
    `shuffled` (`rank` with labels permuted within each batch)."""
    ortho_top_r: float = Field(0.9, ge=0, lt=1)
    """`top` weighting: the ratio r_i = a_d / (a_d + a_s) a feature must exceed (0.9: its mean activation
    on dangerous rows is over 9x that on safe rows; the eval's dangerous-specific threshold)."""
    ortho_min_count: int = Field(10, ge=1)
    """`top` weighting: the rows of the batch a feature must fire on, so that a ratio from a handful of
    tokens does not count."""
    ortho_normalize: Literal["sum", "mean"] = "sum"
    """`sum` (the seed's): sum over pairs i != j of s_i s_j |cos(w_i, w_j)|; `mean`: that divided by the
    sum of s_i s_j over the pairs, a weighted mean |cos| in [0, 1], so that lambda_2 means the same at
    every d_sae and weighting."""
    ortho_rows: float = Field(1.0, gt=0, le=1)
    """`ratio` trainer: fraction of the term's rows sampled each step. 1 (every row) is the exact term;
    below 1, an unbiased estimate of it and of its gradient from the pairs with at least one row among
    ceil(ortho_rows x n) weighted rows (n: d_sae, or `top`'s capacity) drawn by the run's seed and the
    step, Horvitz-Thompson weighted (train/losses.py), at about 2 ortho_rows - ortho_rows^2 of the cost
    and with a noisier gradient: 0.2 puts the term at 31% of a step's matmuls at d_sae 16384, batch 4096
    (docs/scaling.md)."""
    l1: float = Field(0.04, ge=0)
    """lambda_1, weight of mean ||f||_1 (`relu`; the starting value when `target_l0` adapts it)."""
    k: int = Field(32, gt=0)
    """`topk`: features kept per token; `batchtopk`, `matryoshka`: per token on average over the batch."""
    aux_k: int | None = Field(None, gt=0)
    """`topk`, `batchtopk`: dead features in the AuxK loss per token. Default: d_in / 2 (Gao et al.'s
    heuristic, as SAELens, sparsify and dictionary_learning use)."""
    aux_coeff: float = Field(1 / 32, ge=0)
    """`topk`, `batchtopk`: weight of the AuxK loss (Gao et al.'s 1/32 on the residual-variance
    normalised loss, as dictionary_learning and sparsify's scripts; 0 turns it off). A feature is dead
    for it after `dead_after_tokens` tokens without firing."""
    l0_coeff: float = Field(1.0, ge=0)
    """`jumprelu`: weight of the L0 term (SAELens' `l0_coefficient`, its default; the starting value when
    `target_l0` adapts it)."""
    bandwidth: float = Field(0.05, gt=0)
    """`jumprelu`: width of the straight-through estimators' rectangle kernel (SAELens' default)."""
    threshold_init: float = Field(0.01, ge=0)
    """`jumprelu`: initial threshold of every feature (SAELens' default)."""
    batchtopk_threshold_lr: float = Field(0.01, gt=0, le=1)
    """`batchtopk`: rate of the moving average that learns the inference threshold from each batch's
    smallest kept activation (SAELens' `topk_threshold_lr`); `matryoshka` too."""
    matryoshka_groups: list[float] = Field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32],
                                           min_length=1)
    """`matryoshka`: the sizes of the nested groups, as fractions of dict_size summing to 1, innermost
    first (dictionary_learning's `group_fractions`; its demo's 1/32, 1/16, 1/8, 1/4, 17/32 by default).
    Group i has int(fraction x dict_size) features, the last the rest; prefix i (groups 1..i) is
    trained to reconstruct the input alone. On the command line: repeat the flag, one per group."""
    matryoshka_weights: list[float] | None = None
    """`matryoshka`: the weight of each prefix's reconstruction loss, one per group (the last is the
    whole SAE's). Default: 1 each, SAELens' sum; dictionary_learning's default 1/n each is the same
    loss scaled down, its AuxK and any ratio term then n times heavier."""
    target_l0: float | None = Field(None, gt=0)
    """`relu`, `jumprelu`: adapt the sparsity coefficient (`l1`, `l0_coeff`: their value is the start)
    during training so that L0 ends near this many features per token. A PI controller on the log of
    the coefficient, fed each step's L0: c = c_0 exp(gain phi e_t + rate sum phi e), with
    e = log((L0 + 1) / (R_t + 1)) clipped to [-1, 1], R_t a reference that glides from the first
    step's L0 to the target (`target_l0_ramp`) and phi the learning-rate schedule's factor
    (docs/architectures.md). `topk`/`batchtopk` fix L0 by k."""
    target_l0_gain: float = Field(1.0, ge=0)
    """`target_l0`: the controller's proportional gain (how much the coefficient answers the current
    error at once)."""
    target_l0_ramp: float = Field(0.7, ge=0, le=1)
    """`target_l0`: the point of the run (a fraction of its steps) by which the controller's reference
    has glided geometrically from the first step's L0 down to the target; the glide starts when the
    learning-rate warm-up ends, and the reference holds the target from then to the last step (0:
    aim at the target from the first step). A ReLU SAE driven at the target at once falls below it
    and does not come back."""
    target_l0_rate: float = Field(0.02, gt=0, le=1)
    """`target_l0`: the controller's integral rate per step (how fast a lasting error moves the
    coefficient: at most a factor e^rate per step)."""
    routed_latents: int = Field(0, ge=0)
    """Route the SAE's last N latents to dangerous text (gradient routing, Cloud et al. 2024): during
    training they may not fire on safe rows (masked before the activation; for `topk`/`batchtopk` before
    the top-k choice). At inference nothing is masked; cfg.json records the block. 0: none. Any
    architecture and trainer but `seed_halves`; not with `supervised_latents`."""
    routing: Literal["activation", "gradient"] = "activation"
    """`routed_latents`: `activation` (the mask alone) or `gradient` (also, on dangerous rows, the other
    latents fire and reconstruct detached: their encoder and decoder learn from safe rows alone)."""
    supervised_latents: int = Field(0, ge=0)
    """Tie the SAE's last N latents to the label (G-SAE, Härle et al. 2025): a binary cross-entropy term
    between each row's largest block pre-activation, as a logit, and its dangerous label, weighted by
    `supervision_coeff`. cfg.json records the block. 0: none."""
    supervision_coeff: float = Field(0.1, gt=0)
    """`supervised_latents`: weight of the block's cross-entropy term."""
    permute_labels: Literal["none", "document"] = "none"
    """The control for label-aware training: `document` gives each document of the store the dangerous/safe
    label of another, by a permutation of the documents' labels seeded by `seed` (each seed draws its own),
    so as many documents are dangerous as before and a document's rows share one label, but which ones
    are dangerous is random. Everything label-aware in training (the ratio term's rates, routed and
    supervised latents) reads these labels; the batches stay those the true labels stratify, shared with
    the rest of the lockstep group. cfg.json records it under `metadata.label_permutation`. `none`: the
    store's labels."""
    lr: float = Field(3e-4, gt=0)
    """Adam learning rate."""
    warmup_steps: int = Field(1000, ge=0)
    """Linear learning-rate warm-up, in steps."""
    lr_decay_fraction: float = Field(0.0, ge=0, lt=1)
    """Linear learning-rate decay to zero over this last fraction of the run's steps (dictionary_learning's
    TopK trainer decays over the last 0.2; SAELens has `lr_decay_steps`); 0: constant after the warm-up.
    The end of a run then settles instead of stopping mid-stride, so its reconstruction flattens sooner."""
    dict_size: int | None = Field(None, gt=0)
    """Number of SAE features (d_sae). Default: the store's d_model (the seed's 1x expansion)."""
    tokens: int | None = Field(None, gt=0)
    """Training tokens; steps = tokens // batch_size. Default: the store's committed rows (one pass).
    More than the store holds means several epochs."""
    batch_size: int = Field(2048, gt=1)
    """Rows per step."""
    dangerous_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of every batch drawn from dangerous rows (stratified batches)."""
    seed: int = 0
    """Seeds the SAE's initialisation."""
    data_seed: int = 0
    """Seeds the batch order (shared by all SAEs of a lockstep group)."""
    b_dec_init: Literal["mean", "zeros", "store_mean"] = "mean"
    """Initial decoder bias: the mean activation of the first batches (SAELens' `mean`), zeros, or
    `store_mean`, the mean over every row of the store (from its statistics, see `normalize`).
    Gemma-family residual streams carry dimensions with a large constant offset that an SAE
    otherwise spends thousands of steps learning."""
    normalize: Literal["none", "expected_norm", "store_norm"] = "none"
    """`expected_norm`: scale inputs by sqrt(d_in) / E||x|| (estimated on the first batches), as
    Gemma Scope and dictionary_learning do, so that l1 means the same across models and layers.
    `store_norm`: the same with E||x|| over every row of the store, from `<store>/stats.json`
    (`pipeline stats`); if that file is missing or no longer describes the store, training first
    computes it (one pass over the store, said on stderr) and saves it there for the next run. The
    saved SAE reads raw activations: the scale is folded into b_enc and b_dec (decoder rows stay
    unit-norm; feature activations carry the same factor)."""
    recon: Literal["l2", "mse"] | None = None
    """Reconstruction term: mean ||x - x_hat||_2 (`l2`, the seed's template) or its square (`mse`,
    as SAELens and dictionary_learning train). Default: `l2` for `relu` (so the seed's presets and
    every earlier run keep their meaning), `mse` for the other architectures."""
    window_chunks: int = Field(32, gt=0)
    """Chunks per shuffle window of the loader."""
    ortho_block: int | None = Field(None, gt=0)
    """Rows per square block of the pairwise term (memory: two ortho_block x ortho_block float32
    matrices). Default: 4096 on CUDA (fewer, larger matmuls keep the GPU busy: 128 MiB), 2048 elsewhere."""
    device: str = "auto"
    """`auto` (CUDA if present), `cpu`, `cuda`, `cuda:N`."""
    autocast: bool | None = None
    """bf16 autocast of the SAE's matmuls and of the ratio term's Gram blocks (parameters, optimiser state,
    losses and the term's sums stay float32). Default: by hardware, on where bf16 is native (a CUDA GPU with bf16 tensor cores, a CPU
    with AMX or AVX-512-BF16), off elsewhere (an AVX2 CPU runs bf16 ~100x slower than float32); on
    CUDA the matmuls left in float32 run as TF32 either way. `true` on a CPU without native bf16 is
    refused; `false` keeps float32 (TF32 on CUDA)."""
    resident: bool | None = None
    """Load the whole store onto the device once. Default: when the store (bf16) and one step's buffers
    take at most 90% of the GPU memory left free once the SAEs and their Adam state are allocated."""
    log_every: int = Field(50, gt=0)
    """Steps between rows of metrics.jsonl."""
    checkpoint_every: int = Field(500, gt=0)
    """Steps between checkpoints (what --resume continues from)."""
    dead_after_tokens: int = Field(1_000_000, gt=0)
    """A feature that has not fired for this many tokens counts as dead."""
    runs_dir: Path = Path("runs")
    """Where run directories `run_<N>` are created."""
    wandb: str | None = None
    """Weights & Biases project to log every run's metrics to (one W&B run per SAE, named after its run
    directory, resumed with it; files under `<run>/wandb/`). Needs the `wandb` extra
    (`pip install 'ratio-sae[wandb]'`); `WANDB_MODE=offline` logs without a network."""
    halves_split: int | None = Field(None, gt=0)
    """seed_halves: rows [0, split) of a batch play "dangerous", the rest "safe" (default batch/2).
    The seed's run 4 used 2048 on 2048-row batches: an empty half, NaN ratios, fixed ranks."""
    coact_weight: Literal["sigmoid5", "square", "cube", "cube_sigmoid_mean", "cube_log_mean"] = "cube"
    """seed_coactivation: weight of each pair from the features' co-activation c (runs 5-10):
    sigmoid(5c), c^2, c^3, c^3 sigmoid(m_i m_j), c^3 log1p(m_i m_j)/max."""
    ortho_lr_warmup: bool = False
    """seed_coactivation: scale the term by lr / max lr (the seed's runs 8-10)."""

    _no_booleans_for_numbers = field_validator("*", mode="before")(classmethod(booleans_are_not_numbers))

    @model_validator(mode="after")
    def _resolve_and_check(self):
        if self.arch == "matryoshka":
            _check_matryoshka(self.matryoshka_groups, self.matryoshka_weights)
        if self.recon is None:
            self.recon = "l2" if self.arch == "relu" else "mse"
        if self.target_l0 is not None:
            if self.arch in FIXED_L0_ARCHS:
                raise PydanticCustomError("target_l0", "target_l0 adapts the sparsity coefficient of relu and "
                                          "jumprelu; {arch} fixes L0 with k", {"arch": self.arch})
            coefficient = "l1" if self.arch == "relu" else "l0_coeff"
            if getattr(self, coefficient) == 0:
                raise PydanticCustomError("target_l0", "target_l0 scales {option} multiplicatively, so it must "
                                          "start above 0", {"option": coefficient})
        return self

    @model_validator(mode="after")
    def _check_label_blocks(self):
        if self.routed_latents and self.supervised_latents:
            raise PydanticCustomError("routed_latents", "routed_latents and supervised_latents are two kinds of "
                                      "label block; an SAE has at most one: set one of them to 0", {})
        if self.routing != "activation" and not self.routed_latents:
            raise PydanticCustomError("routing", "routing {routing} needs routed_latents > 0 (there is no block "
                                      "to route)", {"routing": self.routing})
        if self.routing == "gradient" and self.arch == "matryoshka":
            raise PydanticCustomError("routing", "routing gradient decodes dangerous rows through a detached "
                                      "decoder, which matryoshka's nested decode does not do: use routing "
                                      "activation with matryoshka", {})
        if (self.routed_latents or self.supervised_latents) and self.trainer == "seed_halves":
            raise PydanticCustomError("trainer", "seed_halves shuffles each batch's rows, so a step no longer "
                                      "knows which are dangerous: label blocks cannot train with it", {})
        return self

    def group_key(self) -> tuple:
        return tuple(str(getattr(self, k)) for k in LOADER_KEYS)


def _check_matryoshka(groups: list[float], weights: list[float] | None) -> None:
    if min(groups) <= 0:
        raise PydanticCustomError("matryoshka_groups", "matryoshka_groups must be fractions of dict_size above 0")
    if abs(sum(groups) - 1) > 1e-6:
        raise PydanticCustomError("matryoshka_groups", "matryoshka_groups must sum to 1 (they sum to {total})",
                                  {"total": round(sum(groups), 6)})
    if weights is not None and len(weights) != len(groups):
        raise PydanticCustomError("matryoshka_weights", "matryoshka_weights needs one weight per group: {n} "
                                  "weights for {groups} groups", {"n": len(weights), "groups": len(groups)})
    if weights is not None and min(weights) < 0:
        raise PydanticCustomError("matryoshka_weights", "matryoshka_weights must be >= 0")


def validate(data: dict[str, Any], where: str, model: type[BaseModel] | None = None):
    """`model` (default TrainConfig) from `data`, or one line naming every bad key."""
    try:
        return (model or TrainConfig).model_validate(data)
    except ValidationError as exc:
        raise TrainError(f"invalid {where}: {describe_validation_error(exc, model or TrainConfig)}") from None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainError(f"file not found: {path}{closest_file(Path(path))}") from None
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise TrainError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise TrainError(f"{path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path} must hold a mapping of keys to values")
    return data


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    data = read_yaml(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(data, f"training config{f' {path}' if path else ''}")


def load_sweep(path: Path, overrides: dict[str, Any]) -> list[TrainConfig]:
    """A sweep file: `base:` (options) and `grid:` (option -> list of values); runs are the grid's product.

    `grid:` may also be a list of such mappings: the runs are then the union of their products, in
    order (e.g. one lambda_2 = 0 arm plus lambda_2 x weighting, without repeating the baseline for
    every weighting). Flags given on the command line override `base:`, never the grid.
    """
    data = read_yaml(path)
    if not data:
        raise TrainError(f"sweep {path} is empty: give base: (options) and grid: (option -> list of values); "
                         "for a single run use --config")
    unknown = set(data) - {"base", "grid"}
    if unknown:
        hints = "".join(closest(k, ("base", "grid")) for k in sorted(unknown))
        raise TrainError(f"sweep {path}: unknown top-level key(s) {sorted(unknown)}{hints}; use base: and grid:")
    if not isinstance(data.get("base") or {}, dict):
        raise TrainError(f"sweep {path}: base must map options to values")
    flags = {k: v for k, v in overrides.items() if v is not None}
    base = {**(data.get("base") or {}), **flags}
    grids = data.get("grid")
    if not grids:
        raise TrainError(f"sweep {path} has no grid (option -> list of values), so it sweeps nothing; "
                         "for a single run use --config")
    grids = grids if isinstance(grids, list) else [grids]
    for grid in grids:
        if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise TrainError(f"sweep {path}: grid must map each option to a non-empty list of values "
                             "(or be a list of such mappings)")
    overridden = sorted({k for grid in grids for k in grid} & set(flags))
    if overridden:  # the grid sets these for each run: the flag would be silently ignored
        key = overridden[0]
        values = [v for grid in grids for v in grid.get(key, [])]
        raise TrainError(f"sweep {path}: --{key.replace('_', '-')} {flags[key]} was given on the command line, but the "
                         f"grid sets {key} for each run ({', '.join(map(str, values))}); drop the flag, or {key} "
                         "from the grid")
    for key in [*base, *(k for grid in grids for k in grid)]:
        if key not in TrainConfig.model_fields:
            raise TrainError(f"sweep {path}: unknown option {key!r}{closest(key, TrainConfig.model_fields)}")
    runs = []
    for grid in grids:
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            runs.append(validate({**base, **point}, f"sweep {path} run {point}"))
    return runs
