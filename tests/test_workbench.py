"""The workbench: generate with a clamp equals the eval's splice step by step, and with none the
model's own `generate`; a text's activations equal the SAE's encoding of the model's hidden states
at the store's layer; the commands print both and refuse bad input in one line."""

import json
from pathlib import Path

import pytest
import torch

from evaluate.splice import SplicedModel
from evaluate.unlearning.features import clamp
from evaluate.workbench.activations import text_activations
from evaluate.workbench.generate import generate, prompt_ids
from evaluate.workbench.load import load_store_model, open_sae

from .conftest import run_cli

PROMPT = "Virus infection host cell viral"


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory):
    """A run trained on the tiny store, with an eval file naming a setting (as `pipeline eval` writes it)."""
    runs = tmp_path_factory.mktemp("workbench-runs")
    mp = pytest.MonkeyPatch()
    assert run_cli(mp, ["train", "--shards", str(tiny_store.path), "--runs-dir", str(runs), "--batch-size", "128",
                        "--tokens", "2560", "--dict-size", "96", "--l1", "0.02", "--warmup-steps", "5",
                        "--device", "cpu", "--no-progress"]) == 0
    mp.undo()
    return runs / "run_1"


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store_model(tiny_store, "cpu", "float32")


def firing_features(loaded, sae, n):
    acts = text_activations(loaded, sae, PROMPT)
    return torch.as_tensor(acts.values).amax(0).argsort(descending=True)[:n].tolist()


def test_no_clamp_is_the_models_own_generate(trained, loaded):
    sae = open_sae(trained).sae
    ids = prompt_ids(loaded.tokenizer, PROMPT)
    own = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert generate(loaded, sae, PROMPT, [], 0.0, max_new_tokens=12).ids == own


def test_clamped_generate_equals_the_eval_splice_step_by_step(trained, loaded):
    sae = open_sae(trained).sae
    features, multiplier = firing_features(loaded, sae, 4), 30.0
    spliced = SplicedModel(loaded.model, loaded.blocks, loaded.layer)
    ids = prompt_ids(loaded.tokenizer, PROMPT)
    reference = []
    for _ in range(12):  # greedy, no cache: the whole sequence through the eval's splice each step
        h, _ = spliced.clean(ids)
        keep = torch.ones(ids.shape, dtype=torch.bool)
        keep[:, 0] = False
        logits = spliced.with_block_output(ids, clamp(h, sae, torch.as_tensor(features), multiplier, keep))
        token = int(logits[0, -1].argmax())
        reference.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    clamped = generate(loaded, sae, PROMPT, features, multiplier, max_new_tokens=12).ids
    assert clamped == reference
    assert clamped != generate(loaded, sae, PROMPT, [], 0.0, max_new_tokens=12).ids  # the clamp did something


