"""Bad inputs across the stages (docs/errors.md): one line on stderr, exit 2, nothing written or lost.

Cases already covered elsewhere (missing model, layer out of range, empty and non-UTF-8 sources,
incomplete store, unknown run, non-finite loss, resume of a harvest with another config) are listed
in docs/errors.md with the test that backs each; this file holds the rest.
"""

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harvest.store import ShardStore
from train.sae import SAE

from .conftest import harvest_args, run_cli
from .test_errors import error_line, set_flag
from .test_train import train_args

ROOT = Path(__file__).resolve().parent.parent


def tree(root: Path) -> dict[str, int]:
    """Every file under `root` with its size: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def own_store(tiny_store, tmp_path) -> ShardStore:
    """A copy of the tiny store that a test may change."""
    path = tmp_path / "store"
    shutil.copytree(tiny_store.path, path)
    return ShardStore.open(path)


def short_run(store: ShardStore, runs: Path, monkeypatch, *extra: str) -> Path:
    """A finished 10-step run on `store`."""
    assert run_cli(monkeypatch, train_args(store, runs, "--tokens", "1280", *extra)) == 0
    return sorted(runs.iterdir(), key=lambda p: int(p.name.split("_")[1]))[-1]


def as_if_harvested_at_layer(store: ShardStore, layer: int) -> None:
    """What `pipeline harvest --overwrite` at another layer leaves at the same path, as far as the
    eval and --resume can tell (the attributes they compare), without the cost of a harvest."""
    writable = ShardStore.open(store.path, mode="r+")
    config = {**writable.attrs["config"], "layer": layer}
    writable.group.attrs.update({"layer": layer, "hook_name": f"blocks.{layer}.hook_resid_post", "config": config})


# --- a store from another model or layer; an SAE of another width ------------------------------------


def test_eval_against_a_store_replaced_by_another_layer_is_refused(own_store, tmp_path, monkeypatch, capsys):
    run = short_run(own_store, tmp_path / "runs", monkeypatch)
    as_if_harvested_at_layer(own_store, 1)
    before = tree(run)
    capsys.readouterr()
    assert run_cli(monkeypatch, ["eval", str(run), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "trained on another store" in line and "blocks.2.hook_resid_post' -> 'blocks.1.hook_resid_post'" in line
    assert tree(run) == before and not (run / "eval").exists()


def test_eval_of_an_sae_whose_width_differs_from_the_store_is_refused(own_store, tmp_path, monkeypatch, capsys):
    run = short_run(own_store, tmp_path / "runs", monkeypatch)
    SAE(32, 48, seed=0).save(run)  # d_in 32 against the store's d_model 64
    capsys.readouterr()
    assert run_cli(monkeypatch, ["eval", "run_1", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]) == 2
    assert "the SAE has d_in 32 but the store" in error_line(capsys)
    assert not (run / "eval").exists()


def test_eval_of_a_run_whose_store_is_gone_is_refused(own_store, tmp_path, monkeypatch, capsys):
    run = short_run(own_store, tmp_path / "runs", monkeypatch)
    shutil.rmtree(own_store.path)
    capsys.readouterr()
    assert run_cli(monkeypatch, ["eval", str(run), "--device", "cpu"]) == 2
    assert "which cannot be opened now: no shard store at" in error_line(capsys)
    assert not (run / "eval").exists()


def test_resume_against_a_changed_store_is_refused_and_keeps_the_run(own_store, tmp_path, monkeypatch, capsys):
    run = short_run(own_store, tmp_path / "runs", monkeypatch, "--checkpoint-every", "5")
    (run / "final_info.json").unlink()  # as if stopped after its last checkpoint
    (run / "sae_weights.safetensors").unlink()
    as_if_harvested_at_layer(own_store, 1)
    before = tree(run)
    capsys.readouterr()
    assert run_cli(monkeypatch, ["train", "--resume", str(run), "--no-progress"]) == 2
    assert "was trained on another store" in error_line(capsys)
    assert tree(run) == before


# --- non-finite activations -------------------------------------------------------------------------


def test_nan_activations_stop_the_run_with_the_step_and_keep_nothing_half_written(own_store, tmp_path, monkeypatch,
                                                                                 capsys):
    writable = ShardStore.open(own_store.path, mode="r+")
    nan = np.full((own_store.chunk_rows, own_store.d_model), 0x7FC0, np.uint16)  # bf16 NaN
    writable.write_rows(0, {"acts": nan})
    rows = writable.rows_committed
    writable.group.attrs["rows_committed"] = 0  # rewritten and committed again, as a harvest writes
    writable.commit(rows)
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert run_cli(monkeypatch, train_args(own_store, runs, "--tokens", "1280")) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert re.search(r"run_1: FAILED, non-finite loss at step \d+", captured.out), captured.out
    assert "stopped on a non-finite loss" in captured.err
    failed = json.loads((runs / "run_1" / "failed.json").read_text())
    assert "non-finite loss" in failed["error"]
    assert not (runs / "run_1" / "final_info.json").exists()
    assert not (runs / "run_1" / "sae_weights.safetensors").exists()


# --- hyperparameters, trainers, presets, sweeps ------------------------------------------------------


@pytest.mark.parametrize("flag,value,named", [
    ("--lr", "-1e-3", "lr"), ("--lr", "0", "lr"), ("--lr", "nan", "lr"), ("--l1", "-0.1", "l1"),
    ("--l1", "inf", "l1"), ("--ortho", "-1", "ortho"), ("--batch-size", "0", "batch_size"),
    ("--tokens", "0", "tokens"), ("--dict-size", "0", "dict_size"), ("--warmup-steps", "-1", "warmup_steps"),
    ("--log-every", "0", "log_every"), ("--checkpoint-every", "0", "checkpoint_every"),
    ("--dangerous-fraction", "1", "dangerous_fraction"), ("--window-chunks", "0", "window_chunks"),
])
def test_bad_hyperparameters_are_named_before_any_run_directory(tiny_store, tmp_path, monkeypatch, capsys, flag,
                                                                value, named):
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, set_flag(train_args(tiny_store, runs), flag, value)) == 2
    assert f"{named}:" in error_line(capsys)
    assert not runs.exists()


def test_unknown_trainer_and_preset_suggest_the_closest(tiny_store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--trainer", "ratoi")) == 2
    assert "trainer: Input should be" in (line := error_line(capsys)) and "(did you mean 'ratio'?)" in line
    preset = ROOT / "configs" / "seed" / "run_99.yaml"
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--config", str(preset))) == 2
    line = error_line(capsys)
    assert f"file not found: {preset}" in line and "did you mean" in line and "run_9.yaml" in line
    assert not runs.exists()


@pytest.mark.parametrize("text,expected", [
    ("base: {trainer: ratio}\ngrid: {orthoo: [0.1]}\n", "unknown option 'orthoo' (did you mean 'ortho'?)"),
    ("base: {dict_sise: 96}\ngrid: {ortho: [0.1]}\n", "unknown option 'dict_sise' (did you mean 'dict_size'?)"),
    ("base: {}\ngird: {ortho: [0.1]}\n", "['gird'] (did you mean 'grid'?)"),
    ("grid: {trainer: [ratio, baselin]}\n", "(did you mean 'baseline'?)"),
    ("grid: {ortho: 0.1}\n", "grid must map each option to a non-empty list"),
    ("base: [ortho]\n", "base must map options to values"),
])
def test_sweep_typos_name_the_closest_option_before_any_run(tiny_store, tmp_path, monkeypatch, capsys, text, expected):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, [*train_args(tiny_store, runs), "--sweep", str(sweep)]) == 2
    assert expected in error_line(capsys)
    assert not runs.exists()


def test_train_config_typo_and_non_utf8_config_fail_before_any_work(tiny_store, tmp_path, monkeypatch, capsys):
    import train.loop

    monkeypatch.setattr(train.loop, "open_store", lambda path: pytest.fail("the store was opened"))
    runs = tmp_path / "runs"
    config = tmp_path / "train.yaml"
    config.write_text("l_1: 0.1\n")
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--config", str(config))) == 2
    assert "l_1: Extra inputs are not permitted (did you mean 'l1'?)" in error_line(capsys)
    config.write_bytes("ortho: 0.1 # \xe9\n".encode("latin-1"))
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--config", str(config))) == 2
    assert "is not UTF-8 text" in error_line(capsys)
    assert not runs.exists()


def test_harvest_config_typo_fails_before_the_model_loads(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    import harvest.harvester

    monkeypatch.setattr(harvest.harvester, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "store"
    config = tmp_path / "harvest.yaml"
    config.write_text("layr: 2\n")
    assert run_cli(monkeypatch, [*harvest_args(tiny_model, corpora, out), "--config", str(config)]) == 2
    assert "layr: Extra inputs are not permitted (did you mean 'layer'?)" in error_line(capsys)
    config.write_text(f"dangerous: [{{source: {corpora['danger']}, txt_field: text}}]\n")
    args = [a for a in harvest_args(tiny_model, corpora, out) if a != str(corpora["danger"])]
    args.remove("--dangerous")
    assert run_cli(monkeypatch, [*args, "--config", str(config)]) == 2
    assert "(did you mean 'text_field'?)" in error_line(capsys)
    assert run_cli(monkeypatch, set_flag(harvest_args(tiny_model, corpora, out), "--codec", "zstdd")) == 2
    assert "(did you mean 'zstd'?)" in error_line(capsys)
    assert not out.exists()


def test_eval_config_typo_fails_before_the_model_loads(own_store, tmp_path, monkeypatch, capsys):
    import evaluate.runner

    run = short_run(own_store, tmp_path / "runs", monkeypatch)
    monkeypatch.setattr(evaluate.runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = tmp_path / "eval.yaml"
    config.write_text("n_feature: [5]\n")
    capsys.readouterr()
    assert run_cli(monkeypatch, ["eval", str(run), "--config", str(config)]) == 2
    assert "(did you mean 'n_features'?)" in error_line(capsys)
    assert run_cli(monkeypatch, ["eval", str(run), "--suite", "unlerning"]) == 2
    assert "(did you mean 'unlearning'?)" in error_line(capsys)
    assert not (run / "eval").exists()


# --- run names and paths -----------------------------------------------------------------------------


@pytest.fixture
def project(own_store, tmp_path, monkeypatch):
    """A project directory (the working directory) with runs/run_1, and a plain directory beside it."""
    project = tmp_path / "project"
    project.mkdir()
    short_run(own_store, project / "runs", monkeypatch)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    return project


@pytest.mark.parametrize("command", [
    ["eval", "../x"], ["eval", "../../x"], ["eval", "runs/run_1/../../../x"], ["eval", "run_1/../../etc"],
    ["eval", "run_1/../run_1"], ["eval", "/etc"], ["eval", "run_2"], ["eval", "run_1x"],
    ["train", "--resume", "../x"], ["train", "--resume", "../../x"], ["train", "--resume", "runs/run_1/.."],
    ["report", "../x"], ["report", "run_1/../../x"],
])
def test_run_names_that_are_not_runs_are_refused(project, monkeypatch, capsys, command):
    before = tree(project.parent)
    assert run_cli(monkeypatch, [*command, "--runs-dir", "runs"]) == 2
    line = error_line(capsys)
    assert "not a run directory" in line or "unknown run" in line
    assert tree(project.parent) == before


def test_run_names_that_are_runs_resolve_to_them(project):
    from train.runs import resolve_run

    run = Path("runs") / "run_1"
    for name in ("run_1", "1", "01", "runs/run_1", str(project / "runs" / "run_1")):
        assert resolve_run(name, Path("runs")).resolve() == run.resolve(), name


def test_eval_writes_only_its_runs_eval_and_report_only_its_out(project, monkeypatch, capsys):
    before = tree(project.parent)
    assert run_cli(monkeypatch, ["eval", "run_1", "--suite", "specialization", "--heldout-docs", "2", "--null-permutations", "10",
                                 "--device", "cpu", "--dtype", "float32"]) == 0
    assert run_cli(monkeypatch, ["report", "--out", "my-report"]) == 0
    new = set(tree(project.parent)) - set(before)
    assert new and all(p.startswith(("project/runs/run_1/eval/", "project/my-report/")) for p in new), new
    assert {k: v for k, v in tree(project.parent).items() if k in before} == before


def test_harvest_overwrite_never_deletes_a_directory_that_is_not_a_store(tiny_model, corpora, tmp_path,
                                                                        monkeypatch, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, mine, "--overwrite")) == 2
    assert "not a shard store" in error_line(capsys)
    assert (mine / "chapter1.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, a_file, "--overwrite")) == 2
    assert "is not a directory" in error_line(capsys)
    assert a_file.read_text() == "mine"


# --- models: gated, remote code ----------------------------------------------------------------------


def test_gated_model_names_the_fix_and_creates_nothing(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def not_cached(*args, **kwargs):
        raise FileNotFoundError("not in the cache")

    def gated(self, *args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # its constructor wants an HTTP response
        Exception.__init__(error, "403 gated")
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", gated)
    out = tmp_path / "shards" / "gemma"
    assert run_cli(monkeypatch, set_flag(harvest_args(tiny_model, corpora, out), "--model", "google/gemma-2-2b")) == 2
    line = error_line(capsys)
    assert "model google/gemma-2-2b is gated" in line and "hf auth login" in line
    assert not (tmp_path / "shards").exists()


def test_remote_code_runs_only_behind_the_flag(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    import harvest.harvester
    from harvest.config import HarvestConfig
    from harvest.errors import HarvestError

    asked = []

    def record(*args, trust_remote_code, **kwargs):
        asked.append(trust_remote_code)
        raise HarvestError("stop here")

    monkeypatch.setattr(harvest.harvester, "load_model", record)
    args = harvest_args(tiny_model, corpora, tmp_path / "store")
    assert run_cli(monkeypatch, args) == 2
    assert run_cli(monkeypatch, [*args, "--trust-remote-code"]) == 2
    assert asked == [False, True]
    assert HarvestConfig.model_fields["trust_remote_code"].default is False
    for config in ROOT.glob("configs/**/*.yaml"):
        assert "trust_remote_code" not in config.read_text(), config


# --- safe loading ------------------------------------------------------------------------------------


def test_no_pickle_loading_of_weights_anywhere():
    """Weights travel as safetensors; torch.load only with weights_only=True; pickle only through the
    SAEBench result reader, which accepts numpy arrays and plain data."""
    sources = [ROOT / "pipeline.py", *(p for d in ("harvest", "train", "evaluate", "bench")
                                       for p in (ROOT / d).rglob("*.py"))]
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        loads = re.findall(r"pickle\.loads?\(|Unpickler\(", text)
        assert not loads or path == ROOT / "evaluate" / "saebench" / "main.py", path
    assert "pickle.load(" not in (ROOT / "evaluate" / "saebench" / "main.py").read_text()


class _Planted:
    def __reduce__(self):
        return (print, ("this ran",))


def test_saebench_result_reader_accepts_results_and_refuses_code(tmp_path):
    from evaluate.saebench.main import read_result_pickle
    from train.errors import TrainError

    result = tmp_path / "clamp_feature_activation_multiplier25_nfeatures2_layer2_retainthres0.01.pkl"
    data = {"wmdp-bio": {"mean_correct": 0.5, "total_correct": np.int64(2), "is_correct": np.array([1.0, 0.0]),
                         "output_probs": np.zeros((2, 4), np.float16)},
            "ablate_params": {"intervention_method": "clamp_feature_activation", "multiplier": 25,
                              "features_to_ablate": np.array([3, 7])}}
    for protocol in (2, 4, 5):
        result.write_bytes(pickle.dumps(data, protocol=protocol))
        read = read_result_pickle(result)
        assert np.array_equal(read["wmdp-bio"]["output_probs"], data["wmdp-bio"]["output_probs"])
        assert read["ablate_params"]["features_to_ablate"].tolist() == [3, 7]
    result.write_bytes(pickle.dumps({"wmdp-bio": _Planted()}))
    with pytest.raises(TrainError, match="builtins.print is not part of a SAEBench result"):
        read_result_pickle(result)


# --- determinism -------------------------------------------------------------------------------------


def test_same_training_config_and_seed_give_the_same_sae_on_cpu(tiny_store, tmp_path, monkeypatch):
    """Harvest's twin is test_harvest.py::test_plan_is_deterministic_and_seeded (two harvests, equal arrays)."""
    first = short_run(tiny_store, tmp_path / "a", monkeypatch, "--ortho", "0.01")
    again = short_run(tiny_store, tmp_path / "b", monkeypatch, "--ortho", "0.01")
    other = short_run(tiny_store, tmp_path / "c", monkeypatch, "--ortho", "0.01", "--seed", "1")
    a, b, c = (load_file(r / "sae_weights.safetensors") for r in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["W_dec"], c["W_dec"])


