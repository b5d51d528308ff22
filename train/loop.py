"""The training loop: one loader, K SAEs in lockstep, each batch read and moved to the device once.

    for batch in loader:               # stratified, shuffled, already on the device
        for trainer in trainers:       # every SAE of the group sees the same batch
            trainer.step(batch)
        log, checkpoint

A run whose loss turns non-finite stops alone, with a message; its last checkpoint is kept, and the
other SAEs of the group go on.
"""

import json
import shutil
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from harvest.disk import is_disk_full
from harvest.errors import HarvestError, Interrupted, signals_interrupt
from harvest.model import cpu_has_native_bf16
from harvest.stats import stats_for_training
from harvest.store import ShardStore, store_fingerprint

from .checkpoint_check import resume_point
from .checkpointing import CheckpointJob, CheckpointWriter
from .config import LOADER_KEYS, TrainConfig
from .errors import TrainError
from .label_blocks import RECORD_KEY
from .label_permutation import PermutedLabels
from .loader import ShardLoader
from .memory import check_fits, group_step_bytes
from .precision import resolve_autocast
from .runs import (MetricsLog, checkpoint_step, group_record, holds_nothing, interrupted, load_checkpoint, new_run_dir,
                   point_latest_at, run_lock, save_checkpoint, write_json)
from .sparsity_file import WINDOW_TOKENS, firing_rates, write_sparsity
from .tracking import open_wandb_runs, require_wandb
from .trainers import TRAINERS, Trainer


@dataclass
class RunResult:
    run_dir: Path
    cfg: TrainConfig
    steps: int
    failed: str | None = None
    final: dict = field(default_factory=dict)


def default_store(shards_root: Path = Path("shards")) -> Path:
    found = sorted(p.parent for p in shards_root.glob("**/zarr.json")
                   if ShardStore.exists(p.parent) and ShardStore.open(p.parent).complete)
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrainError(f"no complete shard store under {shards_root}/: run `pipeline harvest` first or pass --shards")
    raise TrainError(f"several shard stores under {shards_root}/ ({', '.join(map(str, found))}): choose one with --shards")


def open_store(path: Path | None) -> ShardStore:
    path = path or default_store()
    try:
        store = ShardStore.open(path)
    except HarvestError as exc:
        raise TrainError(str(exc)) from None
    if not store.complete:
        raise TrainError(f"the store at {path} is incomplete ({store.rows_committed:,} of {store.rows_total:,} rows "
                         "committed): finish it with the same `pipeline harvest` command first")
    return store


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name} asked for, but no CUDA device is available")
    return device


def preflight(cfgs: list[TrainConfig]) -> tuple[ShardStore, list[TrainConfig], torch.device]:
    """What a lockstep group is checked for before anything is allocated or any run directory made: one
    loader, its store, the device, the batch against the store, target L0 against the SAE's width, and
    the memory its SAEs and a step need (train/memory.py). A sweep makes these checks for every group
    before the first one trains. Returns the store, the configs as they will be recorded, the device."""
    if len({c.group_key() for c in cfgs}) != 1:
        raise TrainError(f"runs trained in lockstep must agree on {', '.join(LOADER_KEYS)}")
    cfg0 = cfgs[0]
    store = open_store(cfg0.shards)
    cfgs = [c.model_copy(update={"shards": store.path}) for c in cfgs]
    device = resolve_device(cfg0.device)
    if any(c.autocast for c in cfgs) and device.type == "cpu" and not cpu_has_native_bf16():
        raise TrainError("--autocast asks for bf16 on a CPU without AMX or AVX-512-BF16, where it runs ~100x "
                         "slower than float32; leave it off")
    # train_config.json records the arithmetic the run used, and a resumed run keeps it
    cfgs = [c.model_copy(update={"autocast": resolve_autocast(c.autocast, device)}) for c in cfgs]
    d_model = store.d_model
    if cfg0.batch_size > store.rows_committed:
        raise TrainError(f"--batch-size {cfg0.batch_size} is larger than the store at {store.path} "
                         f"({store.rows_committed:,} rows): choose at most {store.rows_committed:,}")
    for c in cfgs:  # L0 counts active features per token: it cannot exceed the SAE's features
        if c.target_l0 is not None and c.target_l0 > (c.dict_size or d_model):
            raise TrainError(f"--target-l0 {c.target_l0:g} is more than the SAE's {c.dict_size or d_model} features "
                             "(dict_size); choose target_l0 <= dict_size")
    if (cfg0.tokens or store.rows_committed) // cfg0.batch_size == 0:
        raise TrainError(f"--tokens {cfg0.tokens} is less than one batch of {cfg0.batch_size}")
    check_fits(d_model, cfgs, device)
    return store, cfgs, device