def test_sampling_is_seeded(trained, loaded):
    sae = open_sae(trained).sae
    runs = [generate(loaded, sae, PROMPT, [], 0.0, max_new_tokens=8, temperature=1.0, seed=s).ids for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_activations_equal_the_sae_encoding_of_the_hidden_states(trained, loaded, tiny_store):
    sae = open_sae(trained).sae
    text = "Football market virus strain. The river election"
    acts = text_activations(loaded, sae, text, [5, 0, 17])
    ids = prompt_ids(loaded.tokenizer, text)
    with torch.inference_mode():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[tiny_store.attrs["layer"] + 1]
        expected = sae.encode(hidden[0, 1:].float())[:, [5, 0, 17]]
    assert acts.values.shape == (ids.shape[1] - 1, 3)
    torch.testing.assert_close(torch.as_tensor(acts.values), expected, rtol=1e-5, atol=1e-6)
    assert "".join(acts.tokens) == loaded.tokenizer.decode(ids[0, 1:])


def write_eval(run: Path, features: list[int], multiplier: float) -> None:
    (run / "eval").mkdir(exist_ok=True)
    best = {"retain_threshold": 0.02, "n_features": len(features), "multiplier": multiplier, "features": features,
            "forget_loss_increase": 0.1, "retain_loss_increase": 0.01}
    (run / "eval" / "unlearning.json").write_text(json.dumps(
        {"best_setting": best, "selected_features": features, "settings": [best],
         "chosen_setting": {"retain_threshold": 0.02, "n_features": len(features)}}))


def test_generate_prints_both_continuations(trained, loaded, tmp_path, monkeypatch, capsys):
    sae = open_sae(trained).sae
    features = firing_features(loaded, sae, 4)
    write_eval(trained, features, 30.0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n\nMarket election\n")
    code = run_cli(monkeypatch, ["generate", str(trained), "--prompts", str(prompts), "--max-new-tokens", "12",
                                 "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"4 features clamped to -30 where they fire" in out and "the eval's best setting" in out
    assert out.count("prompt: ") == 2 and "clamped (4 features, x30)" in out
    plain = generate(loaded, sae, PROMPT, [], 0.0, max_new_tokens=12).text
    clamped = generate(loaded, sae, PROMPT, features, 30.0, max_new_tokens=12).text
    flat = " ".join(out.split())
    for text in (plain, clamped):
        assert " ".join(text.split())[:20] in flat


def test_activations_prints_tokens_and_writes_a_page(trained, tmp_path, monkeypatch, capsys):
    write_eval(trained, [3, 7], 30.0)
    page = tmp_path / "page.html"
    code = run_cli(monkeypatch, ["activations", str(trained), "--text", PROMPT, "--out", str(page),
                                 "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0 and "2 features (the eval's best setting" in out and page.exists()
    assert '"features": [3, 7]' in page.read_text()


@pytest.mark.parametrize("args, message", [
    (["generate", "RUN"], "give a prompt"),
    (["generate", "RUN", "--prompt", "x", "--features", "1,999"], "feature 999 is out of range"),
    (["generate", "RUN", "--prompt", "x", "--features", "1"], "no multiplier for"),
    (["generate", "RUN", "--prompt", "x", "--clamp", "sometimes"], "--clamp takes always"),
    (["activations", "RUN"], "give a text"),
    (["activations", "RUN", "--file", "/nonexistent/text.txt"], "cannot be read"),
])
def test_refusals_are_one_line(trained, monkeypatch, capsys, args, message):
    args = [str(trained) if a == "RUN" else a for a in args]
    assert run_cli(monkeypatch, args + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_an_unevaluated_run_needs_features(tiny_store, tmp_path, monkeypatch, capsys, trained):
    import shutil

    bare = tmp_path / "run_1"
    shutil.copytree(trained, bare, ignore=shutil.ignore_patterns("eval"))
    assert run_cli(monkeypatch, ["generate", str(bare), "--prompt", "x", "--device", "cpu"]) == 2
    assert "has not been evaluated" in capsys.readouterr().err


def test_an_activations_page_joins_the_runs_browser_and_stays(trained, monkeypatch, capsys):
    write_eval(trained, [3, 7], 30.0)
    assert run_cli(monkeypatch, ["browse", str(trained), "--features", "3,7", "--device", "cpu"]) == 0
    assert run_cli(monkeypatch, ["activations", str(trained), "--text", PROMPT, "--device", "cpu",
                                 "--dtype", "float32"]) == 0
    assert "(listed in the run's browser)" in capsys.readouterr().out
    browser = trained / "browser"
    page = browser / "texts" / "virus-infection-host-cell-viral.html"
    assert page.exists() and '"browser": true' in page.read_text()
    listed = json.loads((browser / "texts" / "texts.json").read_text())
    assert listed == [{"file": page.name, "title": PROMPT}]
    assert (browser / "data" / "texts.js").read_text() == f"BROWSER.texts({json.dumps(listed)});\n"
    assert run_cli(monkeypatch, ["browse", str(trained), "--features", "3", "--device", "cpu"]) == 0
    assert page.exists() and json.loads((browser / "texts" / "texts.json").read_text()) == listed
