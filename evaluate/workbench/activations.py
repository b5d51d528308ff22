"""`pipeline activations`: any text through the store's model and an SAE, token by token.

The text is laid out as the eval lays out a held-out document (BOS, then its tokens); the model runs
up to block L (the store's layer: the output the SAE was trained on) and the SAE encodes that output.
The terminal gets one line per token with the chosen features that fire there; an HTML page in the
feature browser's style shades the text by any chosen feature, and goes into the run's browser
(browser/texts/, listed on its index) where the run has one.
"""

import html
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from harvest.model import BlockOutput, LoadedModel
from train.sae import SAE

from .generate import prompt_ids


@dataclass
class TextActivations:
    tokens: list[str]
    """The text's tokens as strings (BOS left out), whose concatenation is the text's decoding."""
    ids: list[int]
    features: list[int]
    values: np.ndarray
    """(tokens, features): each chosen feature's activation at each token."""


@torch.inference_mode()
def hidden_states(loaded: LoadedModel, text: str) -> torch.Tensor:
    """Block L's output on BOS + the text's tokens, (seq, d_model); the blocks after L do not run."""
    ids = prompt_ids(loaded.tokenizer, text).to(loaded.device)
    run = BlockOutput(loaded.model, loaded.blocks[loaded.layer], loaded.device)
    try:
        return run(ids)[0]
    finally:
        run.close()


@torch.inference_mode()
def text_activations(loaded: LoadedModel, sae: SAE, text: str, features: list[int] | None = None) -> TextActivations:
    """The SAE's encoding of the text's hidden states at the store's layer, for `features` (None: all)."""
    from ..browser.main import decode_contexts

    ids = prompt_ids(loaded.tokenizer, text)[0, 1:]
    f = sae.encode(hidden_states(loaded, text).float().to(sae.W_dec.device))[1:]
    chosen = list(range(sae.d_sae)) if features is None else list(features)
    values = f[:, torch.as_tensor(chosen, dtype=torch.long, device=f.device)].cpu().numpy()
    tokens = decode_contexts(loaded.tokenizer, [ids.numpy()])[0] if len(ids) else []
    return TextActivations(tokens, ids.tolist(), chosen, values)


def strongest(loaded: LoadedModel, sae: SAE, text: str, n: int) -> list[int]:
    """The n features with the largest activation anywhere in the text (firing ones only)."""
    every = text_activations(loaded, sae, text)
    peak = every.values.max(0) if len(every.tokens) else np.zeros(sae.d_sae)
    order = np.argsort(-peak, kind="stable")
    return [int(i) for i in order[:n] if peak[i] > 0]


def terminal_lines(acts: TextActivations, width: int = 100) -> list[str]:
    """One line per token: the token, then the chosen features firing there, strongest first."""
    lines = []
    shown = max((len(json.dumps(t, ensure_ascii=False)) for t in acts.tokens), default=4)
    shown = min(shown, 24)
    for i, tok in enumerate(acts.tokens):
        fired = [(v, f) for f, v in zip(acts.features, acts.values[i]) if v > 0]
        fired.sort(reverse=True)
        text = " ".join(f"{f}={v:.3g}" for v, f in fired) or "·"
        lines.append(f"{i:>4} {json.dumps(tok, ensure_ascii=False)[:24]:<{shown}}  {text}"[:width + shown])
    return lines


def slug(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text.lower())[:6]
    return "-".join(words) or "text"


