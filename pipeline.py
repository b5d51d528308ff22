"""The `pipeline` command: parses flags and dispatches to the stages. No work happens here."""

import errno
import re
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
    errno.ELOOP: "it is a symlink loop; name a real path",
    errno.EEXIST: "it exists and is not a directory (a file, or a symbolic link to itself or to nothing); name a directory",
    errno.ENOENT: "a part of the path does not exist, or cannot hold files there (/proc, /sys); choose another path",
    errno.ENOSPC: "free space and run the same command again (what was written whole is kept)",
    errno.EDQUOT: "free space and run the same command again (what was written whole is kept)",
}
"""OSErrors that name a path the user gave and can fix: one line, exit 2 (bad input), not "unexpected"."""


_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!\bvs)\.(?=\s+[A-Z`]|\s*$)")
_DEFAULT_SENTENCE = re.compile(r"\bDefault: (.+?)(?<!e\.g)(?<!i\.e)\.(?=\s+[A-Z`]|\s*$)")

# `train --help`'s panels
_DATA, _SAE, _PENALTY, _LABELS, _SCHEDULE, _RUN, _SPEED = ("Model and data", "SAE", "Penalty", "Label blocks",
                                                           "Schedule", "Run control", "Speed")


def _without_asides(text: str) -> str:
    """`text` without its parenthesised asides (a bracket after a space; `rank(r_i)` stays)."""
    kept, depth = [], 0
    for i, char in enumerate(text):
        # an aside opens after a space, but not after an operator: `a_d / (a_d + a_s)` stays
        if char == "(" and (depth or i == 0 or (text[i - 1] == " " and text[i - 2:i - 1] not in "/*+-=")):
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(char)
    return re.sub(r"\s+([,.;:])", r"\1", " ".join("".join(kept).split()))


def _brief(model, field: str) -> str:
    """An option's --help: the first sentence of its config field's description without its asides, and
    the field's default (the bracket escaped from rich markup); the reference pages (docs/reference/)
    carry every word."""
    info = model.model_fields[field]
    text = " ".join((info.description or "").split())
    end = _SENTENCE_END.search(text)
    brief = _without_asides(text[:end.start() + 1] if end else text)
    default = info.get_default(call_default_factory=True)
    if default is None:
        stated = _DEFAULT_SENTENCE.search(text)
        shown = _without_asides(stated.group(1)).split(";")[0] if stated else None
    elif isinstance(default, bool):
        shown = "true" if default else "false"
    elif isinstance(default, (list, tuple)):
        shown = ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in default)
    else:
        shown = f"{default:.6g}" if isinstance(default, float) else str(default)
    return f"{brief} \\[default: {shown}]" if shown else brief


def _doc(field: str) -> str:
    return _brief(HarvestConfig, field)


def _edoc(field: str) -> str:
    from evaluate.config import EvalConfig

    return _brief(EvalConfig, field)