# --- a model without its tokenizer, or with another one; text it cannot read -------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_copy(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


def harvest_refused(model: Path, corpora, tmp_path, monkeypatch, capsys, *extra: str) -> str:
    out = tmp_path / "out" / "store"
    capsys.readouterr()
    assert run_cli(monkeypatch, harvest_args(model, corpora, out, *extra)) == 2
    assert not (tmp_path / "out").exists()
    return error_line(capsys)


def test_a_model_directory_without_its_tokenizer_is_refused(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    model = model_copy(tiny_model, tmp_path / "model")
    for name in TOKENIZER_FILES:
        (model / name).unlink(missing_ok=True)
    line = harvest_refused(model, corpora, tmp_path, monkeypatch, capsys)
    assert "far fewer than the model's embedding has rows (300)" in line and "has no tokenizer files" in line


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    model = model_copy(tiny_model, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"extra{i}" for i in range(400)])
    tokenizer.save_pretrained(model)
    line = harvest_refused(model, corpora, tmp_path, monkeypatch, capsys)
    assert "has 700 tokens, more than the model's embedding has rows (300)" in line


@pytest.mark.parametrize("interleave", ["permutation", "proportional"])
def test_a_source_of_almost_only_unknown_tokens_is_refused(tiny_model, corpora, tmp_path, monkeypatch, capsys,
                                                            interleave):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = model_copy(tiny_model, tmp_path / "model")
    for name in TOKENIZER_FILES:
        (model / name).unlink(missing_ok=True)
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + [f"word{i}" for i in range(296)])}  # none of the sources' words
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(model)
    line = harvest_refused(model, corpora, tmp_path, monkeypatch, capsys, "--interleave", interleave)
    assert re.search(r"\d+% of the tokens of source .*danger.jsonl are the tokenizer's unknown token '<unk>'", line)


