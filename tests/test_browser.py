"""The feature browser: examples equal a brute-force search, contexts equal the packed text, refusals
are one line, and the site works in a real headless Chromium."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluate.browser.main import decode_contexts
from evaluate.browser.examples import HIST_BINS, HIST_LOG10_MAX, HIST_LOG10_MIN, build_contexts, collect, group_of_source
from harvest.store import ShardStore
from train.sae import SAE

from .conftest import run_cli


def train_args(store_path: Path, runs: Path) -> list[str]:
    return ["train", "--shards", str(store_path), "--runs-dir", str(runs), "--batch-size", "128", "--tokens", "2560",
            "--dict-size", "96", "--l1", "0.02", "--warmup-steps", "5", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory):
    """A run trained on the tiny store."""
    runs = tmp_path_factory.mktemp("browse-runs")
    mp = pytest.MonkeyPatch()
    assert run_cli(mp, train_args(tiny_store.path, runs)) == 0
    mp.undo()
    return runs / "run_1"


def feature_pages(site: Path) -> dict[int, dict]:
    pages = {}
    chunk = site_index(site)["chunk"]
    for path in (site / "data" / "features").glob("*.js"):
        for line in path.read_text(encoding="utf-8").splitlines():
            head = "BROWSER.feature("
            assert line.startswith(head) and line.endswith(");")
            feature, _, body = line[len(head):-2].partition(",")
            assert int(feature) // chunk == int(path.stem)  # in the chunk the page loads for it
            pages[int(feature)] = json.loads(body)
    return pages


def site_index(site: Path) -> dict:
    text = (site / "data" / "index.js").read_text(encoding="utf-8")
    return json.loads(text[len("BROWSER.index("):].rstrip()[:-2])


# --- the pass over the store -----------------------------------------------------------------------


def test_top_contexts_equal_a_brute_force_search(tiny_store, trained, monkeypatch):
    sae = SAE.load(trained).float().eval()
    k, reservoir = 7, 5
    read = []  # the pass reads the store a chunk at a time, never all of it
    real_acts = tiny_store.acts
    monkeypatch.setattr(tiny_store, "acts", lambda start=0, stop=None: read.append((start, stop)) or real_acts(start, stop))
    stats = collect(tiny_store, sae, top_k=k, reservoir=reservoir, seed=0, device="cpu")
    monkeypatch.undo()
    assert len(read) == -(-tiny_store.rows_committed // tiny_store.chunk_rows)
    assert all(stop - start <= tiny_store.chunk_rows for start, stop in read)
    with torch.inference_mode():
        f = sae.encode(tiny_store.acts().float()).numpy()
    groups = group_of_source(tiny_store)[tiny_store.read("label").astype(np.int64)]
    assert tiny_store.rows_committed > 10 * tiny_store.chunk_rows  # many chunks to merge
    fired_somewhere = 0
    for g in range(2):
        rows_g = np.flatnonzero(groups == g)
        fg = f[rows_g]
        np.testing.assert_array_equal(stats.fired[g], (fg > 0).sum(0))
        np.testing.assert_allclose(stats.summed[g], fg.astype(np.float64).sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats.max[g], fg.max(0))
        for feature in range(sae.d_sae):
            column = fg[:, feature]
            positive = np.sort(column[column > 0])[::-1]
            n = min(k, len(positive))
            fired_somewhere += len(positive) > 0
            # the top-k: the k largest positive activations, each at a row of this group that has it
            np.testing.assert_array_equal(stats.top_values[g, :n, feature], positive[:n])
            top_rows = stats.top_rows[g, :, feature]
            assert (top_rows[n:] == -1).all() and len(set(top_rows[:n])) == n
            assert set(top_rows[:n]) <= set(rows_g.tolist())
            np.testing.assert_array_equal(f[top_rows[:n], feature], stats.top_values[g, :n, feature])
            # the reservoir: distinct rows of this group where the feature fires, as many as it can hold
            sample = stats.sample_rows[g, :, feature]
            kept = sample[sample >= 0]
            assert len(kept) == min(reservoir, len(positive)) == len(set(kept))
            assert set(kept) <= set(rows_g.tolist()) and (f[kept, feature] > 0).all()
            # the histogram of positive activations in fixed log bins
            bins = (np.log10(positive.astype(np.float64)) - HIST_LOG10_MIN) * (HIST_BINS / (HIST_LOG10_MAX - HIST_LOG10_MIN))
            expected = np.bincount(np.clip(bins.astype(int), 0, HIST_BINS - 1), minlength=HIST_BINS)
            np.testing.assert_array_equal(stats.hist[g, feature], expected)
    assert fired_somewhere > sae.d_sae  # the comparison covered live features in both groups


def synthetic_store(path: Path, rows: int, d_model: int, chunk_rows: int, seed: int = 0) -> ShardStore:
    """A store of random activations through the harvest's writer: two sources, one per label."""
    rng = np.random.default_rng(seed)
    sources = [{"name": "d", "label": "dangerous"}, {"name": "s", "label": "safe"}]
    store = ShardStore.create(path, rows=rows, d_model=d_model, chunk_rows=chunk_rows, codec="zstd", clevel=1,
                              attrs={"sources": sources})
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        acts = torch.from_numpy(rng.standard_normal((n, d_model)).astype(np.float32)).bfloat16()
        store.write_rows(start, {"acts": acts.view(torch.int16).numpy().view(np.uint16),
                                 "label": rng.integers(0, 2, n).astype(np.uint8),
                                 "token": rng.integers(0, 100, n).astype(np.int32),
                                 "doc": np.arange(start, start + n, dtype=np.int32) // 8,
                                 "pos": np.arange(start, start + n, dtype=np.int32) % 8 + 1})
        store.commit(start + n)
    return store


