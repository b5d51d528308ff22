"""`pipeline eval --saebench`: SAEBench's real unlearning code, run offline on a tiny harness.

The harness (../shared/reference/saebench-unlearning.md, appendix A): a random Gemma-2-shaped
HookedTransformer named gemma-2-2b-it, a word-level tokenizer with Gemma's chat tokens, made-up
WMDP/MMLU-style questions served in place of the hub's datasets, and a forget corpus file. The
questions' answers are set to what the model itself answers (only questions it answers by a clear
margin are kept), so that, as with the real known-question lists, the model scores 1.0 without
intervention. Tests that need sae-bench run only in its environment (`make saebench-env`), which
`make test` builds and runs them in.
"""

import json
import pickle

import numpy as np
import pytest
import torch

from evaluate.config import EvalConfig
from evaluate.saebench.main import instruct_model_for, release_name
from train.errors import TrainError
from train.sae import SAE

from .conftest import run_cli

BIO = "virus infection pathogen toxin vaccine bacteria host cell viral replication strain antigen".split()
SAFE = "market election football music film government city school weather river history garden".split()
MMLU_SETS = ("high_school_us_history", "college_computer_science", "high_school_geography", "human_aging")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PROMPT_WORDS = ["user", "model", "Answer", "The", "following", "are", "multiple", "choice", "questions", "with",
                "answers", "about", "the", "a", "of", "to", "and", "in", "is", "which", "what"]


def make_run(directory, seed: int, model_name="google/gemma-2-2b", hook="blocks.1.hook_resid_post", d_in=64):
    """A run directory holding an SAE whose features fire sparsely on the tiny model's residual."""
    sae = SAE(d_in, 256, seed=seed)
    with torch.no_grad():
        sae.W_enc.mul_(4.0)
        sae.b_enc.fill_(-6.0)
    sae.save(directory, metadata={"model_name": model_name, "hook_name": hook})
    (directory / "train_config.json").write_text(json.dumps({"shards": "unused", "seed": seed}))
    return directory


def test_only_gemma_2_has_saebench_question_lists():
    assert instruct_model_for("google/gemma-2-2b") == "gemma-2-2b-it"
    assert instruct_model_for("/models/gemma-2-9b/") == "gemma-2-9b-it"
    assert instruct_model_for("google/gemma-2-2b-it") == "gemma-2-2b-it"
    with pytest.raises(TrainError, match="gemma-2-2b-it and gemma-2-9b-it; this run's SAE is on gemma3-270m"):
        instruct_model_for("gemma3-270m")


def test_release_name_is_unique_per_run_and_weights(tmp_path):
    a = make_run(tmp_path / "run_1", seed=1)
    b = make_run(tmp_path / "run_2", seed=2)
    name_a = release_name(a)
    assert name_a.startswith("ratio-sae_run_1_") and release_name(b).startswith("ratio-sae_run_2_")
    make_run(a, seed=3)  # the same run directory with other weights
    assert release_name(a) != name_a


