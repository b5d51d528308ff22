// The feature browser's page: an index of features (sortable, filterable) and one feature's panel.
// Data come as scripts (data/index.js, data/features/<id>.js) calling BROWSER.index and
// BROWSER.feature, so that the page works when opened from disk, with no server and no network.
"use strict";

var BROWSER = (function () {
  var state = { index: null, byId: {}, shown: {}, pages: {}, chunks: {}, current: null, sortKey: "r", sortDesc: true };
  var DANGEROUS = "#c0392b", SAFE = "#2e6fba";

  // --- small helpers ------------------------------------------------------------------------------

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), attrs[k]);
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return node;
  }

  function svg(tag, attrs, children) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) { node.appendChild(c); });
    return node;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "–";
    var x = Number(v);
    if (Math.abs(x) >= 1000 && Math.abs(x) < 1e7) return Math.round(x).toLocaleString("en-US");
    return x.toPrecision(digits || 3).replace(/(\.\d*?)0+(e|$)/, "$1$2").replace(/\.(e|$)/, "$1");
  }

  function pct(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    var p = 100 * v;
    return (p >= 10 ? p.toFixed(1) : p >= 0.01 ? p.toPrecision(2) : p.toExponential(1)) + "%";
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // --- charts -------------------------------------------------------------------------------------

  // Activation histogram: dangerous bars up, safe bars down, on one count scale; log-spaced bins.
  function histogram(hist, width, height, axis) {
    var edges = state.index.hist_edges, n = hist.dangerous.length;
    // with an axis (the feature's card) the drawing scales to its card's width, so no bar or label is cut off
    var root = svg("svg", axis ? { viewBox: "0 0 " + width + " " + height, "class": "hist fit", preserveAspectRatio: "xMinYMin meet" }
      : { width: width, height: height, viewBox: "0 0 " + width + " " + height, "class": "hist" });
    if (!n) return root;
    var pad = axis ? 16 : 0, plotH = height - pad, mid = plotH / 2;
    var peak = Math.max(1, Math.max.apply(null, hist.dangerous.concat(hist.safe)));
    var bw = width / n;
    for (var i = 0; i < n; i++) {
      var hd = (hist.dangerous[i] / peak) * (mid - 1), hs = (hist.safe[i] / peak) * (mid - 1);
      var lo = Math.pow(10, edges[hist.first + i]), hi = Math.pow(10, edges[hist.first + i + 1]);
      var tip = "activation " + fmt(lo) + "–" + fmt(hi) + ": " + hist.dangerous[i] + " dangerous, " + hist.safe[i] + " safe tokens";
      if (hd > 0) root.appendChild(svg("rect", { x: i * bw, y: mid - Math.max(hd, 0.8), width: Math.max(bw - 0.5, 0.5), height: Math.max(hd, 0.8), fill: DANGEROUS }, [svg("title", {}, [document.createTextNode(tip)])]));
      if (hs > 0) root.appendChild(svg("rect", { x: i * bw, y: mid, width: Math.max(bw - 0.5, 0.5), height: Math.max(hs, 0.8), fill: SAFE }, [svg("title", {}, [document.createTextNode(tip)])]));
    }
    root.appendChild(svg("line", { x1: 0, x2: width, y1: mid, y2: mid, stroke: "#999", "stroke-width": 0.5 }));
    if (axis) {
      var first = edges[hist.first], last = edges[hist.first + n];
      for (var d = Math.ceil(first); d <= Math.floor(last); d++) {
        var x = ((d - first) / (last - first)) * width;
        root.appendChild(svg("line", { x1: x, x2: x, y1: plotH, y2: plotH + 4, stroke: "#666" }));
        var anchor = x < 14 ? "start" : x > width - 14 ? "end" : "middle";
        var t = svg("text", { x: x, y: height - 2, "font-size": 10, "text-anchor": anchor, fill: "#444" });
        t.textContent = d === 0 ? "1" : "1e" + d;
        root.appendChild(t);
      }
    }
    return root;
  }

  // r over every live feature, 20 bins; the shown features darker, the specificity threshold dashed.
  function rHistogram(index) {
    var bins = 20, all = new Array(bins).fill(0), shown = new Array(bins).fill(0);
    var shownSet = {};
    index.all.shown.forEach(function (f) { shownSet[f] = true; });
    var live = 0;
    index.all.r.forEach(function (r, f) {
      if (r === null) return;
      live++;
      var b = Math.min(bins - 1, Math.floor(r * bins));
      all[b]++;
      if (shownSet[f]) shown[b]++;
    });
    var w = 360, h = 110, pad = 18, peak = Math.max.apply(null, all.concat([1]));
    var root = svg("svg", { width: w, height: h + pad, viewBox: "0 0 " + w + " " + (h + pad), id: "r-hist-svg" });
    var bw = w / bins;
    for (var i = 0; i < bins; i++) {
      var colour = "rgb(" + Math.round(46 + (192 - 46) * i / (bins - 1)) + "," + Math.round(111 - 54 * i / (bins - 1)) + "," + Math.round(186 - 143 * i / (bins - 1)) + ")";
      var ha = Math.sqrt(all[i] / peak) * h, hs = Math.sqrt(shown[i] / peak) * h;
      var tip = "r " + (i / bins).toFixed(2) + "–" + ((i + 1) / bins).toFixed(2) + ": " + all[i] + " features (" + shown[i] + " shown)";
      root.appendChild(svg("rect", { x: i * bw + 0.5, y: h - ha, width: bw - 1, height: ha, fill: colour, opacity: 0.35 }, [svg("title", {}, [document.createTextNode(tip)])]));
      root.appendChild(svg("rect", { x: i * bw + 0.5, y: h - hs, width: bw - 1, height: hs, fill: colour }, [svg("title", {}, [document.createTextNode(tip)])]));
    }
    var tx = index.r_threshold * w;
    root.appendChild(svg("line", { x1: tx, x2: tx, y1: 0, y2: h, stroke: "#222", "stroke-dasharray": "3,2" }));
    [0, 0.25, 0.5, 0.75, 1].forEach(function (v) {
      var t = svg("text", { x: Math.min(Math.max(v * w, 8), w - 8), y: h + 13, "font-size": 10, "text-anchor": "middle", fill: "#444" });
      t.textContent = v;
      root.appendChild(t);
    });
    return el("div", {}, [
      el("div", { cls: "card-title", text: "r = a_d / (a_d + a_s) over " + live.toLocaleString() + " live features" }),
      root,
      el("div", { cls: "caption", text: "bar height: √count; dark: the " + index.features.length + " features listed below; dashed: r = " + index.r_threshold })
    ]);
  }

  // --- the index ----------------------------------------------------------------------------------

  var COLUMNS = [
    { key: "id", label: "feature", title: "feature index" },
    { key: "r", label: "r", title: "mean activation on dangerous / (dangerous + safe), over the store" },
    { key: "rank", label: "rank", title: "rank by r among live features (1 = most dangerous-leaning)" },
    { key: "rate_dangerous", label: "dangerous", title: "fraction of dangerous tokens where it fires" },
    { key: "rate_safe", label: "safe", title: "fraction of safe tokens where it fires" },
    { key: "max", label: "max", title: "largest activation over the store" },
    { key: "selected", label: "sel.", title: "selected: clamped by some unlearning setting of pipeline eval" },
    { key: null, label: "activations", title: "histogram of positive activations (log bins): dangerous up, safe down" }
  ];

  // Each term of the filter box: a test on a row, its text, and (for a comparison) the column it reads.
  function parseFilter(text) {
    var tests = [];
    text.split(/[\s,]+/).filter(Boolean).forEach(function (part) {
      var m = part.match(/^(r|rank|rate_dangerous|rate_safe|max|id)(<=|>=|<|>|=)(-?[\d.]+(?:e-?\d+)?)$/);
      var test;
      if (m) {
        var key = m[1], op = m[2], v = parseFloat(m[3]);
        test = function (row) {
          var x = row[key];
          if (x === null || x === undefined) return false;
          return op === "<" ? x < v : op === ">" ? x > v : op === "<=" ? x <= v : op === ">=" ? x >= v : x === v;
        };
        test.key = key; test.op = op;
      } else if (/^\d+$/.test(part)) {
        test = function (row) { return String(row.id).indexOf(part) === 0; };
      } else {
        test = function () { return false; };
        test.unknown = true;
      }
      test.text = part;
      tests.push(test);
    });
    return tests;
  }

  // Why a filter lists nothing: each term alone, and for one nothing passes, the nearest value there is.
  function whyEmpty(tests, pool, search) {
    var parts = [];
    tests.forEach(function (t) {
      if (t.unknown) { parts.push("“" + t.text + "” is not a filter term (a feature id, or r, rank, rate_dangerous, rate_safe, max with <, >, <=, >=, =)"); return; }
      var n = pool.filter(t).length, note = t.text + ": " + n + " pass alone";
      if (!n && t.key) {
        var values = pool.map(function (row) { return row[t.key]; }).filter(function (x) { return x !== null && x !== undefined; });
        if (values.length) {
          var low = t.op.charAt(0) === "<";
          note += " (the " + (low ? "lowest " : "highest ") + t.key + " among them is " + fmt(low ? Math.min.apply(null, values) : Math.max.apply(null, values)) + ")";
        }
      }
      parts.push(note);
    });
    if (search) parts.push("“" + search + "”: " + pool.filter(function (row) { return matchesSearch(row, search); }).length + " fire most on a token containing it");
    return "No feature passes every condition among the " + pool.length + " listed. " + parts.join("; ") + ".";
  }

  function matchesSearch(row, search) {
    var q = search.toLowerCase();
    return (row.fired_on || []).some(function (tok) { return tok.toLowerCase().indexOf(q) >= 0; });
  }

  function renderTable() {
    var index = state.index, table = document.getElementById("feature-table");
    var thead = table.tHead, tbody = table.tBodies[0];
    clear(thead);
    var tr = el("tr");
    COLUMNS.forEach(function (c) {
      var arrow = c.key === state.sortKey ? (state.sortDesc ? " ▼" : " ▲") : "";
      tr.appendChild(el("th", { title: c.title, "data-key": c.key || "", cls: c.key ? "sortable" : "",
        onclick: c.key ? function () { sortBy(c.key); } : null }, [c.label + arrow]));
    });
    thead.appendChild(tr);
    var tests = parseFilter(document.getElementById("filter-text").value);
    var search = document.getElementById("search-text").value.trim();
    var onlySelected = document.getElementById("filter-selected").checked;
    var onlySpecific = document.getElementById("filter-specific").checked;
    var pool = index.features.filter(function (row) {
      return !(onlySelected && !row.selected) && !(onlySpecific && !row.specific);
    });
    var rows = pool.filter(function (row) {
      return tests.every(function (t) { return t(row); }) && (!search || matchesSearch(row, search));
    });
    var key = state.sortKey, sign = state.sortDesc ? -1 : 1;
    rows.sort(function (a, b) {
      var x = a[key], y = b[key];
      if (x === y) return a.id - b.id;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    clear(tbody);
    var limit = 2000;
    rows.slice(0, limit).forEach(function (row) {
      var line = el("tr", { "data-feature": row.id, cls: row.id === state.current ? "current" : "",
        onclick: function () { location.hash = "#" + row.id; } }, [
        el("td", { cls: "num" }, [el("a", { href: "#" + row.id, text: "#" + row.id })]),
        el("td", { cls: "num" }, [rCell(row.r)]),
        el("td", { cls: "num", text: row.rank === null ? "–" : String(row.rank) }),
        el("td", { cls: "num", text: pct(row.rate_dangerous) }),
        el("td", { cls: "num", text: pct(row.rate_safe) }),
        el("td", { cls: "num", text: fmt(row.max) }),
        el("td", { cls: "flag", text: row.selected ? "✓" : "" }),
        el("td", {}, [histogram(row.hist, 90, 22, false)])
      ]);
      tbody.appendChild(line);
    });
    if (!rows.length) {
      var why = pool.length ? whyEmpty(tests, pool, search)
        : "No feature passes: none of the " + index.features.length + " listed is " + (onlySelected ? "selected" : "") +
          (onlySelected && onlySpecific ? " and " : "") + (onlySpecific ? "dangerous-specific" : "") + ".";
      tbody.appendChild(el("tr", { cls: "why-empty" }, [el("td", { colspan: COLUMNS.length, id: "why-empty", text: why })]));
    }
    document.getElementById("row-count").textContent = rows.length + " of " + index.features.length +
      " features" + (rows.length > limit ? " (first " + limit + " listed)" : "");
  }

  function rCell(r) {
    if (r === null || r === undefined) return document.createTextNode("–");
    var bar = el("span", { cls: "rbar" }, [el("span", { cls: "rfill", style: "width:" + (r * 100).toFixed(0) + "%" })]);
    return el("span", { cls: "rcell" }, [bar, el("span", { text: r.toFixed(3) })]);
  }

  function sortBy(key) {
    if (state.sortKey === key) state.sortDesc = !state.sortDesc;
    else { state.sortKey = key; state.sortDesc = key !== "id" && key !== "rank"; }
    renderTable();
  }

  function renderHeader(index) {
    var meta = document.getElementById("run-meta");
    document.title = index.run + " · feature browser";
    document.querySelector("#header h1").textContent = index.run + " · feature browser";
    var t = index.train || {};
    var parts = [
      index.model + ", " + (index.hook_name || "layer " + index.layer),
      (index.architecture || "SAE") + " " + index.d_in + " → " + index.d_sae.toLocaleString() + " features",
      (t.trainer || "") + (t.ortho !== undefined && t.ortho !== null ? ", ortho " + t.ortho : "") + (t.l1 !== undefined && t.l1 !== null ? ", l1 " + t.l1 : ""),
      "store: " + index.tokens.dangerous.toLocaleString() + " dangerous + " + index.tokens.safe.toLocaleString() + " safe tokens"
    ];
    if (index.unlearning) {
      parts.push("unlearning score " + fmt(index.unlearning.score) + " (random control " + fmt(index.unlearning.control_score) + ")");
    } else {
      parts.push("not evaluated");
    }
    clear(meta);
    parts.forEach(function (p) { meta.appendChild(el("span", { text: p })); });
  }

  // --- one feature --------------------------------------------------------------------------------

  function tokenText(s) {
    return s.replace(/\n/g, "↵").replace(/\t/g, "→");
  }

  function contextLine(ctx, peak) {
    var best = 0;
    ctx.acts.forEach(function (a, i) { if ((a || 0) > (ctx.acts[best] || 0)) best = i; });
    var line = el("div", { cls: "tokens" });
    ctx.tokens.forEach(function (tok, i) {
      var a = ctx.acts[i] || 0, alpha = peak > 0 ? Math.min(1, a / peak) : 0;
      var span = el("span", { cls: "tok" + (i === best && a > 0 ? " max" : "") + (i === ctx.at ? " at" : ""),
        title: JSON.stringify(tok) + "  activation " + fmt(a) + (i === ctx.at ? "  (the example token)" : ""),
        style: a > 0 ? "background: rgba(255, 127, 14, " + (0.1 + 0.9 * alpha).toFixed(3) + ")" : "" }, [tokenText(tok)]);
      line.appendChild(span);
    });
    return el("div", { cls: "context" }, [
      el("div", { cls: "ctx-meta" }, [
        el("span", { cls: "act", text: fmt(ctx.acts[ctx.at]) }),
        el("span", { text: ctx.source + " · doc " + ctx.doc + " · pos " + ctx.pos })
      ]),
      line
    ]);
  }

  function contextColumns(title, page, key, peak, row) {
    var columns = ["dangerous", "safe"].map(function (group) {
      var list = page[key][group] || [];
      var rate = group === "dangerous" ? row.rate_dangerous : row.rate_safe;
      var head = el("h3", { cls: group }, [group + " ", el("span", { cls: "sub", text: "fires on " + pct(rate) + " of " + state.index.tokens[group].toLocaleString() + " tokens" })]);
      var body = list.length ? list.map(function (c) { return contextLine(c, peak); })
        : [el("p", { cls: "empty", text: "It never fires on " + group + " text in the store." })];
      return el("div", { cls: "column " + group }, [head].concat(body));
    });
    var legend = "shading: activation relative to the feature's maximum (" + fmt(peak) + "); boxed: the largest in the context; underlined: the example token; hover a token for its value";
    return el("section", { cls: "contexts" }, [el("h2", {}, [title + " ", el("span", { cls: "caption", text: legend })]),
      el("div", { cls: "two-columns" }, columns)]);
  }

  function lensCard(page) {
    if (!page.lens) return el("div", { cls: "card" }, [el("div", { cls: "card-title", text: "Logit lens" }),
      el("p", { cls: "empty", text: "No unembedding was found beside the model's tokenizer." })]);
    function list(items, cls) {
      return el("ol", { cls: "lens " + cls }, items.map(function (p) {
        return el("li", {}, [el("code", { text: tokenText(p[0]) }), el("span", { cls: "val", text: fmt(p[1]) })]);
      }));
    }
    return el("div", { cls: "card" }, [
      el("div", { cls: "card-title", text: "Logit lens (W_dec · W_U)" }),
      el("div", { cls: "lens-columns" }, [
        el("div", {}, [el("div", { cls: "sub", text: "promoted" }), list(page.lens.up, "up")]),
        el("div", {}, [el("div", { cls: "sub", text: "suppressed" }), list(page.lens.down, "down")])
      ])
    ]);
  }

  function neighboursCard(page) {
    var all = state.index.all;
    var items = page.neighbours.map(function (p) {
      var id = p[0], cos = p[1], r = all.r[id];
      var name = state.shown[id] ? el("a", { href: "#" + id, text: "#" + id }) : el("span", { cls: "no-page", title: "no page: not among the features this browser shows", text: "#" + id });
      return el("tr", {}, [el("td", {}, [name]), el("td", { cls: "num", text: fmt(cos, 3) }),
        el("td", { cls: "num", text: r === null ? "–" : r.toFixed(3) })]);
    });
    return el("div", { cls: "card" }, [
      el("div", { cls: "card-title", text: "Decoder neighbours (largest |cos|)" }),
      el("table", { cls: "small" }, [el("thead", {}, [el("tr", {}, [el("th", { text: "feature" }), el("th", { text: "cos" }), el("th", { text: "r" })])]),
        el("tbody", {}, items)])
    ]);
  }

  function cofiringCard(page) {
    var all = state.index.all, list = page.cofiring || [];
    var items = list.map(function (p) {
      var id = p[0], r = all.r[id];
      var name = state.shown[id] ? el("a", { href: "#" + id, text: "#" + id }) : el("span", { cls: "no-page", text: "#" + id });
      return el("tr", {}, [el("td", {}, [name]), el("td", { cls: "num", text: fmt(p[1], 3) }),
        el("td", { cls: "num", text: r === null || r === undefined ? "–" : r.toFixed(3) })]);
    });
    var body = items.length ? el("table", { cls: "small", id: "cofiring" }, [el("thead", {}, [el("tr", {}, [el("th", { text: "feature" }), el("th", { text: "corr." }), el("th", { text: "r" })])]),
      el("tbody", {}, items)])
      : el("p", { cls: "empty", text: state.index.cofiring ? "No other feature fires together with it on the store." : "Not computed (--cofiring 0)." });
    return el("div", { cls: "card" }, [el("div", { cls: "card-title", text: "Fires together with" }), body,
      items.length ? el("div", { cls: "caption", text: "Pearson correlation of activations over the " + state.index.rows.toLocaleString() + " store rows" }) : null]);
  }

  function unlearningCard(page) {
    var u = state.index.unlearning;
    if (!u) return el("div", { cls: "card" }, [el("div", { cls: "card-title", text: "Unlearning" }),
      el("p", { cls: "empty", text: "The run was not evaluated (pipeline eval)." })]);
    var rows = page.settings.map(function (k) {
      var s = u.settings[k];
      return el("tr", { cls: s.best ? "best" : "" }, [
        el("td", { cls: "num", text: String(s.retain_threshold) }), el("td", { cls: "num", text: String(s.n_features) }),
        el("td", { cls: "num", text: String(s.multiplier) }), el("td", { cls: "num", text: fmt(s.forget_loss_increase) }),
        el("td", { cls: "num", text: fmt(s.retain_loss_increase) })]);
    });
    var body = rows.length ? el("table", { cls: "small" }, [el("thead", {}, [el("tr", {}, ["retain <", "N", "×", "Δ forget", "Δ retain"].map(function (h) { return el("th", { text: h }); }))]), el("tbody", {}, rows)])
      : el("p", { cls: "empty", text: "No unlearning setting clamped this feature." });
    return el("div", { cls: "card" }, [el("div", { cls: "card-title", text: "Unlearning settings that clamp it" }), body,
      rows.length ? el("div", { cls: "caption", text: "loss increase in nats on held-out text; bold: the scored setting" }) : null]);
  }

  function renderFeature(id) {
    var pane = document.getElementById("feature-pane"), row = state.byId[id], page = state.pages[id];
    clear(pane);
    if (!row) { pane.appendChild(el("p", { cls: "empty", text: "Feature " + id + " has no page in this browser." })); return; }
    if (!page) { pane.appendChild(el("p", { cls: "hint", text: "Loading feature " + id + "…" })); return; }
    var peak = row.max || 0;
    var badges = [
      el("span", { cls: "badge", text: "r " + (row.r === null ? "–" : row.r.toFixed(3)) + (row.rank ? " (rank " + row.rank + ")" : "") }),
      el("span", { cls: "badge dangerous", text: "dangerous " + pct(row.rate_dangerous) }),
      el("span", { cls: "badge safe", text: "safe " + pct(row.rate_safe) }),
      el("span", { cls: "badge", text: "max " + fmt(row.max) })
    ];
    if (row.selected) badges.push(el("span", { cls: "badge selected", text: "selected by unlearning" }));
    if (row.specific) badges.push(el("span", { cls: "badge specific", text: "dangerous-specific" }));
    pane.appendChild(el("div", { cls: "feature-head" }, [el("h2", { id: "feature-title", text: "Feature " + id })].concat(badges)));
    pane.appendChild(el("div", { cls: "cards" }, [
      el("div", { cls: "card" }, [el("div", { cls: "card-title", text: "Activations (log bins): dangerous ▲ safe ▼" }),
        histogram(row.hist, 300, 120, true)]),
      cofiringCard(page), lensCard(page), neighboursCard(page), unlearningCard(page)
    ]));
    pane.appendChild(contextColumns("Top activations", page, "top", peak, row));
    pane.appendChild(contextColumns("Across the activation range (a uniform sample of the tokens where it fires)", page, "samples", peak, row));
    pane.scrollTop = 0;
  }

  function show(id) {
    state.current = id;
    Array.prototype.forEach.call(document.querySelectorAll("#feature-table tr.current"), function (tr) { tr.className = ""; });
    var tr = document.querySelector('#feature-table tr[data-feature="' + id + '"]');
    if (tr) tr.className = "current";
    if (!state.byId[id] || state.pages[id]) { renderFeature(id); return; }
    renderFeature(id);
    var chunk = Math.floor(id / (state.index.chunk || 1));
    if (state.chunks[chunk]) return;  // already on its way
    state.chunks[chunk] = true;
    var script = document.createElement("script");
    script.src = "data/features/" + chunk + ".js";
    script.onerror = function () {
      var pane = document.getElementById("feature-pane");
      clear(pane);
      pane.appendChild(el("p", { cls: "empty", text: "The page of feature " + id + " is missing (data/features/" + chunk + ".js)." }));
    };
    document.body.appendChild(script);
  }

  function route() {
    var m = location.hash.match(/^#(\d+)$/);
    if (m) show(parseInt(m[1], 10));
  }

  return {
    index: function (data) {
      state.index = data;
      data.features.forEach(function (row) { state.byId[row.id] = row; state.shown[row.id] = true; });
      renderHeader(data);
      var rh = document.getElementById("r-histogram");
      clear(rh);
      rh.appendChild(rHistogram(data));
      ["filter-text", "search-text", "filter-selected", "filter-specific"].forEach(function (id) {
        document.getElementById(id).addEventListener("input", renderTable);
      });
      renderTable();
      window.addEventListener("hashchange", route);
      if (/^#\d+$/.test(location.hash)) route();
    },
    feature: function (id, page) {
      state.pages[id] = page;
      if (state.current === id) renderFeature(id);
    },
    // pages of `pipeline activations` added to this browser (data/texts.js)
    texts: function (list) {
      var box = document.getElementById("texts");
      if (!box || !list.length) return;
      clear(box);
      box.appendChild(el("span", { cls: "caption", text: "Your texts: " }));
      list.forEach(function (t) { box.appendChild(el("a", { href: "texts/" + t.file, text: t.title })); box.appendChild(document.createTextNode(" ")); });
    }
  };
})();