def test_reservoir_is_a_uniform_sample(tmp_path):
    """Over many seeds, the chunks of the store are drawn from in proportion to the firing rows they hold
    (a reservoir biased towards early or late chunks, as a naive merge is, fails this)."""
    store = synthetic_store(tmp_path / "store", rows=1024, d_model=16, chunk_rows=128)
    sae = SAE(16, 8, seed=0).eval()
    with torch.inference_mode():
        f = sae.encode(store.acts().float()).numpy()
    groups = group_of_source(store)[store.read("label").astype(np.int64)]
    seeds, reservoir = 20, 32
    drawn = np.zeros((sae.d_sae, 1024 // 128))
    for seed in range(seeds):
        stats = collect(store, sae, top_k=1, reservoir=reservoir, seed=seed, device="cpu")
        for feature in range(sae.d_sae):
            rows = stats.sample_rows[0, :, feature]
            assert len(set(rows.tolist())) == reservoir and (f[rows, feature] > 0).all() and (groups[rows] == 0).all()
            drawn[feature] += np.bincount(rows // 128, minlength=drawn.shape[1])
    from scipy.stats import chisquare

    for feature in range(sae.d_sae):
        firing = np.flatnonzero((f[:, feature] > 0) & (groups == 0))
        share = np.bincount(firing // 128, minlength=drawn.shape[1]) / len(firing)
        assert chisquare(drawn[feature], share * seeds * reservoir).pvalue > 1e-4, feature


# --- contexts --------------------------------------------------------------------------------------


def _plan(tiny_model, corpora):
    from transformers import AutoTokenizer

    from harvest.config import load_config
    from harvest.packing import build_plan

    cfg = load_config(None, dict(model=str(tiny_model), layer=2, dangerous=[str(corpora["danger"])],
                                 safe=[str(corpora["safe_txt"]), str(corpora["safe_parquet"])], tokens=4000,
                                 context_length=64))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return build_plan(cfg, tokenizer), tokenizer


def test_decoded_window_equals_the_text_the_harvest_packed(tiny_store, trained, tiny_model, corpora):
    plan, tokenizer = _plan(tiny_model, corpora)
    ends = np.cumsum(plan.rows_per_window)
    assert ends[-1] == tiny_store.rows_committed
    sae = SAE.load(trained).float().eval()
    before, after = 9, 4
    rng = np.random.default_rng(0)
    rows = rng.choice(tiny_store.rows_committed, size=60, replace=False)
    # rows at chunk boundaries and window edges too
    rows = np.concatenate([rows, [0, tiny_store.chunk_rows - 1, tiny_store.chunk_rows, ends[3], ends[3] - 1,
                                  tiny_store.rows_committed - 1]])
    examples = [(int(r) % sae.d_sae, int(r)) for r in rows]
    contexts = build_contexts(tiny_store, sae, examples, before=before, after=after, device="cpu")
    pieces = decode_contexts(tokenizer, [c.tokens for c in contexts])
    with torch.inference_mode():
        f = sae.encode(tiny_store.acts().float()).numpy()
    for context, text_pieces in zip(contexts, pieces):
        w = int(np.searchsorted(ends, context.row, side="right"))
        pos = context.pos
        doc = plan.doc[w, pos]
        lo, hi = pos - (context.row - context.rows[0]), pos + (context.rows[-1] - context.row)
        # the stored tokens are the window's, at its positions, within one document
        np.testing.assert_array_equal(context.tokens, plan.input_ids[w, lo:hi + 1])
        assert (plan.doc[w, lo:hi + 1] == doc).all()
        # as far as allowed: `before`/`after` tokens or the document's edge in this window
        assert pos - lo == before or plan.doc[w, lo - 1] != doc
        assert hi - pos == after or hi + 1 == plan.doc.shape[1] or plan.doc[w, hi + 1] != doc
        # the decoded pieces join into the text of those tokens
        assert "".join(text_pieces) == tokenizer.decode(plan.input_ids[w, lo:hi + 1].tolist())
        # and each token carries the feature's activation at its row
        # (float32 tolerance: the contexts encode a gathered subset of rows, a different matmul shape)
        np.testing.assert_allclose(context.activations, f[context.rows, context.feature], rtol=1e-5, atol=1e-6)


def test_browse_writes_a_site_whose_pages_match_the_store(tiny_store, trained, tiny_model, corpora, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "site"
    assert run_cli(monkeypatch, ["browse", str(trained), "--features", "top-r,3", "--top", "12", "--examples", "4",
                                 "--samples", "3", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"open {out / 'index.html'}" in printed
    index, pages = site_index(out), feature_pages(out)
    shown = [row["id"] for row in index["features"]]
    assert not index["evaluated"] and index["rows"] == tiny_store.rows_committed
    plan, tokenizer = _plan(tiny_model, corpora)
    ends = np.cumsum(plan.rows_per_window)
    sae = SAE.load(trained).float().eval()
    with torch.inference_mode():
        f = sae.encode(tiny_store.acts().float()).numpy()
    groups = group_of_source(tiny_store)[tiny_store.read("label").astype(np.int64)]
    # top-r: the 12 live features of highest r = a_d / (a_d + a_s) over the store, and feature 3
    a_d, a_s = f[groups == 0].mean(0), f[groups == 1].mean(0)
    with np.errstate(invalid="ignore"):
        r = np.where(a_d + a_s > 0, a_d / (a_d + a_s), -1)
    top_r = set(np.argsort(-r, kind="stable")[:12].tolist())
    assert set(shown) == top_r | {3} and set(pages) == set(shown)
    for row in index["features"]:
        assert row["r"] == pytest.approx(r[row["id"]], rel=1e-3)
    names = [s["name"] for s in tiny_store.attrs["sources"]]
    checked = 0
    for feature, page in pages.items():
        assert len(page["neighbours"]) == 10 and all(n != feature for n, _ in page["neighbours"])
        assert page["lens"] is not None and len(page["lens"]["up"]) == 10
        for g, group in enumerate(("dangerous", "safe")):
            positive = np.sort(f[(groups == g) & (f[:, feature] > 0), feature])[::-1]
            acts = [c["acts"][c["at"]] for c in page["top"][group]]
            np.testing.assert_allclose(acts, positive[:4], rtol=1e-3)
            for c in page["top"][group] + page["samples"][group]:
                w = int(np.searchsorted(ends, c["row"], side="right"))
                lo = c["pos"] - c["at"]
                ids = plan.input_ids[w, lo:lo + len(c["tokens"])].tolist()
                assert "".join(c["tokens"]) == tokenizer.decode(ids)
                assert c["source"] == names[plan.source[w]] and c["doc"] == plan.doc[w, c["pos"]]
                checked += 1
    assert checked > 50


def test_logit_lens_reads_the_unembedding_alone(trained, tiny_model):
    from safetensors.torch import load_file

    from evaluate.browser.logit_lens import load_unembedding, logit_lens

    weights = load_file(next(Path(tiny_model).glob("*.safetensors")))
    unembedding = load_unembedding(Path(tiny_model))
    expected_name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    assert torch.equal(unembedding, weights[expected_name])
    w = SAE.load(trained).W_dec.detach()[:5]
    logits = w @ unembedding.float().T
    result = logit_lens(w, unembedding, 7)
    np.testing.assert_allclose(result["up"][0], logits.topk(7, dim=1).values, rtol=1e-5)
    np.testing.assert_allclose(result["down"][0], (-logits).topk(7, dim=1).values.neg(), rtol=1e-5)
    assert torch.equal(result["up"][1], logits.topk(7, dim=1).indices)


# --- refusals --------------------------------------------------------------------------------------


def _refused(monkeypatch, capsys, args: list[str]) -> str:
    assert run_cli(monkeypatch, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_refusals_are_one_clear_line(tiny_store, trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "site"
    err = _refused(monkeypatch, capsys, ["browse", str(trained), "--features", "5,96", "--out", str(out)])
    assert "feature 96 is out of range" in err and "96 features (0..95)" in err
    err = _refused(monkeypatch, capsys, ["browse", str(trained), "--features", "selected", "--out", str(out)])
    assert "has not been evaluated (no eval/unlearning.json)" in err and "pipeline eval run_1" in err
    err = _refused(monkeypatch, capsys, ["browse", str(trained), "--features", "everything", "--out", str(out)])
    assert "--features takes" in err
    err = _refused(monkeypatch, capsys, ["browse", str(trained), "--examples", "0", "--out", str(out)])
    assert "examples" in err
    assert not out.exists()


def test_missing_or_incomplete_store_is_one_clear_line(tiny_store, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "store"
    shutil.copytree(tiny_store.path, copy)
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(copy, runs)) == 0
    out = tmp_path / "site"
    store = ShardStore.open(copy, mode="a")
    committed = store.rows_committed
    store.commit(store.chunk_rows)  # as a harvest killed after its first chunk leaves it
    err = _refused(monkeypatch, capsys, ["browse", "run_1", "--runs-dir", str(runs), "--out", str(out)])
    assert f"the store at {copy} is incomplete ({store.chunk_rows} of {committed:,} rows committed)" in err
    shutil.rmtree(copy)
    err = _refused(monkeypatch, capsys, ["browse", "run_1", "--runs-dir", str(runs), "--out", str(out)])
    assert f"was trained on {copy}, which cannot be opened now: no shard store at {copy}" in err
    assert not out.exists()


def test_an_evaluated_run_shows_its_selected_features(tiny_store, trained, tmp_path, monkeypatch, capsys):
    """The selected features come from today's eval/unlearning.json keys; a file without them is tolerated."""
    run = tmp_path / "run_1"
    shutil.copytree(trained, run)
    (run / "eval").mkdir(exist_ok=True)
    settings = [{"retain_threshold": 0.01, "n_features": 2, "multiplier": 25, "features": [4, 7],
                 "forget_loss_increase": 0.3, "retain_loss_increase": 0.01},
                {"retain_threshold": 0.01, "n_features": 2, "multiplier": 50, "features": [4, 7],
                 "forget_loss_increase": 0.5, "retain_loss_increase": 0.02},
                {"retain_threshold": 0.001, "n_features": 1, "multiplier": 25, "features": [9]}]
    (run / "eval" / "unlearning.json").write_text(json.dumps({"score": 0.5, "control_score": 0.1, "settings": settings,
                                                              "best_setting": settings[1]}))
    out = tmp_path / "site"
    assert run_cli(monkeypatch, ["browse", str(run), "--features", "selected", "--out", str(out)]) == 0
    index, pages = site_index(out), feature_pages(out)
    assert {row["id"] for row in index["features"]} == {4, 7, 9}
    assert all(row["selected"] for row in index["features"])
    assert pages[4]["settings"] == [0, 1] and pages[9]["settings"] == [2]
    assert [s["best"] for s in index["unlearning"]["settings"]] == [False, True, False]
    # default (auto) on an evaluated run: the selected features and the top-r ones
    assert run_cli(monkeypatch, ["browse", str(run), "--top", "5", "--out", str(out)]) == 0
    assert {4, 7, 9} < {row["id"] for row in site_index(out)["features"]}
    (run / "eval" / "unlearning.json").write_text(json.dumps({"score": 0.0}))  # an older or partial file
    assert run_cli(monkeypatch, ["browse", str(run), "--features", "top-r", "--top", "3", "--out", str(out)]) == 0
    assert len(site_index(out)["features"]) == 3
    nothing = [{**s, "features": []} for s in settings]
    (run / "eval" / "unlearning.json").write_text(json.dumps({"score": 0.0, "settings": nothing}))
    err = _refused(monkeypatch, capsys, ["browse", str(run), "--features", "selected", "--out", str(out)])
    assert "no unlearning setting of" in err and "selected any feature" in err
    assert len(site_index(out)["features"]) == 3  # the browser written before is kept


def test_report_links_each_runs_browser(tiny_store, trained, tmp_path, monkeypatch):
    from evaluate.report.main import report

    runs = tmp_path / "runs"
    for name in ("run_1", "run_2"):
        shutil.copytree(trained, runs / name)
        (runs / name / "eval").mkdir(exist_ok=True)
        (runs / name / "eval" / "core.json").write_text(json.dumps({"l0": 3.0}))
    # run_1 another seed with other weights: two copies of one run would be counted once
    config = json.loads((runs / "run_1" / "train_config.json").read_text())
    (runs / "run_1" / "train_config.json").write_text(json.dumps({**config, "seed": config["seed"] + 1}))
    (runs / "run_1" / "sae_weights.safetensors").write_bytes(b"another seed's weights")
    assert run_cli(monkeypatch, ["browse", "run_2", "--runs-dir", str(runs), "--features", "1,2"]) == 0
    text = report([], runs, tmp_path / "report").read_text()
    assert "[run_2](../runs/run_2/browser/index.html)" in text
    assert "run_1/browser" not in text


# --- in a real browser -----------------------------------------------------------------------------


def _chromium() -> tuple[str, str] | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def headless_chromium(tmp_path: Path, window: str = "1400,900"):
    """A Selenium driver of headless Chromium (the test fails in CI without it, and skips elsewhere)."""
    found = _chromium()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are required in CI (.ci/run installs them)")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={window}", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_path, log_output=subprocess.DEVNULL)
    return webdriver.Chrome(options=options, service=service)


def test_the_site_works_in_headless_chromium(tiny_store, trained, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "site"
    assert run_cli(monkeypatch, ["browse", str(trained), "--features", "top-r", "--top", "8", "--out", str(out)]) == 0
    index = site_index(out)
    browser = headless_chromium(tmp_path, "1500,1000")
    try:
        browser.get((out / "index.html").as_uri())
        wait = WebDriverWait(browser, 20)
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#feature-table tbody tr")))
        listed = [int(tr.get_attribute("data-feature"))
                  for tr in browser.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr")]
        assert sorted(listed) == sorted(row["id"] for row in index["features"])
        assert browser.find_element(By.ID, "r-hist-svg").find_elements(By.TAG_NAME, "rect")
        # click the second row: its panel, with both columns of contexts
        second = browser.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr")[1]
        feature = int(second.get_attribute("data-feature"))
        second.click()
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "feature-title"), f"Feature {feature}"))
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".context .tokens .tok")))
        page = feature_pages(out)[feature]
        contexts = browser.find_elements(By.CSS_SELECTOR, ".contexts .context")
        expected = sum(len(page[k][g]) for k in ("top", "samples") for g in ("dangerous", "safe"))
        assert len(contexts) == expected > 0
        first = (page["top"]["dangerous"] or page["top"]["safe"])[0]
        shown_tokens = [t.get_attribute("textContent") for t in contexts[0].find_elements(By.CSS_SELECTOR, ".tok")]
        assert shown_tokens == [t.replace("\n", "↵").replace("\t", "→") for t in first["tokens"]]
        assert browser.find_elements(By.CSS_SELECTOR, ".tok.max")
        # sorting by a column and filtering keep working
        browser.find_element(By.CSS_SELECTOR, 'th[data-key="rate_safe"]').click()
        browser.find_element(By.ID, "filter-text").send_keys(f"{feature}")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr")) >= 1)
        # a neighbour link with a page opens it
        browser.save_screenshot(str(tmp_path / "browser.png"))
        assert (tmp_path / "browser.png").stat().st_size > 10_000
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()