def train_group(cfgs: list[TrainConfig], *, resume_dirs: list[Path] | None = None, run_dirs: list[Path] | None = None,
                progress: bool = True) -> list[RunResult]:
    """Train SAEs that share every loader setting in lockstep; new run directories unless resuming.

    `run_dirs`: empty directories numbered beforehand (a sweep on dask numbers them on its client);
    default: the next `run_<N>` of each run's runs_dir.
    """
    if run_dirs is not None and (resume_dirs is not None or len(run_dirs) != len(cfgs)):
        raise ValueError("run_dirs: one new directory per config, and not when resuming")
    store, cfgs, device = preflight(cfgs)
    cfg0, d_model = cfgs[0], store.d_model
    trainers: list[Trainer] = [TRAINERS[c.trainer](c, d_model, device) for c in cfgs]
    if any(c.wandb for c in cfgs):
        require_wandb()  # before any run directory is made
    steps = (cfg0.tokens or store.rows_committed) // cfg0.batch_size
    for trainer in trainers:
        trainer.plan(steps)

    created: list[Path] = []
    with ExitStack() as held:
        stop = held.enter_context(signals_interrupt())
        try:
            if resume_dirs is None:
                if run_dirs is None:  # numbered here, so removed here if the start fails (not a sweep client's)
                    run_dirs = created = [new_run_dir(c.runs_dir) for c in cfgs]
                for run_dir in run_dirs:
                    held.enter_context(run_lock(run_dir))
                for run_dir, c in zip(run_dirs, cfgs):
                    write_json(run_dir / "train_config.json", {
                        **c.model_dump(mode="json"), "steps": steps, "d_in": d_model,
                        "d_sae": c.dict_size or d_model, "shards_fingerprint": store_fingerprint(store.attrs),
                        "lockstep_group": group_record(run_dir, run_dirs)})
                start = 0
            else:
                run_dirs = resume_dirs
                for run_dir in run_dirs:  # before reading a checkpoint that another process may be replacing
                    held.enter_context(run_lock(run_dir))
                # Checked again under the lock: a trainer finishing its last steps when this command
                # looked has since finished, and resuming would train nothing and rewrite its results.
                finished = [str(d) for d in run_dirs if (d / "final_info.json").exists()]
                if finished:
                    raise TrainError(f"{', '.join(finished)} finished while this command was starting (another "
                                     "`pipeline train` completed it); nothing to resume")
                start = _load_checkpoints(run_dirs, trainers, d_model)
                fingerprint = store_fingerprint(store.attrs)
                for run_dir in run_dirs:
                    recorded = json.loads((run_dir / "train_config.json").read_text())["shards_fingerprint"]
                    if recorded != fingerprint:
                        raise TrainError(f"{run_dir} was trained on another store than {store.path} "
                                         "(fingerprint differs)")
            return _train(store, cfgs, trainers, run_dirs, start, steps, device, progress, stop)
        except BaseException as exc:
            # A start that failed leaves no run directory behind (nothing in it could be resumed)
            removed = bool(created) and all(holds_nothing(d) for d in created)
            if removed:
                held.close()  # the run locks, before their directories go
                for run_dir in created:
                    shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(exc, (KeyboardInterrupt, Interrupted)):
                signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
                raise interrupted(signum, None if removed else run_dirs) from None
            if isinstance(exc, Exception) and is_disk_full(exc):
                raise TrainError(_disk_full_message(None if removed else run_dirs)) from None
            raise


