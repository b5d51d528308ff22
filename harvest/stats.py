"""Statistics of a whole shard store: `pipeline stats`, and the trainer's store-wide normalisation.

Computed with dask over the committed rows, chunk by chunk, so a store larger than memory never has
to fit in it (only the 1-D columns and one norm per row are gathered). The activations are bf16
bits, widened exactly to float32 and accumulated in float64, so the results agree with numpy's on
the same rows. The JSON records the store's fingerprint and committed rows: a file that no longer
describes its store is detected and never used.
"""

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import HarvestError
from .store import ShardStore, store_fingerprint

FORMAT = "ratio-sae/stats"
FORMAT_VERSION = 1
STATS_FILE = "stats.json"
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    # A bf16 is the upper half of a float32: shifting its bits up is exact and needs no torch on workers.
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --- computing -----------------------------------------------------------------------------------


def compute_stats(store: ShardStore, scheduler: str | None = None, progress: bool = False) -> dict:
    """Every statistic of the committed rows, as the JSON document `pipeline stats` writes."""
    import dask
    import dask.array as da

    rows = store.rows_committed
    if rows == 0:
        raise HarvestError(f"{store.path} has no committed rows yet: nothing to compute")
    began = time.perf_counter()
    x = da.from_zarr(store.group["acts"])[:rows].map_blocks(bf16_bits_to_float32, dtype=np.float32)
    x64 = x.astype(np.float64)
    lazy = {
        "mean": x.mean(axis=0, dtype=np.float64),
        "var": x.var(axis=0, dtype=np.float64),  # dask combines per-chunk central moments: no cancellation
        "norm": da.sqrt((x64 * x64).sum(axis=1)),
        "label": da.from_zarr(store.group["label"])[:rows],
        "doc": da.from_zarr(store.group["doc"])[:rows],
    }
    for name in ("acts", "label", "doc"):
        store.check_chunk_files(name, 0, rows)  # dask, reading Zarr directly, would take a lost chunk as zeros
    try:
        with _scheduler(scheduler) as (where, compute_on), _progress_bar(progress and scheduler is None, rows):
            values = dict(zip(lazy, dask.compute(*lazy.values(), scheduler=compute_on)))
    except HarvestError:
        raise
    except Exception as exc:  # a checksum mismatch or an undecodable chunk: name it, as training would
        problems = store.verify()
        raise HarvestError(problems[0] if problems else f"{store.path}: cannot compute statistics: {exc}") from None
    return _document(store, values, where, time.perf_counter() - began)


@contextmanager
def _scheduler(address: str | None):
    """Yields a name for where it runs and the scheduler to give dask.compute."""
    if address is None:
        # Named, not dask's default: inside a task of a distributed sweep the default is the cluster,
        # whose workers may all be busy training.
        yield "threads", "threads"
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise HarvestError("--scheduler needs dask.distributed, which is not installed (pip install distributed); "
                           "leave --scheduler out to use threads in this process") from None
    cluster = None
    try:
        if address.startswith("local:"):
            workers = address.removeprefix("local:")
            if not workers.isdigit() or int(workers) < 1:
                raise HarvestError(f"--scheduler {address}: local:N needs a number of workers N >= 1")
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True)
            client = Client(cluster)
        else:
            client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise HarvestError(f"cannot reach the dask scheduler at {address}: {exc}") from None
    try:
        yield address, client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def _progress_bar(enabled: bool, rows: int = 0):
    """The tqdm bar every other command draws, in tokens: dask's tasks as they finish, each counting an
    equal share of the rows (an estimate of the rows read; the tasks are per chunk and alike in size)."""
    if not enabled:
        yield
        return
    from dask.callbacks import Callback
    from tqdm import tqdm

    class TokenBar(Callback):
        def _start_state(self, dsk, state):
            tasks = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self.share = rows / max(tasks, 1)
            self.bar = tqdm(total=rows, unit="tok", unit_scale=True, desc="stats", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)

        def _posttask(self, key, result, dsk, state, worker_id):
            self.bar.update(self.share)

        def _finish(self, dsk, state, errored):
            self.bar.n = self.bar.total if not errored else self.bar.n
            self.bar.close()

    with TokenBar():
        yield


def _document(store: ShardStore, values: dict, scheduler: str, seconds: float) -> dict:
    sources = store.attrs["sources"]
    labels, docs, norms = values["label"], values["doc"], values["norm"]
    by_source = [labels == i for i in range(len(sources))]
    label_names = list(dict.fromkeys(s["label"] for s in sources))
    by_label = {name: np.isin(labels, [i for i, s in enumerate(sources) if s["label"] == name]) for name in label_names}
    source_rows = []
    for i, (source, rows) in enumerate(zip(sources, by_source)):
        per_document = np.unique(docs[rows], return_counts=True)[1]
        source_rows.append({"index": i, "name": source["name"], "label": source["label"], "tokens": int(rows.sum()),
                            "documents": len(per_document), "tokens_per_document": _counts_summary(per_document),
                            "norm": _norm_summary(norms[rows])})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "store": str(store.path),
        "store_fingerprint": store_fingerprint(store.attrs),
        "rows_committed": store.rows_committed,
        "complete": store.complete,
        "d_model": store.d_model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scheduler": scheduler,
        "seconds": round(seconds, 3),
        "activations": {"mean": values["mean"].tolist(), "var": values["var"].tolist(),
                        "total_variance": float(values["var"].sum())},
        "all": {"tokens": len(labels), "documents": sum(s["documents"] for s in source_rows),
                "norm": _norm_summary(norms)},
        "labels": {name: {"tokens": int(rows.sum()),
                          "documents": sum(s["documents"] for s in source_rows if s["label"] == name),
                          "norm": _norm_summary(norms[rows])} for name, rows in by_label.items()},
        "sources": source_rows,
    }