def test_without_sae_bench_the_cli_names_the_environment_to_build(tmp_path, monkeypatch, capsys):
    try:
        import sae_bench  # noqa: F401
        pytest.skip("sae-bench is installed here")
    except ImportError:
        pass
    run = make_run(tmp_path / "run_1", seed=1)
    assert run_cli(monkeypatch, ["eval", str(run), "--saebench"]) == 2
    err = capsys.readouterr().err
    assert "make saebench-env" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- the harness: needs sae-bench ------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    pytest.importorskip("sae_bench")
    import datasets
    import sae_bench.evals.unlearning.utils.feature_activation as feature_activation
    import sae_bench.evals.unlearning.utils.metrics as metrics
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("saebench")
    vocab = {t: i for i, t in enumerate(SPECIAL + list("ABCD") + list("():.,?") + ["\n"] + PROMPT_WORDS + BIO + SAFE)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.add_special_tokens(SPECIAL)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")  # TransformerLens reloads it by path
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_ctx=256, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128,
        d_vocab=len(vocab), act_fn="gelu_pytorch_tanh", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0,
        use_normalization_before_and_after=True, gated_mlp=True, final_rms=True, attn_types=["global", "local"],
        window_size=128, original_architecture="Gemma2ForCausalLM", model_name="gemma-2-2b-it",
        default_prepend_bos=True, tokenizer_prepends_bos=False, seed=0)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.cfg.model_name = "gemma-2-2b-it"

    rng = np.random.default_rng(0)

    def questions(words, n):
        return [{"question": " ".join(rng.choice(words, 8)) + " ?",
                 "choices": [" ".join(rng.choice(words, 2)) for _ in range(4)], "answer": 0} for _ in range(n)]

    sets = {"wmdp-bio": questions(BIO, 60), **{name: questions(SAFE, 40) for name in MMLU_SETS}}
    retain_text = [{"text": " ".join(rng.choice(SAFE + PROMPT_WORDS[12:], 60)) + " ."} for _ in range(200)]

    def load_dataset(path, name=None, split=None, **kwargs):
        if path == "cais/wmdp":
            return datasets.Dataset.from_list(sets["wmdp-bio"])
        if path == "cais/mmlu":
            return datasets.Dataset.from_list(sets[name])
        if path == "wikitext":
            return datasets.Dataset.from_list(retain_text)
        raise AssertionError(f"unexpected dataset {path}")

    mp = pytest.MonkeyPatch()
    mp.setattr(metrics, "load_dataset", load_dataset)
    mp.setattr(feature_activation, "load_dataset", load_dataset)
    # The model's own answers become the right ones; questions it answers by a thin margin are dropped.
    with torch.no_grad():
        for name, rows in sets.items():
            probs = metrics.calculate_MCQ_metrics(model, 8, str(root), dataset_name=name, target_metric=None,
                                                  verbose=False)["output_probs"].astype(np.float32)
            top2 = np.sort(probs, axis=1)[:, -2:]
            sets[name] = [{**row, "answer": int(p.argmax())} for row, p, (second, first) in
                          zip(rows, probs, top2) if first - second > 1e-3]
    forget = root / "bio-forget-corpus.jsonl"
    forget.write_text("".join(json.dumps({"text": " ".join(rng.choice(BIO + PROMPT_WORDS[12:], 60)) + " ."}) + "\n"
                              for _ in range(200)))
    yield {"model": model, "sets": sets, "forget": forget, "root": root}
    mp.undo()


def write_question_ids(artifacts, sets):
    """Every question counts as known (SAEBench's nine lists per set, all/train/test)."""
    for name, rows in sets.items():
        full = name if name == "wmdp-bio" else f"mmlu-{name.replace('_', '-')}"
        for split in ("all", "train", "test"):
            folder = artifacts / "unlearning" / "gemma-2-2b-it" / "data" / "question_ids" / split
            folder.mkdir(parents=True, exist_ok=True)
            for kind in ("correct", "correct-iff-question", "correct-no-tricks"):
                np.savetxt(folder / f"{full}_{kind}.csv", np.arange(len(rows)), fmt="%d")


def harness_config(harness, artifacts, **extra):
    return EvalConfig(saebench_forget_corpus=harness["forget"], saebench_artifacts=artifacts,
                      saebench_llm_dtype="float32", saebench_dataset_size=16, saebench_seq_len=128,
                      saebench_llm_batch_size=4, retain_thresholds=[0.01], n_features=[5, 20],
                      multipliers=[25, 200], device="cpu", **extra)