def _load_checkpoints(run_dirs: list[Path], trainers: list[Trainer], d_model: int) -> int:
    """Load each run's checkpoint at the step every run of the group reached; return that step.

    The runs of a group save one after another, so a kill between two saves leaves some a checkpoint
    ahead; those keep the one before (save_checkpoint's keep_previous). No checkpoint: step 0.
    """
    reached = [checkpoint_step(d) or 0 for d in run_dirs]
    start, passed_over = resume_point(run_dirs)  # a damaged newest checkpoint: the intact one before it
    if start == 0:
        return 0
    if passed_over:
        for run_dir in run_dirs:  # so that the step passed over is written anew when training reaches it
            point_latest_at(run_dir, start)
    for run_dir, trainer in zip(run_dirs, trainers):
        saved = load_checkpoint(run_dir, step=start)
        if saved is None:
            raise TrainError(f"the runs of this lockstep group stopped at different steps ({sorted(set(reached))}) "
                             f"and {run_dir} no longer has a checkpoint at step {start}")
        _, tensors, _ = saved
        if tensors["sae.W_dec"].shape[1] != d_model:
            raise TrainError(f"{run_dir}: the SAE has d_in {tensors['sae.W_dec'].shape[1]} but the store "
                             f"has d_model {d_model}")
        trainer.load_state_tensors(tensors)
    return start


def _disk_full_message(run_dirs: list[Path] | None) -> str:
    if not run_dirs:
        return "disk full while creating a run directory: free space and run the same command again"
    names = ", ".join(map(str, run_dirs))
    if not all((d / "train_config.json").exists() for d in run_dirs):
        return f"disk full while creating {names}: free space, remove them and run the same command again"
    kept = sorted({checkpoint_step(d) or 0 for d in run_dirs})
    kept_text = ("no checkpoint yet, it restarts from step 0" if kept == [0]
                 else f"checkpoint at step {', '.join(map(str, kept))} is kept")
    return (f"disk full while training {names} ({kept_text}): free space and run "
            f"`pipeline train --resume {run_dirs[0]}` to continue")