def write_page(path: Path, acts: TextActivations, title: str, meta: dict, browser_link: bool) -> Path:
    """The HTML page: the text shaded by the chosen feature, a table of the features' peaks. Standalone
    (the browser's style inlined, the data in the page), so it opens from disk anywhere."""
    css = (resources.files("evaluate.browser") / "assets" / "browser.css").read_text(encoding="utf-8")
    data = {"tokens": acts.tokens, "features": acts.features,
            "values": [[float(f"{v:.4g}") for v in row] for row in acts.values.T.tolist()],
            "browser": browser_link, **meta}
    page = PAGE.format(title=html.escape(title), css=css, data=json.dumps(data).replace("</", "<\\/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def add_to_browser(browser: Path, page: Path, title: str) -> None:
    """List the page on the browser's index (data/texts.js, read by index.html where present)."""
    listing = browser / "texts" / "texts.json"
    entries = json.loads(listing.read_text()) if listing.exists() else []
    entries = [e for e in entries if e["file"] != page.name] + [{"file": page.name, "title": title}]
    listing.write_text(json.dumps(entries, indent=1))
    (browser / "data" / "texts.js").write_text(f"BROWSER.texts({json.dumps(entries)});\n", encoding="utf-8")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}
body {{ display: block; }} main {{ display: block; padding: 12px 18px; }}
#feature-list td {{ cursor: pointer; }} #feature-list tr.current {{ background: #ffe7c2; }}
.tokens {{ font-size: 14px; }}
</style></head>
<body><header id="header"><h1>{title}</h1><div id="run-meta"></div></header>
<main><p class="caption" id="legend"></p><div class="context"><div class="tokens" id="text"></div></div>
<h2 style="font-size:14px">Features <span class="caption">(click one to shade the text by it; hover a token for every value)</span></h2>
<table class="small" id="feature-list" style="width:auto"><thead><tr><th>feature</th><th>max</th><th>tokens firing</th><th>strongest at</th></tr></thead><tbody></tbody></table>
</main>
<script>
"use strict";
var DATA = {data};
(function () {{
  var current = 0;
  function fmt(v) {{ return v === 0 ? "0" : Number(v).toPrecision(3); }}
  function vis(s) {{ return s.replace(/\\n/g, "\\u21b5").replace(/\\t/g, "\\u2192"); }}
  var meta = document.getElementById("run-meta");
  [DATA.sae, DATA.model + ", " + DATA.hook_name, DATA.source].forEach(function (p) {{
    var s = document.createElement("span"); s.textContent = p; meta.appendChild(s); }});
  function render() {{
    var box = document.getElementById("text"); box.textContent = "";
    var vals = DATA.values[current] || [], peak = Math.max.apply(null, vals.concat([0]));
    DATA.tokens.forEach(function (tok, i) {{
      var span = document.createElement("span"), a = vals[i] || 0;
      span.className = "tok"; span.textContent = vis(tok);
      if (a > 0) span.style.background = "rgba(255, 127, 14, " + (0.1 + 0.9 * a / peak).toFixed(3) + ")";
      span.title = JSON.stringify(tok) + "\\n" + DATA.features.map(function (f, k) {{
        return DATA.values[k][i] > 0 ? "#" + f + " " + fmt(DATA.values[k][i]) : null; }}).filter(Boolean).join("\\n");
      box.appendChild(span);
    }});
    document.getElementById("legend").textContent = DATA.features.length ? "shading: feature #" + DATA.features[current] +
      " relative to its maximum on this text (" + fmt(peak) + ")" : "no feature chosen";
    Array.prototype.forEach.call(document.querySelectorAll("#feature-list tbody tr"), function (tr, k) {{
      tr.className = k === current ? "current" : ""; }});
  }}
  var body = document.querySelector("#feature-list tbody");
  DATA.features.forEach(function (f, k) {{
    var vals = DATA.values[k], peak = 0, at = -1, n = 0;
    vals.forEach(function (v, i) {{ if (v > 0) n++; if (v > peak) {{ peak = v; at = i; }} }});
    var tr = document.createElement("tr");
    var name = DATA.browser ? "<a href=\\"../index.html#" + f + "\\">#" + f + "</a>" : "#" + f;
    tr.innerHTML = "<td>" + name + "</td><td class=num>" + fmt(peak) + "</td><td class=num>" + n + " of " +
      vals.length + "</td><td></td>";
    tr.lastChild.textContent = at >= 0 ? JSON.stringify(DATA.tokens[at]) + " (token " + at + ")" : "never fires";
    tr.addEventListener("click", function () {{ current = k; render(); }});
    body.appendChild(tr);
  }});
  render();
}})();
</script></body></html>
"""


def run_activations(name: str, runs_dir, options: dict):
    """What `pipeline activations` does: lines to print."""
    from train.errors import TrainError

    from .load import eval_selection, load_store_model, open_sae, parse_features

    text = options.get("text")
    if options.get("file") is not None:
        try:
            text = Path(options["file"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainError(f"--file {options['file']} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not text or not text.strip():
        raise TrainError("give a text: --text TEXT or --file FILE")
    opened = open_sae(name, runs_dir, options.get("shards"), device="cpu")
    loaded = load_store_model(opened.store, options.get("device") or "auto", options.get("dtype") or "auto")
    opened.sae.to(loaded.device)
    if options.get("features") is not None:
        features, source = parse_features(options["features"], opened.sae.d_sae), "--features"
    elif opened.unlearning is not None:
        features, _, source = eval_selection(opened)
    else:
        features = strongest(loaded, opened.sae, text, options.get("top") or 10)
        source = "not evaluated: the features strongest on this text"
    acts = text_activations(loaded, opened.sae, text, features)
    yield (f"{opened.name}: {len(features)} features ({source}) over {len(acts.tokens)} tokens at "
           f"{opened.store.attrs['hook_name']} of {opened.store.attrs['model']['id']}")
    yield from terminal_lines(acts)
    browser = opened.sae_dir / "browser"
    in_browser = options.get("out") is None and (browser / "index.html").exists()
    out = Path(options["out"]) if options.get("out") is not None else \
        (browser / "texts" if in_browser else opened.sae_dir / "activations") / f"{slug(text)}.html"
    title = f"{opened.name} · {text.strip()[:60]}"
    meta = {"sae": opened.name, "model": opened.store.attrs["model"]["id"],
            "hook_name": opened.store.attrs["hook_name"], "source": source}
    write_page(out, acts, title, meta, browser_link=in_browser)
    if in_browser:
        add_to_browser(browser, out, text.strip()[:80])
    yield f"open {out}" + (" (listed in the run's browser)" if in_browser else "")