def _tdoc(field: str) -> str:
    return _brief(TrainConfig, field)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _version() -> str:
    """The checkout's own version (pyproject.toml) where there is one, else the installed package's."""
    pyproject = Path(__file__).resolve().parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    from importlib.metadata import version

    return version("ratio-sae")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ratio-sae {_version()}")
        raise typer.Exit()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
         version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                          help="Print the version and exit.")] = None):
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
    config: Annotated[Optional[Path], typer.Option(help="YAML config (e.g. configs/seed/run_3.yaml); flags override it.", rich_help_panel=_RUN)] = None,
    sweep: Annotated[Optional[Path], typer.Option(help="Sweep YAML (base: options, grid: option -> values); each group of runs that shares its batches trains in lockstep.", rich_help_panel=_RUN)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a stopped run (run_N or its directory), with the rest of its lockstep group.", rich_help_panel=_RUN)] = None,
    dask: Annotated[Optional[str], typer.Option(help="Train the sweep's lockstep groups on a dask.distributed cluster, one group per worker: a scheduler address (tcp://host:8786) or local:N (N worker processes here).", rich_help_panel=_RUN)] = None,
    shards: Annotated[Optional[Path], typer.Option(help=_tdoc("shards"), rich_help_panel=_DATA)] = None,
    trainer: Annotated[Optional[str], typer.Option(help=_tdoc("trainer"), rich_help_panel=_PENALTY)] = None,
    arch: Annotated[Optional[str], typer.Option(help=_tdoc("arch"), rich_help_panel=_SAE)] = None,
    ortho: Annotated[Optional[float], typer.Option(help=_tdoc("ortho"), rich_help_panel=_PENALTY)] = None,
    ortho_weighting: Annotated[Optional[str], typer.Option(help=_tdoc("ortho_weighting"), rich_help_panel=_PENALTY)] = None,
    ortho_top_r: Annotated[Optional[float], typer.Option(help=_tdoc("ortho_top_r"), rich_help_panel=_PENALTY)] = None,
    ortho_min_count: Annotated[Optional[int], typer.Option(help=_tdoc("ortho_min_count"), rich_help_panel=_PENALTY)] = None,
    ortho_normalize: Annotated[Optional[str], typer.Option(help=_tdoc("ortho_normalize"), rich_help_panel=_PENALTY)] = None,
    ortho_rows: Annotated[Optional[float], typer.Option(help=_tdoc("ortho_rows"), rich_help_panel=_SPEED)] = None,
    l1: Annotated[Optional[float], typer.Option(help=_tdoc("l1"), rich_help_panel=_PENALTY)] = None,
    k: Annotated[Optional[int], typer.Option(help=_tdoc("k"), rich_help_panel=_SAE)] = None,
    aux_k: Annotated[Optional[int], typer.Option(help=_tdoc("aux_k"), rich_help_panel=_SAE)] = None,
    aux_coeff: Annotated[Optional[float], typer.Option(help=_tdoc("aux_coeff"), rich_help_panel=_SAE)] = None,
    l0_coeff: Annotated[Optional[float], typer.Option(help=_tdoc("l0_coeff"), rich_help_panel=_PENALTY)] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help=_tdoc("bandwidth"), rich_help_panel=_SAE)] = None,
    threshold_init: Annotated[Optional[float], typer.Option(help=_tdoc("threshold_init"), rich_help_panel=_SAE)] = None,
    batchtopk_threshold_lr: Annotated[Optional[float], typer.Option(help=_tdoc("batchtopk_threshold_lr"), rich_help_panel=_SAE)] = None,
    matryoshka_groups: Annotated[Optional[list[float]], typer.Option(help=_tdoc("matryoshka_groups"), rich_help_panel=_SAE)] = None,
    matryoshka_weights: Annotated[Optional[list[float]], typer.Option(help=_tdoc("matryoshka_weights"), rich_help_panel=_SAE)] = None,
    target_l0: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0"), rich_help_panel=_PENALTY)] = None,
    target_l0_gain: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0_gain"), rich_help_panel=_PENALTY)] = None,
    target_l0_rate: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0_rate"), rich_help_panel=_PENALTY)] = None,
    target_l0_ramp: Annotated[Optional[float], typer.Option(help=_tdoc("target_l0_ramp"), rich_help_panel=_PENALTY)] = None,
    routed_latents: Annotated[Optional[int], typer.Option(help=_tdoc("routed_latents"), rich_help_panel=_LABELS)] = None,
    routing: Annotated[Optional[str], typer.Option(help=_tdoc("routing"), rich_help_panel=_LABELS)] = None,
    supervised_latents: Annotated[Optional[int], typer.Option(help=_tdoc("supervised_latents"), rich_help_panel=_LABELS)] = None,
    supervision_coeff: Annotated[Optional[float], typer.Option(help=_tdoc("supervision_coeff"), rich_help_panel=_LABELS)] = None,
    permute_labels: Annotated[Optional[str], typer.Option(help=_tdoc("permute_labels"), rich_help_panel=_LABELS)] = None,
    lr: Annotated[Optional[float], typer.Option(help=_tdoc("lr"), rich_help_panel=_SCHEDULE)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=_tdoc("warmup_steps"), rich_help_panel=_SCHEDULE)] = None,
    lr_decay_fraction: Annotated[Optional[float], typer.Option(help=_tdoc("lr_decay_fraction"), rich_help_panel=_SCHEDULE)] = None,
    dict_size: Annotated[Optional[int], typer.Option(help=_tdoc("dict_size"), rich_help_panel=_SAE)] = None,
    tokens: Annotated[Optional[int], typer.Option(help=_tdoc("tokens"), rich_help_panel=_DATA)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_tdoc("batch_size"), rich_help_panel=_DATA)] = None,
    dangerous_fraction: Annotated[Optional[float], typer.Option(help=_tdoc("dangerous_fraction"), rich_help_panel=_DATA)] = None,
    seed: Annotated[Optional[int], typer.Option(help=_tdoc("seed"), rich_help_panel=_SAE)] = None,
    data_seed: Annotated[Optional[int], typer.Option(help=_tdoc("data_seed"), rich_help_panel=_DATA)] = None,
    recon: Annotated[Optional[str], typer.Option(help=_tdoc("recon"), rich_help_panel=_SAE)] = None,
    b_dec_init: Annotated[Optional[str], typer.Option(help=_tdoc("b_dec_init"), rich_help_panel=_DATA)] = None,
    normalize: Annotated[Optional[str], typer.Option(help=_tdoc("normalize"), rich_help_panel=_DATA)] = None,
    window_chunks: Annotated[Optional[int], typer.Option(help=_tdoc("window_chunks"), rich_help_panel=_SPEED)] = None,
    ortho_block: Annotated[Optional[int], typer.Option(help=_tdoc("ortho_block"), rich_help_panel=_SPEED)] = None,
    device: Annotated[Optional[str], typer.Option(help=_tdoc("device"), rich_help_panel=_SPEED)] = None,
    autocast: Annotated[Optional[bool], typer.Option("--autocast/--no-autocast", help=_tdoc("autocast"), rich_help_panel=_SPEED)] = None,
    resident: Annotated[Optional[bool], typer.Option("--resident/--streamed", help=_tdoc("resident"), rich_help_panel=_SPEED)] = None,
    log_every: Annotated[Optional[int], typer.Option(help=_tdoc("log_every"), rich_help_panel=_RUN)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help=_tdoc("checkpoint_every"), rich_help_panel=_RUN)] = None,
    dead_after_tokens: Annotated[Optional[int], typer.Option(help=_tdoc("dead_after_tokens"), rich_help_panel=_SAE)] = None,
    runs_dir: Annotated[Optional[Path], typer.Option(help=_tdoc("runs_dir"), rich_help_panel=_RUN)] = None,
    wandb: Annotated[Optional[str], typer.Option(help=_tdoc("wandb"), rich_help_panel=_RUN)] = None,
    halves_split: Annotated[Optional[int], typer.Option(help=_tdoc("halves_split"), rich_help_panel=_PENALTY)] = None,
    coact_weight: Annotated[Optional[str], typer.Option(help=_tdoc("coact_weight"), rich_help_panel=_PENALTY)] = None,
    ortho_lr_warmup: Annotated[Optional[bool], typer.Option("--ortho-lr-warmup", help=_tdoc("ortho_lr_warmup"), rich_help_panel=_PENALTY)] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.", rich_help_panel=_RUN)] = True,
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
                     ortho_min_count=ortho_min_count, ortho_normalize=ortho_normalize, ortho_rows=ortho_rows, k=k, aux_k=aux_k,
                     aux_coeff=aux_coeff, l0_coeff=l0_coeff, bandwidth=bandwidth, threshold_init=threshold_init,
                     batchtopk_threshold_lr=batchtopk_threshold_lr, target_l0=target_l0,
                     target_l0_gain=target_l0_gain, target_l0_rate=target_l0_rate,
                     target_l0_ramp=target_l0_ramp, wandb=wandb, routed_latents=routed_latents, routing=routing,
                     supervised_latents=supervised_latents, supervision_coeff=supervision_coeff,
                     permute_labels=permute_labels)
    overrides.update(matryoshka_groups=matryoshka_groups or None, matryoshka_weights=matryoshka_weights or None)
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
    select: Annotated[Optional[str], typer.Option(help=_edoc("select"))] = None,
    clamp: Annotated[Optional[str], typer.Option(help=_edoc("clamp"))] = None,
    gate_quantile: Annotated[Optional[float], typer.Option(help=_edoc("gate_quantile"))] = None,
    gate_scope: Annotated[Optional[str], typer.Option(help=_edoc("gate_scope"))] = None,
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
    retain_search: Annotated[Optional[str], typer.Option(help=_edoc("retain_search"))] = None,
    retain_sources: Annotated[Optional[list[str]], typer.Option("--retain-source", help=_edoc("retain_sources"))] = None,
    retain_docs: Annotated[Optional[int], typer.Option(help=_edoc("retain_docs"))] = None,
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
                     primary_retain_set=primary_retain_set, retain_search=retain_search, retain_sources=retain_sources,
                     retain_docs=retain_docs,
                     bootstrap_resamples=bootstrap_resamples,
                     min_fires=min_fires, null_permutations=null_permutations, batch_size=batch_size,
                     retain_thresholds=retain_thresholds, n_features=n_features, multipliers=multipliers,
                     retain_tolerance=retain_tolerance, controls=controls, control_repeats=control_repeats, r_threshold=r_threshold,
                     min_rate=min_rate, dense_rate=dense_rate, seed=seed, device=device, dtype=dtype,
                     saebench_model=saebench_model, saebench_forget_corpus=saebench_forget_corpus,
                     saebench_artifacts=saebench_artifacts, saebench_llm_batch_size=saebench_llm_batch_size,
                     saebench_llm_dtype=saebench_llm_dtype, saebench_dataset_size=saebench_dataset_size,
                     saebench_seq_len=saebench_seq_len, saebench_baseline_min=saebench_baseline_min,
                     saebench_core_dataset=saebench_core_dataset, saebench_core_context=saebench_core_context,
                     saebench_core_batches=saebench_core_batches, select=select, clamp=clamp,
                     gate_quantile=gate_quantile, gate_scope=gate_scope)
    for line in run_eval(runs, runs_dir, config, overrides, saebench=saebench, shards=shards):
        typer.echo(line)