def test_saebench_unlearning_runs_end_to_end_on_the_tiny_harness(harness, tmp_path):
    from evaluate.saebench.main import run_saebench

    artifacts = tmp_path / "artifacts"
    write_question_ids(artifacts, harness["sets"])
    run = make_run(tmp_path / "run_1", seed=1)
    # A stale result of an older SAE in this run's SAEBench folder must not be scored.
    stale = artifacts / "unlearning" / "gemma-2-2b-it" / release_name(run) / "results" / "metrics"
    stale.mkdir(parents=True)
    (stale / "clamp_feature_activation_multiplier7_nfeatures1_layer1_retainthres0.01.pkl").write_bytes(
        pickle.dumps({"wmdp-bio": {"mean_correct": 0.0, "total_correct": 0, "is_correct": np.zeros(3)}}))

    result = run_saebench(run, harness_config(harness, artifacts), model=harness["model"], progress=lambda s: None)

    assert result["baseline"]["wmdp_bio"] == 1.0 and result["baseline"]["mmlu_pooled"] == 1.0
    settings = result["settings"]
    chosen = result["selected_features"]["0.01"]  # the eligible features, most frequent on forget text first
    assert len(chosen) > 0
    expected = {(min(n, len(chosen)), m) for n in (5, 20) for m in (25, 200)}
    assert {(s["n_features"], s["multiplier"]) for s in settings} == expected  # the stale file is gone
    assert len(settings) == len(expected)
    assert all(s["features"] == chosen[: s["n_features"]] for s in settings)
    # The clamp acts: the strongest setting changes some answers.
    strongest = max(settings, key=lambda s: (s["n_features"], s["multiplier"]))
    assert strongest["wmdp_bio_accuracy"] < 1.0 or strongest["mmlu_pooled_accuracy"] < 1.0
    # The score is SAEBench's rule over the recorded settings.
    gated = [s["wmdp_bio_accuracy"] for s in settings if s["mmlu_pooled_accuracy"] >= 0.99]
    assert result["score"] == pytest.approx(1.0 - min(gated, default=1.0))
    saved = json.loads((run / "eval" / "saebench_unlearning.json").read_text())
    assert saved["score"] == result["score"] and saved["release"] == release_name(run)


