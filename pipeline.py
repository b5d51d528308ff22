"""The `pipeline` command: parses flags and dispatches to the stages. No work happens here."""

import errno
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from harvest.config import HarvestConfig
from harvest.errors import HarvestError, Interrupted
from train.config import TrainConfig
from train.errors import TrainError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Harvest a model's activations once into labelled Zarr shards; train and evaluate SAEs from them.")
_DEBUG = {"on": False}
_PATH_PROBLEMS = {
    errno.EACCES: "choose a place you can write to, or change its permissions",
    errno.EPERM: "choose a place you can write to, or change its permissions",
    errno.EROFS: "choose a place on a writable file system",
    errno.ENAMETOOLONG: "choose a shorter name or path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory; name a file",
}
"""OSErrors that name a path the user gave and can fix: one line, exit 2 (bad input), not "unexpected"."""


def _doc(field: str) -> str:
    return HarvestConfig.model_fields[field].description or ""


def _edoc(field: str) -> str:
    from evaluate.config import EvalConfig

    return EvalConfig.model_fields[field].description or ""


def _tdoc(field: str) -> str:
    return TrainConfig.model_fields[field].description or ""


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False):
    _DEBUG["on"] = debug


@app.command()
def harvest(
    config: Annotated[Optional[Path], typer.Option(help="YAML config; flags override its keys.")] = None,
    model: Annotated[Optional[str], typer.Option(help=_doc("model"))] = None,
    revision: Annotated[Optional[str], typer.Option(help=_doc("revision"))] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code", help=_doc("trust_remote_code"))] = None,
    layer: Annotated[Optional[int], typer.Option(help=_doc("layer"))] = None,
    dangerous: Annotated[Optional[list[str]], typer.Option(help="Dangerous source (repeatable): a .jsonl/.txt/.parquet file or directory, hf:<id>[:<config>], or builtin:<name>. Replaces the config's list.")] = None,
    safe: Annotated[Optional[list[str]], typer.Option(help="Safe source (repeatable), as --dangerous.")] = None,
    tokens: Annotated[Optional[int], typer.Option(help=_doc("tokens"))] = None,
    dangerous_fraction: Annotated[Optional[float], typer.Option(help=_doc("dangerous_fraction"))] = None,
    context_length: Annotated[Optional[int], typer.Option(help=_doc("context_length"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_doc("batch_size"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_doc("seed"))] = None,
    interleave: Annotated[Optional[str], typer.Option(help=_doc("interleave"))] = None,
    dtype: Annotated[Optional[str], typer.Option(help=_doc("dtype"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_doc("device"))] = None,
    codec: Annotated[Optional[str], typer.Option(help=_doc("codec"))] = None,
    clevel: Annotated[Optional[int], typer.Option(help=_doc("clevel"))] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help=_doc("chunk_rows"))] = None,
    out: Annotated[Optional[Path], typer.Option(help=_doc("out"))] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store at --out instead of resuming it.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Run a model up to --layer over labelled text and store the block's output, token by token.

    Rerunning the same command resumes a harvest that was stopped or killed. With no --config and no
    --model, `--layer N` targets google/gemma-2-2b with configs/gemma-2-2b.yaml.
    """
    from harvest.config import load_config
    from harvest.harvester import harvest as run_harvest
    from harvest.info import summary

    if config is None and model is None:
        config = Path(__file__).resolve().parent / "configs" / "gemma-2-2b.yaml"
    overrides = dict(model=model, revision=revision, trust_remote_code=trust_remote_code, layer=layer,
                     dangerous=dangerous, safe=safe, tokens=tokens, dangerous_fraction=dangerous_fraction,
                     context_length=context_length, batch_size=batch_size, seed=seed, interleave=interleave,
                     dtype=dtype, device=device, codec=codec, clevel=clevel, chunk_rows=chunk_rows, out=out)
    cfg = load_config(config, overrides)
    result = run_harvest(cfg, overwrite=overwrite, progress=progress)
    if not result.main_process:  # one of several `accelerate launch` processes: the main one reports
        return
    if result.already_complete:
        typer.echo(f"The store at {result.store.path} is already complete for this config; nothing to do.")
    typer.echo(summary(result.store, result.rows_written, result.seconds))


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Path of a shard store.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print every fact as JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also read every committed chunk and check its checksum; exit 2 if any is corrupt.")] = False,
):
    """Describe a shard store: attributes, rows per label and source, committed or not, size on disk."""
    from harvest.info import describe, verify_report
    from harvest.store import ShardStore

    opened = ShardStore.open(store)
    if verify:  # first: describing reads the labels, and a corrupt label chunk would stop it
        report, intact = verify_report(opened)
        if not intact:
            typer.echo(report)
            _fail(f"{store}: corrupt chunks (listed above); restore them or re-harvest (pipeline harvest --overwrite)")
    typer.echo(describe(opened, as_json=json_output))
    if verify and not json_output:
        typer.echo(report)


@app.command()
def stats(
    store: Annotated[Path, typer.Argument(help="Path of a shard store.")],
    out: Annotated[Optional[Path], typer.Option(help="JSON file to write (default: <store>/stats.json, where `--normalize store_norm` looks).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Run on dask.distributed (if installed): a scheduler address such as tcp://host:8786, or local:N for N local worker processes. Default: threads in this process.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Per-dimension mean and variance, L2 norms per label and source, tokens per source and document."""
    from harvest.stats import run_stats

    typer.echo(run_stats(store, out=out, scheduler=scheduler, progress=progress))


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (e.g. configs/seed/run_3.yaml); flags override it.")] = None,
    sweep: Annotated[Optional[Path], typer.Option(help="Sweep YAML (base: options, grid: option -> values); each group of runs that shares its batches trains in lockstep.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a stopped run (run_N or its directory), with the rest of its lockstep group.")] = None,
    dask: Annotated[Optional[str], typer.Option(help="Train the sweep's lockstep groups on a dask.distributed cluster, one group per worker: a scheduler address (tcp://host:8786) or local:N (N worker processes here).")] = None,
    shards: Annotated[Optional[Path], typer.Option(help=_tdoc("shards"))] = None,
    trainer: Annotated[Optional[str], typer.Option(help=_tdoc("trainer"))] = None,
    arch: Annotated[Optional[str], typer.Option(help=_tdoc("arch"))] = None,
    ortho: Annotated[Optional[float], typer.Option(help=_tdoc("ortho"))] = None,
    ortho_weighting: Annotated[Optional[str], typer.Option(help=_tdoc("ortho_weighting"))] = None,
    ortho_top_r: Annotated[Optional[float], typer.Option(help=_tdoc("ortho_top_r"))] = None,
    ortho_min_count: Annotated[Optional[int], typer.Option(help=_tdoc("ortho_min_count"))] = None,
    ortho_normalize: Annotated[Optional[str], typer.Option(help=_tdoc("ortho_normalize"))] = None,
    l1: Annotated[Optional[float], typer.Option(help=_tdoc("l1"))] = None,
    k: Annotated[Optional[int], typer.Option(help=_tdoc("k"))] = None,
    aux_k: Annotated[Optional[int], typer.Option(help=_tdoc("aux_k"))] = None,
    aux_coeff: Annotated[Optional[float], typer.Option(help=_tdoc("aux_coeff"))] = None,
    l0_coeff: Annotated[Optional[float], typer.Option(help=_tdoc("l0_coeff"))] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help=_tdoc("bandwidth"))] = None,
    threshold_init: Annotated[Optional[float], typer.Option(help=_tdoc("threshold_init"))] = None,
    batchtopk_threshold_lr: Annotated[Optional[float], typer.Option(help=_tdoc("batchtopk_threshold_lr"))] = None,
    target_l0: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0"))] = None,
    target_l0_gain: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0_gain"))] = None,
    target_l0_rate: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0_rate"))] = None,
    target_l0_ramp: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0_ramp"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_tdoc("lr"))] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=_tdoc("warmup_steps"))] = None,
    lr_decay_fraction: Annotated[Optional[float], typer.Option(help=_tdoc("lr_decay_fraction"))] = None,
    dict_size: Annotated[Optional[int], typer.Option(help=_tdoc("dict_size"))] = None,
    tokens: Annotated[Optional[int], typer.Option(help=_tdoc("tokens"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_tdoc("batch_size"))] = None,
    dangerous_fraction: Annotated[Optional[float], typer.Option(help=_tdoc("dangerous_fraction"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_tdoc("seed"))] = None,
    data_seed: Annotated[Optional[int], typer.Option(help=_tdoc("data_seed"))] = None,
    recon: Annotated[Optional[str], typer.Option(help=_tdoc("recon"))] = None,
    b_dec_init: Annotated[Optional[str], typer.Option(help=_tdoc("b_dec_init"))] = None,
    normalize: Annotated[Optional[str], typer.Option(help=_tdoc("normalize"))] = None,
    window_chunks: Annotated[Optional[int], typer.Option(help=_tdoc("window_chunks"))] = None,
    ortho_block: Annotated[Optional[int], typer.Option(help=_tdoc("ortho_block"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_tdoc("device"))] = None,
    autocast: Annotated[Optional[bool], typer.Option("--autocast/--no-autocast", help=_tdoc("autocast"))] = None,
    resident: Annotated[Optional[bool], typer.Option("--resident/--streamed", help=_tdoc("resident"))] = None,
    log_every: Annotated[Optional[int], typer.Option(help=_tdoc("log_every"))] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help=_tdoc("checkpoint_every"))] = None,
    dead_after_tokens: Annotated[Optional[int], typer.Option(help=_tdoc("dead_after_tokens"))] = None,
    runs_dir: Annotated[Optional[Path], typer.Option(help=_tdoc("runs_dir"))] = None,
    wandb: Annotated[Optional[str], typer.Option(help=_tdoc("wandb"))] = None,
    halves_split: Annotated[Optional[int], typer.Option(help=_tdoc("halves_split"))] = None,
    coact_weight: Annotated[Optional[str], typer.Option(help=_tdoc("coact_weight"))] = None,
    ortho_lr_warmup: Annotated[Optional[bool], typer.Option("--ortho-lr-warmup", help=_tdoc("ortho_lr_warmup"))] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train SAEs on a shard store: one run (`--ortho 0.001`), a preset (`--config`), or a sweep in lockstep."""
    from train.cli import run_train

    overrides = dict(shards=shards, trainer=trainer, ortho=ortho, l1=l1, lr=lr, warmup_steps=warmup_steps,
                     lr_decay_fraction=lr_decay_fraction, dict_size=dict_size, tokens=tokens, batch_size=batch_size, dangerous_fraction=dangerous_fraction,
                     seed=seed, data_seed=data_seed, recon=recon, b_dec_init=b_dec_init, normalize=normalize, window_chunks=window_chunks, ortho_block=ortho_block,
                     device=device, autocast=autocast, resident=resident, log_every=log_every,
                     checkpoint_every=checkpoint_every, dead_after_tokens=dead_after_tokens, runs_dir=runs_dir,
                     halves_split=halves_split, coact_weight=coact_weight, ortho_lr_warmup=ortho_lr_warmup,
                     arch=arch, ortho_weighting=ortho_weighting, ortho_top_r=ortho_top_r,
                     ortho_min_count=ortho_min_count, ortho_normalize=ortho_normalize, k=k, aux_k=aux_k,
                     aux_coeff=aux_coeff, l0_coeff=l0_coeff, bandwidth=bandwidth, threshold_init=threshold_init,
                     batchtopk_threshold_lr=batchtopk_threshold_lr, target_l0=target_l0,
                     target_l0_gain=target_l0_gain, target_l0_rate=target_l0_rate,
                     target_l0_ramp=target_l0_ramp, wandb=wandb)
    for line in run_train(config=config, sweep=sweep, resume=resume, overrides=overrides, progress=progress,
                          dask=dask):
        typer.echo(line)


@app.command(name="eval")
def eval_(
    runs: Annotated[list[str], typer.Argument(help="Runs: run_N, N, or a run directory; with --shards, also SAELens-format SAE directories.")],
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    config: Annotated[Optional[Path], typer.Option(help="YAML eval config (e.g. configs/eval-demo.yaml); flags override it.")] = None,
    suite: Annotated[Optional[list[str]], typer.Option(help="unlearning, core, specialization (repeatable).")] = None,
    shards: Annotated[Optional[Path], typer.Option(help="The shard store an SAE directory that is not a run of this project (SAELens files: cfg.json, sae_weights.safetensors) reads: its model, layer and sources; results go to DIR/eval/.")] = None,
    heldout_docs: Annotated[Optional[int], typer.Option(help=_edoc("heldout_docs"))] = None,
    heldout_doc_tokens: Annotated[Optional[int], typer.Option(help=_edoc("heldout_doc_tokens"))] = None,
    heldout_tokens: Annotated[Optional[int], typer.Option(help=_edoc("heldout_tokens"))] = None,
    select_from: Annotated[Optional[str], typer.Option(help=_edoc("select_from"))] = None,
    select_tokens: Annotated[Optional[int], typer.Option(help=_edoc("select_tokens"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_edoc("batch_size"))] = None,
    retain_thresholds: Annotated[Optional[list[float]], typer.Option("--retain-threshold", help=_edoc("retain_thresholds"))] = None,
    n_features: Annotated[Optional[list[int]], typer.Option("--n-features", help=_edoc("n_features"))] = None,
    multipliers: Annotated[Optional[list[float]], typer.Option("--multiplier", help=_edoc("multipliers"))] = None,
    retain_tolerance: Annotated[Optional[float], typer.Option(help=_edoc("retain_tolerance"))] = None,
    score_at: Annotated[Optional[list[float]], typer.Option("--score-at", help=_edoc("score_at"))] = None,
    primary: Annotated[Optional[float], typer.Option(help=_edoc("primary"))] = None,
    multiplier_range: Annotated[Optional[tuple[float, float]], typer.Option(help=_edoc("multiplier_range"))] = None,
    root_tolerance: Annotated[Optional[float], typer.Option(help=_edoc("root_tolerance"))] = None,
    bracket_step: Annotated[Optional[float], typer.Option(help=_edoc("bracket_step"))] = None,
    retain_sets: Annotated[Optional[list[str]], typer.Option("--retain-set", help=_edoc("retain_sets"))] = None,
    primary_retain_set: Annotated[Optional[str], typer.Option(help=_edoc("primary_retain_set"))] = None,
    bootstrap_resamples: Annotated[Optional[int], typer.Option(help=_edoc("bootstrap_resamples"))] = None,
    min_fires: Annotated[Optional[int], typer.Option(help=_edoc("min_fires"))] = None,
    null_permutations: Annotated[Optional[int], typer.Option(help=_edoc("null_permutations"))] = None,
    controls: Annotated[Optional[list[str]], typer.Option("--control", help=_edoc("controls"))] = None,
    control_repeats: Annotated[Optional[int], typer.Option(help=_edoc("control_repeats"))] = None,
    r_threshold: Annotated[Optional[float], typer.Option(help=_edoc("r_threshold"))] = None,
    min_rate: Annotated[Optional[float], typer.Option(help=_edoc("min_rate"))] = None,
    dense_rate: Annotated[Optional[float], typer.Option(help=_edoc("dense_rate"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_edoc("seed"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_edoc("device"))] = None,
    dtype: Annotated[Optional[str], typer.Option(help=_edoc("dtype"))] = None,
    saebench: Annotated[bool, typer.Option("--saebench", help="Run SAEBench's own evals instead of the offline suite: unlearning (gemma-2-2b-it, WMDP/MMLU) and core, as --suite selects. Needs .venv-saebench (make saebench-env).")] = False,
    saebench_model: Annotated[Optional[str], typer.Option(help=_edoc("saebench_model"))] = None,
    saebench_forget_corpus: Annotated[Optional[Path], typer.Option(help=_edoc("saebench_forget_corpus"))] = None,
    saebench_artifacts: Annotated[Optional[Path], typer.Option(help=_edoc("saebench_artifacts"))] = None,
    saebench_llm_batch_size: Annotated[Optional[int], typer.Option(help=_edoc("saebench_llm_batch_size"))] = None,
    saebench_llm_dtype: Annotated[Optional[str], typer.Option(help=_edoc("saebench_llm_dtype"))] = None,
    saebench_dataset_size: Annotated[Optional[int], typer.Option(help=_edoc("saebench_dataset_size"))] = None,
    saebench_seq_len: Annotated[Optional[int], typer.Option(help=_edoc("saebench_seq_len"))] = None,
    saebench_core_dataset: Annotated[Optional[str], typer.Option(help=_edoc("saebench_core_dataset"))] = None,
    saebench_core_context: Annotated[Optional[int], typer.Option(help=_edoc("saebench_core_context"))] = None,
    saebench_core_batches: Annotated[Optional[int], typer.Option(help=_edoc("saebench_core_batches"))] = None,
    saebench_baseline_min: Annotated[Optional[float], typer.Option(help=_edoc("saebench_baseline_min"))] = None,
):
    """Evaluate runs (unlearning, core, specialisation) into each run's eval/; --saebench for SAEBench's own."""
    from evaluate.cli import run_eval

    overrides = dict(suite=suite, heldout_docs=heldout_docs, heldout_doc_tokens=heldout_doc_tokens,
                     heldout_tokens=heldout_tokens, select_from=select_from, select_tokens=select_tokens,
                     score_at=score_at, primary=primary, multiplier_range=multiplier_range,
                     root_tolerance=root_tolerance, bracket_step=bracket_step, retain_sets=retain_sets,
                     primary_retain_set=primary_retain_set, bootstrap_resamples=bootstrap_resamples,
                     min_fires=min_fires, null_permutations=null_permutations, batch_size=batch_size,
                     retain_thresholds=retain_thresholds, n_features=n_features, multipliers=multipliers,
                     retain_tolerance=retain_tolerance, controls=controls, control_repeats=control_repeats, r_threshold=r_threshold,
                     min_rate=min_rate, dense_rate=dense_rate, seed=seed, device=device, dtype=dtype,
                     saebench_model=saebench_model, saebench_forget_corpus=saebench_forget_corpus,
                     saebench_artifacts=saebench_artifacts, saebench_llm_batch_size=saebench_llm_batch_size,
                     saebench_llm_dtype=saebench_llm_dtype, saebench_dataset_size=saebench_dataset_size,
                     saebench_seq_len=saebench_seq_len, saebench_baseline_min=saebench_baseline_min,
                     saebench_core_dataset=saebench_core_dataset, saebench_core_context=saebench_core_context,
                     saebench_core_batches=saebench_core_batches)
    for line in run_eval(runs, runs_dir, config, overrides, saebench=saebench, shards=shards):
        typer.echo(line)


def _bdoc(field: str) -> str:
    from evaluate.browser.config import BrowseConfig

    return BrowseConfig.model_fields[field].description or ""


@app.command()
def browse(
    run: Annotated[str, typer.Argument(help="The run: run_N, N, or a run directory.")],
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    features: Annotated[Optional[str], typer.Option(help=_bdoc("features"))] = None,
    top: Annotated[Optional[int], typer.Option(help=_bdoc("top"))] = None,
    examples: Annotated[Optional[int], typer.Option(help=_bdoc("examples"))] = None,
    samples: Annotated[Optional[int], typer.Option(help=_bdoc("samples"))] = None,
    reservoir: Annotated[Optional[int], typer.Option(help=_bdoc("reservoir"))] = None,
    before: Annotated[Optional[int], typer.Option(help=_bdoc("before"))] = None,
    after: Annotated[Optional[int], typer.Option(help=_bdoc("after"))] = None,
    neighbours: Annotated[Optional[int], typer.Option(help=_bdoc("neighbours"))] = None,
    lens_tokens: Annotated[Optional[int], typer.Option(help=_bdoc("lens_tokens"))] = None,
    r_threshold: Annotated[Optional[float], typer.Option(help=_bdoc("r_threshold"))] = None,
    min_rate: Annotated[Optional[float], typer.Option(help=_bdoc("min_rate"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_bdoc("device"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_bdoc("seed"))] = None,
    out: Annotated[Optional[Path], typer.Option(help=_bdoc("out"))] = None,
):
    """A static feature browser of one run (its index.html opens from disk): each feature's top dangerous and safe contexts from the store, histograms, decoder neighbours, logit lens."""
    from evaluate.browser.main import run_browse

    options = dict(features=features, top=top, examples=examples, samples=samples, reservoir=reservoir,
                   before=before, after=after, neighbours=neighbours, lens_tokens=lens_tokens,
                   r_threshold=r_threshold, min_rate=min_rate, device=device, seed=seed, out=out)
    for line in run_browse(run, runs_dir, options):
        typer.echo(line)


@app.command()
def report(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Runs to compare (default: every evaluated run).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    out: Annotated[Path, typer.Option(help="Directory for report.md, report.csv and the plots.")] = Path("reports"),
):
    """A table across runs (report.md, report.csv) and comparison plots."""
    from evaluate.report.main import report as make_report

    typer.echo(f"wrote {make_report(runs or [], runs_dir, out)}")


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated {kind.__name__}s, got {text!r}") from None


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="CI mode: the tiny random Gemma-2, a few steps; checks that every benchmark runs, says nothing about speed.")] = False,
    config: Annotated[Path, typer.Option(help="Harvest config: the model, layer, text, batch size and codec of the harvest benchmark.")] = Path("configs/demo.yaml"),
    model: Annotated[Optional[str], typer.Option(help="Instead of the config's model: random:gemma-2-2b or random:tiny (random weights and token ids).")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Instead of the config's layer.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Harvest compute dtype: auto, bfloat16 or float32.")] = "auto",
    windows: Annotated[int, typer.Option(help="Windows the harvest benchmark runs.")] = 256,
    context_length: Annotated[Optional[int], typer.Option(help="Window length for random models (text keeps the config's).")] = None,
    harvest_batch: Annotated[Optional[int], typer.Option(help="Windows per forward pass, instead of the config's.")] = None,
    shards: Annotated[Optional[Path], typer.Option(help="Store for the training benchmarks (default: the one the harvest benchmark writes).")] = None,
    train_batch: Annotated[int, typer.Option(help="Training batch size, tokens.")] = 2048,
    steps: Annotated[int, typer.Option(help="Timed steps per measurement.")] = 20,
    repeats: Annotated[int, typer.Option(help="Repeats of each measurement (median, min, max).")] = 3,
    sizes: Annotated[str, typer.Option(help="Dictionary sizes in multiples of d_in, comma-separated (16384 latents are added on CUDA).")] = "1,4,8",
    lockstep: Annotated[str, typer.Option(help="Lockstep group sizes K, comma-separated.")] = "1,4,8",
    arch_sizes: Annotated[str, typer.Option(help="Dictionary sizes of the architecture rows (archs), in multiples of d_in, comma-separated.")] = "4,16",
    k: Annotated[int, typer.Option(help="Active latents per token of the TopK and BatchTopK rows, ours and the peers'.")] = 32,
    heldout_batches: Annotated[int, typer.Option(help="Batches held out of training, for the architecture rows' explained variance and L0.")] = 4,
    only: Annotated[str, typer.Option(help="Benchmarks to run, comma-separated: harvest, train, lockstep, loader, archs, syncs.")] = "harvest,train,lockstep,loader,archs,syncs",
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also run SAELens and dictionary_learning in their environment.")] = True,
    peer_python: Annotated[Path, typer.Option(help="Python of the peers' environment.")] = Path(".venv-saebench/bin/python"),
    results: Annotated[Optional[Path], typer.Option(help="Markdown file the dated tables are appended to.")] = Path("bench/RESULTS.md"),
    no_record: Annotated[bool, typer.Option("--no-record", help="Print only; append nothing.")] = False,
):
    """Benchmarks: harvest vs bare and naive forward passes, training, lockstep, loader, peers, ceilings."""
    from bench.runner import BenchConfig, run_bench

    try:
        cfg = BenchConfig(quick=quick, config=config, model=model, layer=layer, device=device, dtype=dtype,
                          windows=windows, context_length=context_length, harvest_batch=harvest_batch, shards=shards,
                          train_batch=train_batch, steps=steps, repeats=repeats,
                          sizes=_numbers(sizes, float, "--sizes"), lockstep=_numbers(lockstep, int, "--lockstep"),
                          arch_sizes=_numbers(arch_sizes, float, "--arch-sizes"), k=k, heldout_batches=heldout_batches,
                          only=only.split(","),
                          peers=peers, peer_python=peer_python, results=None if no_record else results)
        report = run_bench(cfg)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(report.markdown())
    if cfg.results is not None:
        typer.echo(f"appended to {cfg.results}")


def run() -> None:
    """Console-script entry point: user errors become one line and a non-zero exit."""
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into this exit code itself
            typer.secho("interrupted: what was committed or checkpointed is kept; rerun to resume", err=True)
        if isinstance(code, int) and code:
            sys.exit(code)
    except (HarvestError, TrainError) as exc:
        if _DEBUG["on"]:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Interrupted as exc:  # SIGINT or SIGTERM, with what the stage kept and how to go on
        typer.secho(exc.message, err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted: committed rows are kept; run the same command again to resume", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # a usage error (typer vendors its own click)
            exc.show()
            sys.exit(exc.exit_code)
        if _DEBUG["on"]:
            raise
        if isinstance(exc, OSError) and exc.errno in _PATH_PROBLEMS:
            where = exc.filename if exc.filename is not None else "a path"
            typer.secho(f"error: cannot use {where}: {exc.strerror}; {_PATH_PROBLEMS[exc.errno]}",
                        fg=typer.colors.RED, err=True)
            sys.exit(2)
        typer.secho(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                    fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