def _bdoc(field: str) -> str:
    from evaluate.browser.config import BrowseConfig

    return _brief(BrowseConfig, field)


@app.command()
def browse(
    run: Annotated[str, typer.Argument(help="The run: run_N, N, or a run directory; with --shards, also a SAELens-format SAE directory.")],
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    shards: Annotated[Optional[Path], typer.Option(help="The store the SAE reads: for a run, its own store where it has moved (default: the one it was trained on); for a SAELens directory, the store of its model and hook.")] = None,
    features: Annotated[Optional[str], typer.Option(help=_bdoc("features"))] = None,
    top: Annotated[Optional[int], typer.Option(help=_bdoc("top"))] = None,
    examples: Annotated[Optional[int], typer.Option(help=_bdoc("examples"))] = None,
    samples: Annotated[Optional[int], typer.Option(help=_bdoc("samples"))] = None,
    reservoir: Annotated[Optional[int], typer.Option(help=_bdoc("reservoir"))] = None,
    before: Annotated[Optional[int], typer.Option(help=_bdoc("before"))] = None,
    after: Annotated[Optional[int], typer.Option(help=_bdoc("after"))] = None,
    neighbours: Annotated[Optional[int], typer.Option(help=_bdoc("neighbours"))] = None,
    lens_tokens: Annotated[Optional[int], typer.Option(help=_bdoc("lens_tokens"))] = None,
    cofiring: Annotated[Optional[int], typer.Option(help=_bdoc("cofiring"))] = None,
    r_threshold: Annotated[Optional[float], typer.Option(help=_bdoc("r_threshold"))] = None,
    min_rate: Annotated[Optional[float], typer.Option(help=_bdoc("min_rate"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_bdoc("device"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_bdoc("seed"))] = None,
    out: Annotated[Optional[Path], typer.Option(help=_bdoc("out"))] = None,
):
    """A static feature browser of one SAE (its index.html opens from disk): every live feature's top dangerous and safe contexts from the store, histograms, co-firing features, decoder neighbours, logit lens; a search over the tokens it fires on."""
    from evaluate.browser.main import run_browse

    options = dict(features=features, top=top, examples=examples, samples=samples, reservoir=reservoir,
                   before=before, after=after, neighbours=neighbours, lens_tokens=lens_tokens, cofiring=cofiring,
                   r_threshold=r_threshold, min_rate=min_rate, device=device, seed=seed, out=out, shards=shards)
    for line in run_browse(run, runs_dir, options):
        typer.echo(line)


@app.command()
def generate(
    run: Annotated[str, typer.Argument(help="The run: run_N, N, or a run directory; with --shards, also a SAELens-format SAE directory.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="A file of prompts, one a line.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    shards: Annotated[Optional[Path], typer.Option(help="The store the SAE reads (default: the run's own): its model and layer.")] = None,
    features: Annotated[Optional[str], typer.Option(help="Comma-separated features to clamp (default: those of the eval's best setting, eval/unlearning.json).")] = None,
    multiplier: Annotated[Optional[float], typer.Option(help="Clamp value: a firing feature is set to -multiplier (default: the eval's best setting's).")] = None,
    clamp: Annotated[str, typer.Option(help="How the selection is clamped: always (the eval's clamp, wherever a selected feature fires).")] = "always",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 40,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampled at this temperature (the same seed for both columns).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seeds the sampling.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16 (auto: as the eval loads the model).")] = "auto",
):
    """The model's continuation of each prompt, without and with the SAE's selected features clamped, side by side."""
    from evaluate.workbench.generate import run_generate

    options = dict(prompt=prompt, prompts=prompts, shards=shards, features=features, multiplier=multiplier,
                   clamp=clamp, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, device=device,
                   dtype=dtype)
    for line in run_generate(run, runs_dir, options):
        typer.echo(line)


@app.command()
def activations(
    run: Annotated[str, typer.Argument(help="The run: run_N, N, or a run directory; with --shards, also a SAELens-format SAE directory.")],
    text: Annotated[Optional[str], typer.Option(help="The text to run through the model and the SAE.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="A file whose text to run instead.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    shards: Annotated[Optional[Path], typer.Option(help="The store the SAE reads (default: the run's own): its model and layer.")] = None,
    features: Annotated[Optional[str], typer.Option(help="Comma-separated features to show (default: those the eval selected; for an SAE not evaluated, the --top strongest on the text).")] = None,
    top: Annotated[int, typer.Option(help="For an SAE not evaluated: how many of the features strongest on the text to show.")] = 10,
    out: Annotated[Optional[Path], typer.Option(help="The HTML page (default: DIR/browser/texts/<text>.html, listed in the run's browser, where it has one; else DIR/activations/<text>.html).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16 (auto: as the eval loads the model).")] = "auto",
):
    """Token by token, the chosen features' activations on any text: in the terminal and as an HTML page."""
    from evaluate.workbench.activations import run_activations

    options = dict(text=text, file=file, shards=shards, features=features, top=top, out=out, device=device, dtype=dtype)
    for line in run_activations(run, runs_dir, options):
        typer.echo(line)


@app.command()
def report(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Runs to compare (default: every evaluated run).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run_N directories live.")] = Path("runs"),
    out: Annotated[Path, typer.Option(help="Directory for report.md, report.csv and the plots.")] = Path("reports"),
    reference: Annotated[Optional[str], typer.Option(
        help="A run of the arm the others are compared with (default: the arm with ortho 0).")] = None,
    equivalence_margin: Annotated[float, typer.Option(
        help="Equivalence margin in nats: an arm is 'equivalent' to the reference only when a TOST at this margin "
             "holds.")] = 0.02,
    ev_threshold: Annotated[float, typer.Option(
        help="Runs with held-out explained variance below this are flagged wherever their scores appear.")] = 0.5,
    eval_dir: Annotated[str, typer.Option(
        help="Which eval directory of each run to read: `eval` (SAEBench's selection, static clamp) or the "
             "eval-<select>-<clamp> that `pipeline eval --select/--clamp` wrote (one report per inference arm).")] = "eval",
    eval_config_of: Annotated[Optional[str], typer.Option(
        help="Where the runs' primary scores were measured with different eval configs: report the runs evaluated "
             "with this run's config (the others are left out, each named). Default: refuse such a mix.")] = None,
):
    """A headline table per arm, the arms against a reference arm (two-way model, Holm, TOST), where the spread comes from, every run's columns (report.md, report.csv) and comparison plots."""
    from evaluate.report.main import report as make_report

    written = make_report(runs or [], runs_dir, out, equivalence_margin=equivalence_margin,
                          ev_threshold=ev_threshold, reference=reference,
                          note=lambda line: typer.echo(line, err=True), eval_dir=eval_dir,
                          eval_config_of=eval_config_of, say=typer.echo)
    typer.echo(f"wrote {written}")


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
    only: Annotated[str, typer.Option(help="Benchmarks to run, comma-separated: harvest, train, lockstep, loader, archs, matryoshka, syncs.")] = "harvest,train,lockstep,loader,archs,matryoshka,syncs",
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