def _train(store: ShardStore, cfgs: list[TrainConfig], trainers: list[Trainer], run_dirs: list[Path], start: int,
           steps: int, device: torch.device, progress: bool, stop: signals_interrupt) -> list[RunResult]:
    cfg0, d_model = cfgs[0], store.d_model
    logs = [MetricsLog(d / "metrics.jsonl", resume_step=start) for d in run_dirs]
    wandb_runs = open_wandb_runs([c.wandb for c in cfgs], run_dirs, [c.model_dump(mode="json") for c in cfgs])
    failed: list[str | None] = [None] * len(trainers)
    loader = ShardLoader(store, batch_size=cfg0.batch_size, dangerous_fraction=cfg0.dangerous_fraction,
                         seed=cfg0.data_seed, window_chunks=cfg0.window_chunks, device=device,
                         resident=cfg0.resident, reserve_bytes=group_step_bytes(d_model, cfgs, device))
    permutations: dict = {}  # one per seed, shared by the group's runs that ask for it
    relabels = [PermutedLabels.for_config(c, store, device, permutations) for c in cfgs]
    mean, mean_norm = _sample_statistics(loader)
    store_mean, store_mean_norm = _store_statistics(store, cfgs, device)
    for trainer in trainers:
        b_dec = trainer.sae.b_dec.detach().clone()
        trainer.init_from_sample(mean, mean_norm, store_mean, store_mean_norm)
        if start:  # resumed: the scale is recomputed (the same sample), the bias comes from the checkpoint
            with torch.no_grad():
                trainer.sae.b_dec.copy_(b_dec)
    bar = tqdm(total=steps * cfg0.batch_size, initial=start * cfg0.batch_size, unit="tok", unit_scale=True,
               desc=f"train x{len(trainers)}", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    began = last_time = time.perf_counter()
    last_step = start
    latest: list[dict] = [{} for _ in trainers]
    step = start

    writer = CheckpointWriter(save_checkpoint)

    def stop_if_nonfinite(i: int) -> None:
        """Stop run i if a loss of it has been non-finite: its trainer has skipped every step since (the
        device found it; the host asks on logging steps and before checkpoints), so nothing is lost
        but the steps in between, and its last checkpoint stays the last good state."""
        at = trainers[i].nonfinite_step()
        if at is not None:
            writer.wait()  # the checkpoint the message names is the one on disk
            failed[i] = (f"non-finite loss at step {at}; stopped, last good checkpoint kept "
                         f"({_checkpoint_step(run_dirs[i])})")
            write_json(run_dirs[i] / "failed.json", {"step": at, "error": failed[i]})

    def save_all(step: int) -> None:
        """Checkpoint every run still training, in the background (train/checkpointing.py)."""
        for i in range(len(trainers)):
            if not failed[i]:
                stop_if_nonfinite(i)
        writer.save([CheckpointJob(run_dirs[i], step, trainer.checkpoint_tensors(), {"trainer": trainer.name},
                                   keep_previous=len(trainers) > 1)
                     for i, trainer in enumerate(trainers) if not failed[i]])

    try:
        stop.deferring = True  # from here a signal stops training at the end of its step, with a checkpoint
        for batch in loader.iterate(start, steps - start):
            logging = (batch.step + 1) % cfg0.log_every == 0 or batch.step + 1 == steps  # metrics only where logged
            for i, trainer in enumerate(trainers):
                if failed[i]:
                    continue
                # the loader's stratified batches hold their dangerous rows first (train/loader.py, Batch);
                # with permuted labels, the rows dangerous under those (train/label_permutation.py)
                x, n_dangerous = ((batch.x, loader.n_dangerous) if relabels[i] is None
                                  else relabels[i].reorder(batch.x, batch.rows))
                metrics = trainer.step(x, n_dangerous, log=logging)
                if metrics is None:
                    stop_if_nonfinite(i)
                    continue
                latest[i] = metrics
            step = batch.step + 1
            bar.update(cfg0.batch_size)
            if step % cfg0.log_every == 0 or step == steps:
                now = time.perf_counter()
                rate = (step - last_step) * cfg0.batch_size / (now - last_time)
                last_step, last_time = step, now
                for i, log in enumerate(logs):
                    if not failed[i]:
                        row = {"step": step, "tokens": step * cfg0.batch_size, **latest[i], "tokens_per_s": rate,
                               "epoch": batch.epoch}
                        log.append(row)
                        if wandb_runs[i] is not None:
                            wandb_runs[i].log(row)
            if stop.received is not None and step < steps:
                save_all(step)
                writer.wait()  # on disk before the message says it is kept
                raise Interrupted(stop.received)
            if step % cfg0.checkpoint_every == 0 and step < steps:
                save_all(step)
            if all(failed):
                break
        writer.wait()
        bar.close()
        seconds = time.perf_counter() - began
        saved = {i: trainer.sae_for_raw_inputs() for i, trainer in enumerate(trainers) if not failed[i]}
        window = min(steps, max(1, WINDOW_TOKENS // cfg0.batch_size))  # the run's last batches
        rates = dict(zip(saved, firing_rates(list(saved.values()),
                                             (b.x for b in loader.iterate(steps - window, window))))) if saved else {}
        results = []
        for i, (trainer, run_dir, c) in enumerate(zip(trainers, run_dirs, cfgs)):
            if not failed[i]:
                stop_if_nonfinite(i)
            if failed[i]:
                results.append(RunResult(run_dir, c, trainer.step_count, failed[i]))
                continue
            if step == start and not latest[i]:  # resumed at the last step: its metrics are the log's last row
                latest[i] = _last_logged(run_dir)
            save_checkpoint(run_dir, trainer.step_count, trainer.state_tensors(), {"trainer": trainer.name},
                            keep_previous=len(trainers) > 1)
            saved[i].save(run_dir, metadata=_sae_metadata(store, trainer, relabels[i]))
            write_sparsity(run_dir, rates[i])
            final = {
                "training_steps": trainer.step_count, "final_loss": latest[i].get("loss"), "layer": store.attrs["layer"],
                "dict_size": trainer.sae.d_sae, "learning_rate": c.lr, "arch": c.arch, "sparsity_penalty": c.l1,
                "sparsity_coeff": float(trainer.sparsity_coeff),
                "ortho_penalty": c.ortho, "trainer": c.trainer, "d_in": d_model, "tokens": trainer.step_count * c.batch_size,
                "final_metrics": latest[i], "seconds_this_session": round(seconds, 2),
                "tokens_per_s_this_session": round((step - start) * c.batch_size / seconds, 1) if seconds else None,
                "lockstep_size": len(trainers), "shards": str(store.path), "input_scale": trainer.input_scale,
            }
            write_json(run_dir / "final_info.json", final)
            results.append(RunResult(run_dir, c, trainer.step_count, None, final))
        for run in filter(None, wandb_runs):
            run.finish()
        return results
    finally:
        writer.close()  # whatever stops training, the checkpoint being written is finished first


def _sample_statistics(loader: ShardLoader, rows: int = 16384) -> tuple[torch.Tensor, float]:
    """Mean activation and mean norm over the first batches of the schedule (the same on every resume)."""
    total, norm_sum, n = None, 0.0, 0
    for batch in loader.iterate(0, steps=max(1, rows // loader.batch_size)):
        x = batch.x.float()
        total = x.sum(dim=0) if total is None else total + x.sum(dim=0)
        norm_sum += float(x.norm(dim=1).sum())
        n += len(x)
    return total / n, norm_sum / n


def _store_statistics(store: ShardStore, cfgs: list[TrainConfig],
                      device: torch.device) -> tuple[torch.Tensor | None, float | None]:
    """Mean activation and mean norm over the whole store, for `store_norm` / `store_mean` (else None)."""
    if not any(c.normalize == "store_norm" or c.b_dec_init == "store_mean" for c in cfgs):
        return None, None
    try:
        stats = stats_for_training(store)
    except HarvestError as exc:
        raise TrainError(str(exc)) from None
    mean = torch.tensor(stats["activations"]["mean"], dtype=torch.float32, device=device)
    return mean, stats["all"]["norm"]["mean"]


def _last_logged(run_dir: Path) -> dict:
    """The training metrics of the last row of metrics.jsonl (those of the final step once it is logged)."""
    rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    try:
        row = json.loads(rows[-1]) if rows else {}
    except ValueError:
        return {}
    return {k: v for k, v in row.items() if k not in ("step", "tokens", "tokens_per_s", "epoch")}


def _checkpoint_step(run_dir: Path) -> str:
    saved = run_dir / "checkpoint" / "latest.json"
    return f"checkpoint at {saved}" if saved.exists() else "no checkpoint yet"


def _sae_metadata(store: ShardStore, trainer: Trainer, relabel: PermutedLabels | None = None) -> dict:
    a = store.attrs
    block = {RECORD_KEY: trainer.label_block.record()} if trainer.label_block is not None else {}
    if relabel is not None:
        block["label_permutation"] = relabel.record(trainer.cfg.seed)
    return {**block, "model_name": a["model"]["id"], "hook_name": a["hook_name"], "hook_head_index": None,
            "prepend_bos": True, "context_size": a["context_length"], "dataset_path": str(store.path),
            "exclude_special_tokens": True, "sae_lens_training_version": None}