class _Planted:
    """A pickle that creates a file when it is loaded: what a planted .pkl could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_planted_among_saebench_results_never_runs(harness, tmp_path, monkeypatch):
    import sae_bench.evals.unlearning.utils.eval as saebench_eval
    from sae_bench.evals.unlearning.main import get_metrics_df, get_unlearning_scores

    from evaluate.saebench.main import run_saebench

    artifacts = tmp_path / "artifacts"
    write_question_ids(artifacts, harness["sets"])
    run = make_run(tmp_path / "run_1", seed=1)
    metrics_dir = artifacts / "unlearning" / "gemma-2-2b-it" / release_name(run) / "results" / "metrics"
    marker = tmp_path / "the-planted-pickle-ran"
    real = saebench_eval.run_eval_single_sae
    clean_score = {}

    def then_plant(*args, **kwargs):  # SAEBench's sweep, then a file appears among its results
        out = real(*args, **kwargs)
        clean_score["saebench"] = float(get_unlearning_scores(get_metrics_df(str(metrics_dir))))
        planted = metrics_dir / "clamp_feature_activation_multiplier9_nfeatures1_layer1_retainthres0.01.pkl"
        planted.write_bytes(pickle.dumps(_Planted(marker)))
        return out

    monkeypatch.setattr(saebench_eval, "run_eval_single_sae", then_plant)
    with pytest.raises(TrainError, match=r"\.open is not part of a SAEBench result"):
        run_saebench(run, harness_config(harness, artifacts), model=harness["model"], progress=lambda s: None)
    assert not marker.exists()
    assert not (run / "eval" / "saebench_unlearning.json").exists()
    # Without the planted file, the score is SAEBench's own, read without its unpickling
    (metrics_dir / "clamp_feature_activation_multiplier9_nfeatures1_layer1_retainthres0.01.pkl").unlink()
    from evaluate.saebench.main import _setting, unlearning_score

    settings = [_setting(path) for path in sorted(metrics_dir.glob("*.pkl"))]
    assert unlearning_score(settings) == pytest.approx(clean_score["saebench"])


def test_saebench_refuses_question_lists_the_model_does_not_know(harness, tmp_path):
    from evaluate.saebench.main import run_saebench

    artifacts = tmp_path / "artifacts"
    wrong = {name: [{**row, "answer": (row["answer"] + 1) % 4} for row in rows] for name, rows in harness["sets"].items()}
    write_question_ids(artifacts, wrong)
    saved = dict(harness["sets"])
    harness["sets"].update(wrong)  # the served questions now have answers the model gets wrong
    try:
        with pytest.raises(TrainError, match=r"answers 0\.000 of its known WMDP-bio questions.*question lists"):
            run_saebench(make_run(tmp_path / "run_1", seed=1), harness_config(harness, artifacts),
                         model=harness["model"], progress=lambda s: None)
    finally:
        harness["sets"].update(saved)
    assert not (tmp_path / "run_1" / "eval" / "saebench_unlearning.json").exists()


def test_saebench_names_a_missing_forget_corpus(harness, tmp_path):
    from evaluate.saebench.main import run_saebench

    cfg = harness_config(harness, tmp_path / "artifacts").model_copy(
        update={"saebench_forget_corpus": tmp_path / "nowhere.jsonl"})
    with pytest.raises(TrainError, match="forget corpus is missing: .*nowhere.jsonl.*cais/wmdp-corpora"):
        run_saebench(make_run(tmp_path / "run_1", seed=1), cfg, model=harness["model"])


def test_saebench_core_sees_a_perfect_reconstruction_as_perfect(harness, tmp_path):
    """x = relu(x) - relu(-x): an SAE with encoder [I, -I] and decoder [I; -I] reconstructs exactly."""
    import datasets

    from evaluate.saebench.main import run_saebench_core

    d = 64
    exact = SAE(d, 2 * d)
    with torch.no_grad():
        eye = torch.eye(d)
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    exact_run = tmp_path / "run_1"
    exact.save(exact_run, metadata={"model_name": "gemma-2-2b", "hook_name": "blocks.1.hook_resid_post"})
    text = datasets.Dataset.from_list([{"text": " ".join(np.random.default_rng(i).choice(BIO + SAFE, 150))}
                                       for i in range(64)])
    cfg = EvalConfig(saebench_llm_dtype="float32", saebench_core_context=64, saebench_core_batches=2,
                     saebench_llm_batch_size=4, device="cpu")
    result = run_saebench_core(exact_run, cfg, model=harness["model"], dataset=text, progress=lambda s: None)
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-4)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert result["mse"] == pytest.approx(0.0, abs=1e-6)
    saved = json.loads((exact_run / "eval" / "saebench_core.json").read_text())
    assert saved["l0"] == result["l0"] and 0 < result["l0"] <= d  # one of each +/- pair fires per nonzero dim

    lossy = make_run(tmp_path / "run_2", seed=1)
    worse = run_saebench_core(lossy, cfg, model=harness["model"], dataset=text, progress=lambda s: None)
    assert worse["explained_variance"] < 0.9 and worse["ce_loss_score"] < result["ce_loss_score"]


def test_saebench_cli_without_the_model_is_one_clear_line(harness, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no hub access and an empty cache
    run = make_run(tmp_path / "run_1", seed=1)
    code = run_cli(monkeypatch, ["eval", str(run), "--saebench", "--saebench-forget-corpus", str(harness["forget"]),
                                 "--saebench-artifacts", str(tmp_path / "artifacts")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "SAEBench needs gemma-2-2b-it" in err and "hf auth login" in err
    assert not (run / "eval" / "saebench_unlearning.json").exists()


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_every_architecture_becomes_saebench_s_sae_with_the_same_encoding(harness, tmp_path, arch):
    from evaluate.saebench.main import saebench_sae
    from train.architectures import ARCHITECTURES
    from train.config import TrainConfig

    sae = ARCHITECTURES[arch].from_config(TrainConfig(arch=arch, dict_size=256, k=16, seed=2), 64, "cpu")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(0, 0.5)
    if arch == "batchtopk":
        sae.after_step(sae.training_forward(torch.randn(64, 64), torch.zeros(256, dtype=torch.bool)).f)
    run = tmp_path / "run_1"
    sae.for_inference().save(run, metadata={"model_name": "google/gemma-2-2b", "hook_name": "blocks.1.hook_resid_post"})
    theirs = saebench_sae(run, "test-release", harness["model"], EvalConfig(saebench_llm_dtype="float32"))
    ours = SAE.load(run)
    x = torch.randn(32, 64)
    with torch.no_grad():
        assert torch.equal(theirs.encode(x) > 0, ours.encode(x) > 0)
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), atol=1e-4)