# --- broken weights ----------------------------------------------------------------------------------


class _Planted:
    def __reduce__(self):
        return (print, ("ran",))


def test_truncated_safetensors_and_an_unsafe_pytorch_bin_are_one_line(tiny_model, corpora, tmp_path, monkeypatch,
                                                                       capsys):
    truncated = model_copy(tiny_model, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    line = harvest_refused(truncated, corpora, tmp_path, monkeypatch, capsys)
    assert "weights are truncated or damaged" in line

    unsafe = model_copy(tiny_model, tmp_path / "unsafe")
    state = dict(load_file(unsafe / "model.safetensors"))
    (unsafe / "model.safetensors").unlink()
    torch.save({**state, "extra": _Planted()}, unsafe / "pytorch_model.bin")
    line = harvest_refused(unsafe, corpora, tmp_path, monkeypatch, capsys)
    assert "pytorch_model.bin holds more than tensors" in line
    assert "ran" not in capsys.readouterr().out


# --- paths the file system refuses -------------------------------------------------------------------


def read_only_below(monkeypatch, root: Path) -> None:
    """Creating anything below `root` fails as on a read-only file system (tests run as root, for
    whom permission bits do not stop a write)."""
    import errno
    import os

    real_mkdir, real_open = os.mkdir, os.open

    def below(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(root) and not Path(path).exists()

    def mkdir(path, *args, **kwargs):
        if below(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and below(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_a_read_only_runs_dir_or_out_is_one_line_and_exit_2(tiny_model, corpora, tiny_store, tmp_path, monkeypatch,
                                                            capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    read_only_below(monkeypatch, runs)
    capsys.readouterr()
    assert run_cli(monkeypatch, train_args(tiny_store, runs)) == 2
    line = error_line(capsys)
    assert f"cannot use {runs / 'run_1'}: Read-only file system" in line
    assert list(runs.iterdir()) == []
    read_only_below(monkeypatch, tmp_path / "ro")
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, tmp_path / "ro" / "store")) == 2
    assert "Read-only file system; choose a place on a writable file system" in error_line(capsys)


def test_names_too_long_for_the_file_system_are_one_line_and_exit_2(tiny_model, corpora, tiny_store, tmp_path,
                                                                     monkeypatch, capsys):
    long = "x" * 300
    capsys.readouterr()
    assert run_cli(monkeypatch, train_args(tiny_store, tmp_path / long)) == 2
    assert "File name too long; choose a shorter name or path" in error_line(capsys)
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, tmp_path / long / "store")) == 2
    assert "File name too long" in error_line(capsys)
    assert run_cli(monkeypatch, ["eval", f"run_{'1' * 300}", "--runs-dir", str(tmp_path)]) == 2
    error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- training options the store or the machine cannot satisfy ----------------------------------------


def test_batch_larger_than_the_store_and_a_dictionary_too_large_are_refused_before_any_run(
        tiny_store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    capsys.readouterr()
    rows = tiny_store.rows_committed
    assert run_cli(monkeypatch, set_flag(train_args(tiny_store, runs), "--batch-size", str(rows + 1))) == 2
    assert f"--batch-size {rows + 1} is larger than the store" in error_line(capsys)
    assert run_cli(monkeypatch, set_flag(train_args(tiny_store, runs), "--dict-size", str(10 ** 10))) == 2
    line = error_line(capsys)
    # at least 8 tensors of 64 x 1e10 float32 (weights, gradients, Adam's two moments), and a step's activations
    need = float(re.search(r"--dict-size 10000000000 needs about ([0-9,.]+) GB", line).group(1).replace(",", ""))
    assert need > 20_480 and "choose a smaller --dict-size" in line
    assert not runs.exists()


def test_a_training_start_that_fails_leaves_no_run_directory(own_store, tmp_path, monkeypatch, capsys):
    label_chunk = own_store.path / "label" / "c" / "0"
    data = bytearray(label_chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    label_chunk.write_bytes(bytes(data))
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert run_cli(monkeypatch, train_args(own_store, runs)) == 2
    assert "chunk 0 of label" in error_line(capsys)
    assert list(runs.iterdir()) == []


# --- sweeps, eval and report options that mean nothing -----------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("", "is empty"), ("grid: {}\n", "has no grid"), ("base:\n  ortho: 0.01\n", "has no grid"),
    ("base:\n  trainer: ratio\ngrid:\n  ortho: [true, 0.01]\n", "ortho: Value error, true is a boolean"),
    ("base:\n  ortho: true\ngrid:\n  seed: [0, 1]\n", "ortho: Value error, true is a boolean"),
])
def test_sweeps_that_sweep_nothing_or_give_booleans_for_numbers_are_refused(tiny_store, tmp_path, monkeypatch,
                                                                             capsys, text, expected):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    runs = tmp_path / "runs"
    args = train_args(tiny_store, runs)
    capsys.readouterr()
    assert run_cli(monkeypatch, [*args, "--sweep", str(sweep)]) == 2
    assert expected in error_line(capsys)
    assert not runs.exists()


def test_eval_with_no_features_to_clamp_and_report_of_runs_without_eval_are_refused(project, monkeypatch, capsys):
    before = tree(project.parent)
    assert run_cli(monkeypatch, ["eval", "run_1", "--n-features", "0", "--device", "cpu"]) == 2
    assert "n_features.0: Input should be greater than 0" in error_line(capsys)
    assert run_cli(monkeypatch, ["report", "run_1", "--out", "rep"]) == 2
    assert "has no eval results: run `pipeline eval` on it first" in error_line(capsys)
    (project / "report.md").write_text("mine")
    before = tree(project.parent)
    assert run_cli(monkeypatch, ["report", "--out", "report.md"]) == 2
    assert "--out report.md is a file" in error_line(capsys)
    assert tree(project.parent) == before
