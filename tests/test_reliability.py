"""Reliability (docs/errors.md): nothing deleted that the user did not ask to delete, a store is one corpus,
checkpoints verified, and every bad file a user can hand over refused in one line with exit 2.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import run_cli
from .test_bad_inputs import own_store, short_run, tree  # noqa: F401  (own_store: a fixture)
from .test_errors import error_line


def refused(monkeypatch, capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert run_cli(monkeypatch, args) == 2
    return error_line(capsys)


@pytest.fixture(scope="module")
def browsed_run(tiny_store, tmp_path_factory):
    """runs/run_1 (a short run on the tiny store) and runs/run_2, in a runs directory of their own."""
    from .test_train import train_args

    runs = tmp_path_factory.mktemp("reliability") / "runs"
    mp = pytest.MonkeyPatch()
    for _ in range(2):
        assert run_cli(mp, train_args(tiny_store, runs, "--tokens", "1280")) == 0
    mp.undo()
    return runs / "run_1"


def browse(run: Path, out: Path | str, *extra: str) -> list[str]:
    return ["browse", str(run), "--features", "1,2", "--examples", "2", "--samples", "0", "--lens-tokens", "0",
            "--device", "cpu", "--out", str(out), *extra]


# --- nothing deleted unasked: browse --out, report --out ------------------------------------------------


def test_browse_refuses_an_out_that_is_not_its_own_site_and_loses_nothing(browsed_run, tmp_path, monkeypatch,
                                                                          capsys):
    runs = browsed_run.parent
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("precious")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = tree(tmp_path), tree(runs)
    line = refused(monkeypatch, capsys, browse(browsed_run, thesis))
    assert "exists, is not empty and is not a feature browser site" in line
    line = refused(monkeypatch, capsys, browse(browsed_run, runs))
    assert "is a runs directory" in line
    line = refused(monkeypatch, capsys, browse(browsed_run, browsed_run))
    assert "exists, is not empty" in line
    line = refused(monkeypatch, capsys, browse(browsed_run, runs / "run_2" / "site"))
    assert "inside the run directory" in line and "run_2" in line
    line = refused(monkeypatch, capsys, browse(browsed_run, runs / "run_7"))
    assert "named as a run" in line
    line = refused(monkeypatch, capsys, browse(browsed_run, notes))
    assert "exists and is not a directory" in line
    assert (tree(tmp_path), tree(runs)) == before  # no `notes.txt.previous`, nothing replaced
    assert not list(tmp_path.glob("*.previous"))


def test_browse_replaces_its_own_site_atomically_and_never_touches_names_beside_it(browsed_run, tmp_path,
                                                                                    monkeypatch, capsys):
    out = tmp_path / "site"
    for name in ("site.partial", "site.previous"):  # the names the site used to write and delete
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    assert run_cli(monkeypatch, browse(browsed_run, out)) == 0
    assert (out / ".ratio-sae-browser").is_file() and (out / "index.html").is_file()
    assert run_cli(monkeypatch, browse(browsed_run, out, "--features", "3")) == 0  # its own site: replaced
    assert sorted(p.name for p in (out / "data" / "features").iterdir()) == ["0.js"]  # feature 3's chunk
    assert (out / "data" / "features" / "0.js").read_text().count("BROWSER.feature(") == 1  # feature 3's page alone
    for name in ("site.partial", "site.previous"):
        assert (tmp_path / name / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "site.partial", "site.previous"]
    (out / "my-notes.md").write_text("mine")  # something of the user's in the site: not replaced
    line = refused(monkeypatch, capsys, browse(browsed_run, out))
    assert "also holds my-notes.md" in line
    assert (out / "my-notes.md").read_text() == "mine"
    # a site written before sites carried the marker is still recognised as one
    (out / "my-notes.md").unlink()
    (out / ".ratio-sae-browser").unlink()
    assert run_cli(monkeypatch, browse(browsed_run, out)) == 0


def test_a_failing_site_write_keeps_the_old_site_and_leaves_no_staging(browsed_run, tmp_path, monkeypatch,
                                                                       capsys):
    import errno

    import evaluate.browser.site as site

    out = tmp_path / "site"
    assert run_cli(monkeypatch, browse(browsed_run, out)) == 0
    before = tree(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out) + "/data/index.js")

    monkeypatch.setattr(site, "_script", disk_full)
    line = refused(monkeypatch, capsys, browse(browsed_run, out, "--features", "3"))
    assert "No space left on device" in line and "free space" in line
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def _fake_evaluated_runs(runs: Path, n: int = 2) -> None:
    for i in range(1, n + 1):
        run = runs / f"run_{i}"
        (run / "eval").mkdir(parents=True)
        (run / "train_config.json").write_text(json.dumps({"trainer": "ratio", "arch": "relu", "ortho": 0.1 * i,
                                                           "d_sae": 64, "seed": 0}))
        (run / "eval" / "unlearning.json").write_text(json.dumps({
            "score_at_retain": {"0.01": {"value": 0.1 * i, "ci95": [0.0, 0.2 * i]}}, "settings": [], "retain_tolerance_nats": 0.03}))


def test_report_refuses_an_out_that_is_not_a_report_and_replaces_its_own(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    _fake_evaluated_runs(runs)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("precious")
    before = tree(tmp_path)
    line = refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(thesis)])
    assert "is not empty and is not a report written by `pipeline report`" in line
    line = refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(runs)])
    assert "is a runs directory" in line
    line = refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(runs / "run_1")])
    assert "the run directory" in line
    assert tree(tmp_path) == before
    out = tmp_path / "report"
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert (out / ".ratio-sae-report").is_file() and (out / "report.md").is_file()
    assert run_cli(monkeypatch, ["report", "run_1", "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert "| run_2 |" not in (out / "report.md").read_text()


def test_a_report_that_fails_half_way_leaves_the_old_report_whole(tmp_path, monkeypatch, capsys):
    import errno

    import evaluate.report.main as report_main

    runs = tmp_path / "runs"
    _fake_evaluated_runs(runs)
    out = tmp_path / "report"
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):  # the third plot of five: report.md and two plots already written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "unlearning_tradeoff.png")

    monkeypatch.setattr(report_main, "draw_tradeoff", disk_full)
    line = refused(monkeypatch, capsys, ["report", "run_1", "--runs-dir", str(runs), "--out", str(out)])
    assert "No space left on device" in line
    assert {p: p.read_bytes() for p in out.iterdir()} == before  # report.md of the old report, with its plots
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]
    shutil.rmtree(out)
    assert refused(monkeypatch, capsys, ["report", "run_1", "--runs-dir", str(runs), "--out", str(out)])
    assert not out.exists()  # no report without its plots


def test_a_symlink_loop_as_out_is_one_line(browsed_run, tmp_path, monkeypatch, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    runs = tmp_path / "runs"
    _fake_evaluated_runs(runs)
    assert "symlink loop" in refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(loop)])
    assert "symlink loop" in refused(monkeypatch, capsys, browse(browsed_run, loop))
    assert loop.is_symlink()


# --- finished is finished --------------------------------------------------------------------------------


def test_a_resume_that_finds_the_run_finished_under_its_lock_refuses_and_keeps_the_results(own_store, tmp_path,
                                                                                             monkeypatch, capsys):
    import train.loop as loop

    run = short_run(own_store, tmp_path / "runs", monkeypatch)
    final = (run / "final_info.json").read_bytes()
    before = tree(run)
    (run / "final_info.json").unlink()  # as the first trainer's run looked when this command started
    real_lock = loop.run_lock

    def finished_meanwhile(run_dir):  # the first trainer writes its results and exits while this one starts
        (run_dir / "final_info.json").write_bytes(final)
        return real_lock(run_dir)

    monkeypatch.setattr(loop, "run_lock", finished_meanwhile)
    line = refused(monkeypatch, capsys, ["train", "--resume", "run_1", "--runs-dir", str(tmp_path / "runs")])
    assert "finished while this command was starting" in line and "nothing to resume" in line
    assert tree(run) == before and (run / "final_info.json").read_bytes() == final


# --- a store is one corpus ---------------------------------------------------------------------------------


def rewind(path: Path, rows: int) -> None:
    """What a harvest killed after committing `rows` rows leaves (the chunks after them are uncommitted)."""
    from harvest.store import ShardStore

    writable = ShardStore.open(path, mode="r+")
    writable.group.attrs.update({"rows_committed": rows, "complete": False})


@pytest.fixture
def own_inputs(tiny_model, corpora, tmp_path):
    """A copy of the tiny model and of the corpora, which a test may change, and the store harvested from them."""
    from .conftest import harvest_args, harvested

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    sources = {k: Path(shutil.copy(v, tmp_path / v.name)) for k, v in corpora.items()}
    args = harvest_args(model, sources, tmp_path / "store")
    return model, sources, args, harvested(args)


def test_a_harvest_resumed_on_changed_sources_or_tokenizer_is_refused_naming_which(own_inputs, monkeypatch, capsys):
    from harvest.store import ShardStore, store_fingerprint

    model, sources, args, store = own_inputs
    digests = store.attrs["content_digests"]
    assert [s["name"] for s in digests["sources"]] == ["danger.jsonl", "safe.txt", "safe.parquet"]
    assert all(len(s["sha256"]) == 64 for s in digests["sources"]) and len(digests["tokenizer_sha256"]) == 64
    rewind(store.path, 512)
    before = tree(store.path)
    text = sources["danger"].read_bytes()
    sources["danger"].write_bytes(text.replace(b'"text": "', b'"text": "changed ', 1))
    line = refused(monkeypatch, capsys, args)
    assert "the content of source danger.jsonl changed since the store was started" in line
    assert "safe.txt" not in line and "tokenizer" not in line
    sources["danger"].write_bytes(text)
    tokenizer = model / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.write_bytes(original + b"\n")  # the same tokenizer to transformers, other bytes
    line = refused(monkeypatch, capsys, args)
    assert "the tokenizer files of" in line and "changed since the store was started" in line
    assert tree(store.path) == before
    tokenizer.write_bytes(original)
    assert run_cli(monkeypatch, args) == 0  # the same inputs again: resumes
    resumed = ShardStore.open(store.path)
    assert resumed.complete and store_fingerprint(resumed.attrs) == store_fingerprint(store.attrs)


def test_the_store_fingerprint_includes_the_digests_and_older_stores_keep_theirs(tiny_store):
    import hashlib

    from harvest.store import store_fingerprint

    attrs = dict(tiny_store.attrs)
    other = {**attrs, "content_digests": {**attrs["content_digests"], "tokenizer_sha256": "0" * 64}}
    assert store_fingerprint(other) != store_fingerprint(attrs)  # a run on the re-harvested corpus is told so
    old = {k: v for k, v in attrs.items() if k != "content_digests"}
    key = {k: old.get(k) for k in ("config", "model", "layer", "rows_committed", "compute_dtype")}
    assert store_fingerprint(old) == hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_an_older_store_without_digests_resumes_and_says_what_it_cannot_check(own_inputs, monkeypatch, capsys):
    from harvest.store import ShardStore

    model, sources, args, store = own_inputs
    writable = ShardStore.open(store.path, mode="r+")
    attrs = dict(writable.group.attrs)
    del attrs["content_digests"]
    writable.group.attrs.put(attrs)
    rewind(store.path, 512)
    capsys.readouterr()
    assert run_cli(monkeypatch, ["info", str(store.path)]) == 0
    assert "no digests of sources or tokenizer" in capsys.readouterr().out
    assert run_cli(monkeypatch, args) == 0
    err = capsys.readouterr().err
    assert "was written before stores recorded digests of their sources and tokenizer" in err
    assert ShardStore.open(store.path).complete


# --- checkpoints verified --------------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's last value
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_named_and_the_older_intact_one_resumes_to_the_same_weights(own_store, tmp_path,
                                                                                            monkeypatch, capsys):
    from train.trainers.base import Trainer

    from .conftest import interrupt_training_at
    from .test_train import assert_same_weights, train_args

    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(own_store, runs / "a")) == 0
    original = interrupt_training_at(monkeypatch, 15)
    assert run_cli(monkeypatch, train_args(own_store, runs / "b")) == 130
    run = runs / "b" / "run_1"
    older = tmp_path / "step_10"
    shutil.copytree(run / "checkpoint" / "step_10", older)
    monkeypatch.setattr(Trainer, "step", original)
    interrupt_training_at(monkeypatch, 27)
    resume = ["train", "--resume", "run_1", "--runs-dir", str(runs / "b"), "--no-progress"]
    assert run_cli(monkeypatch, resume) == 130
    monkeypatch.setattr(Trainer, "step", original)
    checkpoint = run / "checkpoint"
    assert json.loads((checkpoint / "step_20" / "state.json").read_text())["sha256"]["state.safetensors"]
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == ["step_20"]

    # one flipped bit, and no older checkpoint: named as damaged, nothing resumed or changed
    state = checkpoint / "step_20" / "state.safetensors"
    intact = state.read_bytes()
    _flip_last_byte(state)
    before = tree(run)
    line = refused(monkeypatch, capsys, resume)
    assert f"the checkpoint {checkpoint / 'step_20'}" in line and "is damaged" in line and "sha256" in line
    state.write_bytes(b"")  # zero bytes, as a full disk may leave it
    assert "is damaged" in refused(monkeypatch, capsys, resume)
    state.write_bytes(intact[: len(intact) // 2])  # truncated
    assert "is damaged" in refused(monkeypatch, capsys, resume)
    state.write_bytes(intact)
    _flip_last_byte(state)
    assert tree(run) == before

    # latest.json: garbage, a checkpoint outside the run, a missing step
    latest = checkpoint / "latest.json"
    pointer = latest.read_text()
    for text, expected in (("garbage", "is damaged (not JSON"),
                           ('{"step": 20, "dir": "../../../a/run_1/checkpoint/step_20"}', "only a checkpoint inside its own run"),
                           ('{"step": "20", "dir": "step_20"}', "not a step number"),
                           ('{"step": 268, "dir": "step_268"}', "step_268 that")):
        latest.write_text(text)
        line = refused(monkeypatch, capsys, resume)
        assert expected in line, line
        assert "resuming from" not in capsys.readouterr().out
    latest.write_text(pointer)

    # the older intact checkpoint back beside the damaged one: the resume falls back to it, saying so
    shutil.copytree(older, checkpoint / "step_10")
    capsys.readouterr()
    assert run_cli(monkeypatch, resume) == 0
    captured = capsys.readouterr()
    assert f"the checkpoint {checkpoint / 'step_20'} is damaged" in captured.err
    assert "resuming from the older intact one at step 10" in captured.err
    assert "resuming from the checkpoint at step 10" in captured.out
    assert_same_weights(runs / "a" / "run_1", run)


# --- every file a user can hand over ------------------------------------------------------------------


def _external_sae(root: Path, d_in: int = 64, d_sae: int = 48) -> Path:
    from train.sae import SAE

    directory = root / "sae"
    SAE(d_in, d_sae, seed=0).save(directory, metadata={"hook_name": "blocks.2.hook_resid_post"})
    return directory


def _edit_cfg(directory: Path, change) -> None:
    path = directory / "cfg.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _edit_weights(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "sae_weights.safetensors")
    change(tensors)
    save_file(tensors, directory / "sae_weights.safetensors")


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


def _drop(key):
    return lambda d: d.pop(key)


BAD_SAE_DIRS = {
    "cfg.json not JSON": (lambda d: (d / "cfg.json").write_text("{not json"), "cfg.json is not valid JSON"),
    "cfg.json empty": (lambda d: (d / "cfg.json").write_text(""), "cfg.json is empty"),
    "cfg.json a list": (lambda d: (d / "cfg.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    "metadata a string": (lambda d: _edit_cfg(d, _set("metadata", "x")), "metadata is 'x', not an object"),
    "no d_sae": (lambda d: _edit_cfg(d, _drop("d_sae")), "has no d_sae"),
    "negative d_sae": (lambda d: _edit_cfg(d, _set("d_sae", -4)), "d_sae is -4 (int), not a positive integer"),
    "d_in a string": (lambda d: _edit_cfg(d, _set("d_in", "64")), "d_in is '64' (a string), not a positive integer"),
    "d_sae 10^10": (lambda d: _edit_cfg(d, _set("d_sae", 10 ** 10)), "W_dec has shape [48, 64], but cfg.json's"),
    "wrong shape": (lambda d: _edit_weights(d, lambda t: t.__setitem__("b_enc", t["b_enc"][:40].clone())),
                    "b_enc has shape [40]"),
    "int32 weights": (lambda d: _edit_weights(d, lambda t: t.__setitem__("b_dec", t["b_dec"].int())),
                      "b_dec has dtype I32"),
    "no W_dec": (lambda d: _edit_weights(d, _drop("W_dec")), "missing W_dec"),
    "extra tensor": (lambda d: _edit_weights(d, lambda t: t.__setitem__("extra", t["b_dec"].clone())),
                     "unexpected extra"),
    "NaN weights": (lambda d: _edit_weights(d, lambda t: t["W_enc"].__setitem__((0, 0), float("nan"))),
                    "W_enc holds 1 NaN or Inf value(s)"),
    "Inf weights": (lambda d: _edit_weights(d, lambda t: t["b_enc"].__setitem__(3, float("inf"))),
                    "b_enc holds 1 NaN or Inf value(s)"),
    "zero-byte weights": (lambda d: (d / "sae_weights.safetensors").write_bytes(b""), "not a readable safetensors"),
    "truncated weights": (lambda d: (d / "sae_weights.safetensors").write_bytes(
        (d / "sae_weights.safetensors").read_bytes()[:5000]), "not a readable safetensors"),
    "pickle as weights": (lambda d: (d / "sae_weights.safetensors").write_bytes(
        __import__("pickle").dumps({"W_dec": [1.0]})), "not a readable safetensors"),
    "topk without k": (lambda d: _edit_cfg(d, _set("architecture", "topk")), "has no k"),
    "k above d_sae": (lambda d: _edit_cfg(d, lambda c: c.update(architecture="topk", k=100)), "k is 100, more than d_sae 48"),
}


@pytest.mark.parametrize("case", list(BAD_SAE_DIRS))
def test_a_malformed_external_sae_directory_is_one_line_naming_the_file(case, tiny_store, tmp_path, monkeypatch,
                                                                          capsys):
    directory = _external_sae(tmp_path)
    damage, expected = BAD_SAE_DIRS[case]
    damage(directory)
    before = tree(directory)
    line = refused(monkeypatch, capsys, ["eval", str(directory), "--shards", str(tiny_store.path), "--device", "cpu"])
    assert expected in line, line
    assert str(directory) in line
    assert tree(directory) == before and not (directory / "eval").exists()


def test_corrupt_run_files_read_by_the_report_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import numpy as np

    runs = tmp_path / "runs"
    _fake_evaluated_runs(runs)
    out = tmp_path / "report"
    run = runs / "run_2"
    cases = [
        (run / "train_config.json", "{truncated", "train_config.json is not valid JSON"),
        (run / "train_config.json", "", "train_config.json is empty"),
        (run / "eval" / "unlearning.json", "[1, 2]", "unlearning.json holds a JSON list, not an object"),
        (run / "eval" / "unlearning.json", b"\xff\xfe", "unlearning.json is not UTF-8 text"),
    ]
    for path, content, expected in cases:
        kept = path.read_bytes()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        line = refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(out)])
        assert expected in line and str(path) in line, line
        path.write_bytes(kept)
    draws = run / "eval" / "unlearning_bootstrap.npz"
    np.savez(draws, score=np.arange(5.0))
    whole = draws.read_bytes()
    draws.write_bytes(whole[: len(whole) // 2])
    line = refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(out)])
    assert f"{draws} is truncated or not an .npz file" in line
    np.savez(draws, score=np.array([{"a": 1}], dtype=object))
    line = refused(monkeypatch, capsys, ["report", "--runs-dir", str(runs), "--out", str(out)])
    assert f"{draws} holds something other than numeric arrays" in line
    assert not out.exists()


def test_a_corrupt_train_config_is_one_line_for_eval_and_resume(own_store, tmp_path, monkeypatch, capsys):
    run = short_run(own_store, tmp_path / "runs", monkeypatch, "--checkpoint-every", "5")
    (run / "final_info.json").unlink()
    config = run / "train_config.json"
    config.write_text('{"shards": ')
    before = tree(run)
    line = refused(monkeypatch, capsys, ["eval", str(run), "--device", "cpu"])
    assert f"{config} is not valid JSON" in line
    line = refused(monkeypatch, capsys, ["train", "--resume", str(run)])
    assert f"{config} is not valid JSON" in line
    config.write_text(json.dumps({"shards": str(own_store.path), "lr": "fast", "lockstep_group": ["run_1"]}))
    line = refused(monkeypatch, capsys, ["train", "--resume", str(run)])
    assert f"invalid training config recorded in {config}: lr" in line
    config.write_text(json.dumps({"lockstep_group": "run_1"}))
    line = refused(monkeypatch, capsys, ["train", "--resume", str(run)])
    assert "lockstep_group is 'run_1', not a list of run names" in line
    before = {k: v for k, v in before.items() if k != "train_config.json"}
    assert {k: v for k, v in tree(run).items() if k != "train_config.json"} == before


@pytest.mark.parametrize("text, position", [("layer: [1, 2\ntokens: 3\n", "line 2, column 7"),
                                            ("layer: !!python/object/apply:os.system ['echo hi']\n", "line 1, column 8")])
def test_a_yaml_error_is_one_line_with_its_position(text, position, tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in (["harvest", "--config", str(path)], ["train", "--config", str(path)],
                    ["eval", "run_1", "--config", str(path)]):
        line = refused(monkeypatch, capsys, command)
        assert "is not valid YAML" in line and position in line, line
    assert not (tmp_path / "runs").exists()


# --- config values in range ---------------------------------------------------------------------------------


def test_a_flag_the_sweep_grid_overrides_and_a_bad_store_in_the_grid_are_refused_before_any_run(own_store, tmp_path,
                                                                                                monkeypatch, capsys):
    from .test_train import train_args

    runs = tmp_path / "runs"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  ortho: [0.1, 0.2]\n")
    args = [a for a in train_args(own_store, runs) if a != "train"]
    line = refused(monkeypatch, capsys, ["train", "--sweep", str(sweep), *args, "--ortho", "0.5"])
    assert "--ortho 0.5 was given on the command line, but the grid sets ortho for each run (0.1, 0.2)" in line
    sweep.write_text(f"grid:\n  shards: ['{own_store.path}', '{tmp_path / 'no-store'}']\n")
    no_shards = [a for i, a in enumerate(args) if a != "--shards" and args[i - 1] != "--shards"]
    line = refused(monkeypatch, capsys, ["train", "--sweep", str(sweep), *no_shards])
    assert "no-store" in line
    assert not runs.exists() or not list(runs.iterdir())  # the first run did not train meanwhile


def test_out_of_range_training_and_eval_values_are_refused(own_store, tmp_path, monkeypatch, capsys):
    from .test_train import train_args

    runs = tmp_path / "runs"
    line = refused(monkeypatch, capsys, train_args(own_store, runs, "--dict-size", "64", "--target-l0", "100000"))
    assert "--target-l0 100000 is more than the SAE's 64 features" in line
    assert not runs.exists() or not list(runs.iterdir())
    for value in ("-0.1", "1.5"):
        line = refused(monkeypatch, capsys, ["eval", "run_1", "--runs-dir", str(runs), "--retain-threshold", value])
        assert "retain_thresholds.0" in line
    config = tmp_path / "eval.yaml"
    config.write_text("heldout_docs: 4\n")
    line = refused(monkeypatch, capsys, ["eval", "run_1", "--config", str(config), "--retain-threshold", "1.5"])
    assert line.startswith("error: invalid eval options: ") and str(config) not in line  # the flag, not the file
    config.write_text("heldout_docs: 0\n")
    assert f"invalid eval options in {config}: heldout_docs" in refused(monkeypatch, capsys,
                                                                         ["eval", "run_1", "--config", str(config)])


def test_the_same_source_twice_and_a_context_beyond_the_models_positions_are_refused(tiny_model, corpora, tmp_path,
                                                                                     monkeypatch, capsys):
    from .conftest import harvest_args

    out = tmp_path / "store"
    args = harvest_args(tiny_model, corpora, out)
    line = refused(monkeypatch, capsys, harvest_args(tiny_model, {**corpora, "safe_txt": corpora["danger"]}, out))
    assert "danger.jsonl is given as both a dangerous and a safe source" in line
    line = refused(monkeypatch, capsys, harvest_args(tiny_model, {**corpora, "safe_parquet": corpora["safe_txt"]}, out))
    assert "safe.txt is given twice as a safe source" in line
    line = refused(monkeypatch, capsys, [a if a != "64" else "1024" for a in args])
    assert "--context-length 1024 is more than" in line and "(256, max_position_embeddings)" in line
    assert not out.exists()


# --- signals ----------------------------------------------------------------------------------------------------


def _copied_runs(browsed_run: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(browsed_run.parent, runs, ignore=shutil.ignore_patterns("eval", "browser", ".train.lock"))
    return runs


def test_sigterm_during_eval_drops_the_sae_being_measured_says_how_to_resume_and_resumes(browsed_run, tmp_path,
                                                                                           monkeypatch, capsys):
    import signal

    import evaluate.runner as runner

    from .test_eval import SMALL_EVAL

    runs = _copied_runs(browsed_run, tmp_path)
    real_finish, calls = runner._finish, []

    def finish_then_sigterm(t, *args):
        calls.append(t.name)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # while the second SAE is being measured
        return real_finish(t, *args)

    monkeypatch.setattr(runner, "_finish", finish_then_sigterm)
    args = ["eval", "run_1", "run_2", "--runs-dir", str(runs), "--suite", "unlearning", "--multiplier", "1",
            "--multiplier", "10", *SMALL_EVAL]
    capsys.readouterr()
    assert run_cli(monkeypatch, args) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: the results already written") and "run the same command again" in last
    first = (runs / "run_1" / "eval" / "unlearning.json").read_bytes()
    assert not (runs / "run_2" / "eval" / "unlearning.json").exists()
    monkeypatch.setattr(runner, "_finish", real_finish)
    assert run_cli(monkeypatch, args) == 0
    assert (runs / "run_1" / "eval" / "unlearning.json").read_bytes() == first  # read back, not measured again
    assert (runs / "run_2" / "eval" / "unlearning.json").exists()


def test_sigterm_during_browse_keeps_the_earlier_site_whole(browsed_run, tmp_path, monkeypatch, capsys):
    import signal

    import evaluate.browser.main as browser_main

    out = tmp_path / "site"
    assert run_cli(monkeypatch, browse(browsed_run, out)) == 0
    before = tree(out)
    real = browser_main.decode_contexts

    def decode_then_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(browser_main, "decode_contexts", decode_then_sigterm)
    capsys.readouterr()
    assert run_cli(monkeypatch, browse(browsed_run, out, "--features", "3")) == 143
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("stopped by SIGTERM: no new site was written"), err
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_wandb_without_a_login_is_one_line_before_any_run_directory(own_store, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    from .test_train import train_args

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    runs = tmp_path / "runs"
    line = refused(monkeypatch, capsys, train_args(own_store, runs, "--wandb", "my-project"))
    assert "--wandb needs a W&B login" in line
    assert not runs.exists() or not list(runs.iterdir())


def test_a_deleted_manifest_is_one_line_about_the_manifest(tiny_store, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_store.path, tmp_path / "store")
    shutil.rmtree(tmp_path / "store" / "chunk_digests" / "c")
    capsys.readouterr()
    assert run_cli(monkeypatch, ["info", str(tmp_path / "store"), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the chunk manifest (chunk_digests) is missing its file(s) c/0/0" in err, err


def test_a_symlink_loop_or_a_special_path_as_runs_dir_or_out_is_one_line(own_store, tiny_model, corpora, tmp_path,
                                                                            monkeypatch, capsys):
    from .conftest import harvest_args
    from .test_train import train_args

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = refused(monkeypatch, capsys, train_args(own_store, loop))
    assert f"cannot use {loop}" in line and "symbolic link to itself" in line
    line = refused(monkeypatch, capsys, harvest_args(tiny_model, corpora, loop))
    assert f"cannot use {loop}" in line
    line = refused(monkeypatch, capsys, harvest_args(tiny_model, corpora, Path("/proc/self/store")))
    assert "cannot use /proc/self/store" in line
    assert loop.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["loop", "store"]


def test_a_model_of_an_unknown_type_is_one_line_without_the_libraries_warning(tiny_model, corpora, tmp_path):
    import subprocess
    import sys

    from .conftest import harvest_args

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    root = Path(__file__).resolve().parent.parent
    # in a process of its own: transformers writes its warnings through a handler made at import
    done = subprocess.run([sys.executable, str(root / "pipeline.py"), *harvest_args(model, corpora, tmp_path / "store")],
                          cwd=root, capture_output=True, text=True, timeout=300)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("error: cannot load model") and "no_such_model" in err[0]


def test_a_damaged_array_metadata_file_is_one_line_naming_it(tiny_store, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store.path, store)
    (store / "acts" / "zarr.json").write_text("{garbage")
    for command in (["info", str(store)], ["stats", str(store), "--out", str(tmp_path / "s.json"), "--no-progress"],
                    ["train", "--shards", str(store), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]):
        line = refused(monkeypatch, capsys, command)
        assert f"{store}: the metadata of its array acts (acts/zarr.json) is damaged" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s.json").exists()