def _norm_summary(norms: np.ndarray) -> dict:
    if not len(norms):
        return {"rows": 0}
    quantiles = np.quantile(norms, QUANTILES)
    return {"rows": len(norms), "mean": float(norms.mean()), "std": float(norms.std()), "min": float(norms.min()),
            **{f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, quantiles)}, "max": float(norms.max())}


def _counts_summary(counts: np.ndarray) -> dict:
    if not len(counts):
        return {}
    return {"mean": float(counts.mean()), "min": int(counts.min()), "median": float(np.median(counts)),
            "max": int(counts.max())}


# --- the file beside the store -------------------------------------------------------------------


def write_stats(stats: dict, path: Path) -> None:
    # Atomic, through a file of its own: trainers of a sweep may read or write it at the same time.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from the store's other readers
        with os.fdopen(fd, "w") as f:
            json.dump(stats, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_stats(path: Path) -> dict:
    try:
        stats = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HarvestError(f"no statistics at {path}: run `pipeline stats`") from None
    except (OSError, ValueError) as exc:
        raise HarvestError(f"cannot read the statistics in {path}: {exc}") from None
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise HarvestError(f"{path} is not a ratio-sae statistics file")
    return stats


def why_stale(stats: dict, store: ShardStore) -> str | None:
    """Why these statistics do not describe the store as it is now; None if they do."""
    if stats.get("format_version") != FORMAT_VERSION:
        return f"has format version {stats.get('format_version')}, this version reads {FORMAT_VERSION}"
    if stats.get("rows_committed") != store.rows_committed:
        return (f"describes {stats.get('rows_committed')} committed rows, the store now has "
                f"{store.rows_committed:,}")
    if stats.get("store_fingerprint") != store_fingerprint(store.attrs):
        return "describes another store (its fingerprint differs)"
    return None


def stats_for_training(store: ShardStore) -> dict:
    """`<store>/stats.json` if it describes the store; otherwise computed now and saved there for next time.

    Says on stderr when it computes and why, since that reads the whole store once.
    """
    path = store.path / STATS_FILE
    if path.exists():
        try:
            stats = read_stats(path)
        except HarvestError as exc:
            problem = str(exc)
        else:
            reason = why_stale(stats, store)
            if reason is None:
                return stats
            problem = f"{path} {reason}"
        _notice(f"{problem}: recomputing the store's statistics")
    else:
        _notice(f"no {path} yet: computing the store's statistics over {store.rows_committed:,} rows "
                "(once; `pipeline stats` does the same)")
    stats = compute_stats(store)
    try:
        write_stats(stats, path)
    except OSError as exc:
        _notice(f"cannot save {path} ({exc.strerror or exc}); they will be computed again next time")
    return stats


def _notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# --- `pipeline stats` ----------------------------------------------------------------------------


def run_stats(path: Path, out: Path | None = None, scheduler: str | None = None, progress: bool = True) -> str:
    """Compute, save and describe; returns the summary for the terminal."""
    store = ShardStore.open(path)
    out = Path(out) if out is not None else store.path / STATS_FILE
    # on stdout, beside the summary: stderr holds the progress bar and, on failure, the one error line
    print(f"Statistics of the {store.rows_committed:,} committed rows of {store.path}, to be written to {out}",
          flush=True)
    stats = compute_stats(store, scheduler=scheduler, progress=progress)
    try:
        write_stats(stats, out)
    except OSError as exc:
        raise HarvestError(f"cannot write {out}: {exc.strerror or exc}") from None
    return describe_stats(stats) + f"\nsaved        {out}"


def describe_stats(stats: dict) -> str:
    mean, var = np.asarray(stats["activations"]["mean"]), np.asarray(stats["activations"]["var"])
    offsets = np.argsort(-np.abs(mean))[:3]
    state = "complete" if stats["complete"] else "INCOMPLETE, committed rows only"
    lines = [
        f"store        {stats['store']}: {stats['rows_committed']:,} rows ({state}), d_model {stats['d_model']}, "
        f"fingerprint {stats['store_fingerprint']}",
        f"computed     in {stats['seconds']:.1f} s on {stats['scheduler']}",
        f"mean         per dimension in [{mean.min():.4g}, {mean.max():.4g}]; largest |mean|: "
        + ", ".join(f"dim {i} ({mean[i]:.4g})" for i in offsets),
        f"variance     per dimension in [{var.min():.4g}, {var.max():.4g}], total {stats['activations']['total_variance']:.6g}",
        "L2 norm      " + f"{'':28s} {'rows':>9s} " + " ".join(f"{k:>9s}" for k in ("mean", "std", "p1", "p50", "p99", "max")),
    ]
    groups = [("all", stats["all"]), *stats["labels"].items(),
              *((f"[{s['index']}] {s['name']}", s) for s in stats["sources"])]
    for name, group in groups:
        norm = group["norm"]
        cells = " ".join(f"{norm[k]:9.4g}" for k in ("mean", "std", "p1", "p50", "p99", "max")) if norm["rows"] else ""
        lines.append(f"  {name[:39]:39s} {norm['rows']:9,d} {cells}")
    lines.append("documents")
    for s in stats["sources"]:
        per_doc = s["tokens_per_document"]
        shape = (f"; tokens per document mean {per_doc['mean']:.1f}, median {per_doc['median']:g}, "
                 f"min {per_doc['min']}, max {per_doc['max']}") if per_doc else ""
        lines.append(f"  [{s['index']}] {s['label']:9s} {s['name']}: {s['tokens']:,} tokens in {s['documents']:,} "
                     f"documents{shape}")
    return "\n".join(lines)
