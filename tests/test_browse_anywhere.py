"""The browser from any working directory and for any SAE: a run whose store path is relative opens
from elsewhere, a moved store with --shards, a SAELens directory with --shards; every live feature
gets a page (in chunks); the co-firing panel equals a hand computation of the correlations; the
search and the filter's explanation of an empty result; nothing cut off at three window widths."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from train.sae import SAE

from .conftest import run_cli
from .test_browser import feature_pages, headless_chromium, site_index


@pytest.fixture(scope="module")
def project(tiny_store, tmp_path_factory):
    """A project folder whose run records its store as the relative path `shards/tiny` (as `make demo` does)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_store.path, root / "shards" / "tiny")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    assert run_cli(mp, ["train", "--shards", "shards/tiny", "--batch-size", "128", "--tokens", "2560",
                        "--dict-size", "96", "--l1", "0.02", "--warmup-steps", "5", "--device", "cpu",
                        "--no-progress"]) == 0
    mp.undo()
    return root


def store_activations(run: Path, store) -> np.ndarray:
    sae = SAE.load(run).float().eval()
    with torch.inference_mode():
        return sae.encode(store.acts().float()).numpy()


def test_browse_from_another_directory_pages_every_live_feature(project, tiny_store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "site"
    assert run_cli(monkeypatch, ["browse", "run_1", "--runs-dir", str(project / "runs"), "--out", str(out),
                                 "--examples", "3", "--samples", "1", "--device", "cpu"]) == 0
    index, pages = site_index(out), feature_pages(out)
    f = store_activations(project / "runs" / "run_1", tiny_store)
    live = set(np.flatnonzero((f > 0).any(0)).tolist())
    assert {row["id"] for row in index["features"]} == set(pages) == live
    assert index["store"] == str(project / "shards" / "tiny")
    # the search reads the tokens each feature fires most on: those of its top contexts' example tokens
    for row in index["features"]:
        page = pages[row["id"]]
        assert row["fired_on"] == list(dict.fromkeys(c["tokens"][c["at"]] for g in ("dangerous", "safe")
                                                     for c in page["top"][g]))


def test_a_moved_store_needs_shards(project, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "elsewhere"
    shutil.copytree(project / "shards" / "tiny", moved)
    runs = tmp_path / "runs"
    shutil.copytree(project / "runs", runs)  # the run alone: its relative store path resolves nowhere
    monkeypatch.chdir(tmp_path)
    assert run_cli(monkeypatch, ["browse", "run_1", "--runs-dir", str(runs), "--features", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "was trained on shards/tiny, which cannot be opened now" in err and "give its path with --shards" in err
    assert run_cli(monkeypatch, ["browse", "run_1", "--runs-dir", str(runs), "--features", "1,2", "--shards",
                                 str(moved)]) == 0
    assert site_index(runs / "run_1" / "browser")["store"] == str(moved)


def test_browse_a_saelens_directory_with_shards(project, tiny_store, tmp_path, monkeypatch, capsys):
    sae_dir = tmp_path / "some-saelens-sae"
    sae_dir.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(project / "runs" / "run_1" / name, sae_dir / name)
    assert run_cli(monkeypatch, ["browse", str(sae_dir), "--features", "top-r", "--top", "4"]) == 2
    assert "give the store of the model and hook its SAE reads with --shards" in capsys.readouterr().err
    assert run_cli(monkeypatch, ["browse", str(sae_dir), "--shards", str(tiny_store.path), "--features", "top-r",
                                 "--top", "4"]) == 0
    index = site_index(sae_dir / "browser")
    assert index["run"] == "some-saelens-sae" and len(index["features"]) == 4 and index["train"]["trainer"] is None


def test_cofiring_is_the_pearson_correlation_over_the_store(project, tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "site"
    assert run_cli(monkeypatch, ["browse", str(project / "runs" / "run_1"), "--features", "top-r", "--top", "6",
                                 "--cofiring", "5", "--examples", "2", "--samples", "0", "--out", str(out)]) == 0
    pages = feature_pages(out)
    f = store_activations(project / "runs" / "run_1", tiny_store).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(f.T)  # by hand: every pair, dense
    together = (f > 0).T.astype(int) @ (f > 0).astype(int) > 0
    for feature, page in pages.items():
        c = np.where(together[feature] & (np.arange(f.shape[1]) != feature), np.nan_to_num(corr[feature], nan=-2), -2)
        expected = [int(j) for j in np.argsort(-c, kind="stable")[:5] if c[j] > 0]
        assert [j for j, _ in page["cofiring"]] == expected
        np.testing.assert_allclose([v for _, v in page["cofiring"]], c[expected], atol=2e-4)
    assert any(page["cofiring"] for page in pages.values())


WIDTHS = (1024, 1400, 1920)


@pytest.fixture
def chrome(tmp_path):
    browser = headless_chromium(tmp_path)
    yield browser
    browser.quit()


# Per card: how far its widest descendant reaches past the card's right edge (px), and the
# histogram's bars: how many are drawn and where the last one ends, against the svg's box.
MEASURE = """
var out = {overflow: [], bars: 0, barRight: 0, svgRight: 0, cardRight: 0, labelsRight: 0};
document.querySelectorAll('#feature-pane .card').forEach(function (card) {
  var right = card.getBoundingClientRect().right, worst = 0;
  card.querySelectorAll('*').forEach(function (n) { worst = Math.max(worst, n.getBoundingClientRect().right - right); });
  out.overflow.push([card.querySelector('.card-title').textContent, worst, card.scrollWidth - card.clientWidth]);
});
var hist = document.querySelector('#feature-pane svg.hist');
var rects = hist.querySelectorAll('rect'), texts = hist.querySelectorAll('text');
out.bars = rects.length;
rects.forEach(function (r) { out.barRight = Math.max(out.barRight, r.getBoundingClientRect().right); });
texts.forEach(function (t) { out.labelsRight = Math.max(out.labelsRight, t.getBoundingClientRect().right); });
out.svgRight = hist.getBoundingClientRect().right;
out.cardRight = hist.closest('.card').getBoundingClientRect().right;
out.ticks = Array.prototype.map.call(texts, function (t) { return t.textContent; });
return out;
"""


def test_nothing_is_cut_off_and_search_and_filter_explain(project, tmp_path, monkeypatch, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "site"
    assert run_cli(monkeypatch, ["browse", str(project / "runs" / "run_1"), "--examples", "3", "--samples", "1",
                                 "--out", str(out)]) == 0
    index, pages = site_index(out), feature_pages(out)
    edges = index["hist_edges"]
    # the feature whose histogram spans the most decades: the widest drawing
    row = max(index["features"], key=lambda r: len(r["hist"]["dangerous"]))
    wait = WebDriverWait(chrome, 20)
    for width in WIDTHS:
        chrome.set_window_size(width, 900)
        chrome.get((out / "index.html").as_uri() + f"#{row['id']}")
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "feature-title"), f"Feature {row['id']}"))
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#feature-pane svg.hist")))
        m = chrome.execute_script(MEASURE)
        for title, reach, scroll in m["overflow"]:
            assert reach <= 1 and scroll <= 0, f"{width} px: {title} reaches {reach:.0f} px past its card"
        hist = row["hist"]
        drawn = sum(1 for d in hist["dangerous"] if d) + sum(1 for s in hist["safe"] if s)
        assert m["bars"] == drawn  # every non-empty bin is drawn, and within the svg and its card
        assert m["barRight"] <= m["svgRight"] + 0.5 and m["svgRight"] <= m["cardRight"] and m["labelsRight"] <= m["cardRight"]
        first, last = edges[hist["first"]], edges[hist["first"] + len(hist["dangerous"])]
        decades = [d for d in range(int(np.ceil(first)), int(np.floor(last)) + 1)]
        assert m["ticks"] == [("1" if d == 0 else f"1e{d}") for d in decades]
        assert chrome.find_elements(By.CSS_SELECTOR, "#cofiring tbody tr") or not pages[row["id"]]["cofiring"]
    # the search: features whose top contexts fire most on a token containing the text (by hand)
    word = next(t.strip() for r in index["features"] for t in r["fired_on"] if len(t.strip()) > 3)
    expected = {r["id"] for r in index["features"] if any(word.lower() in t.lower() for t in r["fired_on"])}
    chrome.find_element(By.ID, "search-text").send_keys(word)
    wait.until(lambda b: {int(tr.get_attribute("data-feature")) for tr in
                          b.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr[data-feature]")} == expected)
    # a filter nothing passes says why
    chrome.find_element(By.ID, "search-text").clear()
    chrome.find_element(By.ID, "filter-text").send_keys("r>0.2 max>1e9")
    wait.until(expected_conditions.presence_of_element_located((By.ID, "why-empty")))
    why = chrome.find_element(By.ID, "why-empty").text
    passing = sum(1 for r in index["features"] if r["r"] is not None and r["r"] > 0.2)
    highest = max(r["max"] for r in index["features"])
    assert f"r>0.2: {passing} pass alone" in why and "max>1e9: 0 pass alone (the highest max among them is" in why
    assert f"{highest:.3g}".rstrip("0").rstrip(".")[:3] in why.replace(",", "")
    errors = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_eval_takes_shards_for_a_run_whose_store_moved(project, tmp_path, monkeypatch):
    from evaluate.runner import run_target

    moved = tmp_path / "elsewhere"
    shutil.copytree(project / "shards" / "tiny", moved)
    runs = tmp_path / "runs"
    shutil.copytree(project / "runs", runs)
    monkeypatch.chdir(tmp_path)
    assert run_target("run_1", runs, moved).store.path == moved
    # where the recorded store is found, --shards (meant for SAELens directories beside it) is not used
    assert run_target("run_1", project / "runs", moved).store.path.resolve() == (project / "shards" / "tiny").resolve()
