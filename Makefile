# The README's two commands. Each creates .venv/ on first use and installs what it needs, with the
# CPU build of torch pinned by constraints.txt (drop `-c constraints.txt` on a GPU machine). --no-compile:
# Python writes the byte-code of the modules it imports on first use, rather than pip for every file.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install --disable-pip-version-check --no-compile -q -c constraints.txt

SAEBENCH_VENV := .venv-saebench

.PHONY: demo study study2 test docs saebench-env peers-env clean-venv gpu-wheels

# The main job on the embedded offline default: Gemma 3 270M, PubMed virology vs news + Wikipedia:
# harvest once, train a baseline and a ratio-ranked TopK SAE at equal L0 in lockstep from the cache, evaluate them
# (unlearning, core, specialisation) and write reports/demo/report.md.
demo: $(VENV)/.installed
	$(VENV)/bin/pipeline harvest --config configs/demo.yaml
	$(VENV)/bin/pipeline info shards/demo/L12
	$(VENV)/bin/pipeline train --sweep configs/sweeps/demo.yaml
	$(VENV)/bin/pipeline eval $$(ls -d runs/run_* | sort -t_ -k2 -n | tail -2) --config configs/eval-demo.yaml
	$(VENV)/bin/pipeline report --out reports/demo

# The study of docs/results.md: TopK SAEs at matched L0 on a 1M-token store, the ratio term's arms against
# lambda_2 = 0 and two training controls, two seeds each; about 86 minutes on 2 CPU cores with native bf16.
# Every step resumes when run again: the harvest from its committed rows, the training from the sweep's last
# checkpoint (one lockstep group), the eval from the SAEs it has finished, on the grid it probed.
study: $(VENV)/.installed
	$(VENV)/bin/pipeline harvest --config configs/study/harvest.yaml
	if [ ! -e runs/study/run_1/train_config.json ]; then $(VENV)/bin/pipeline train --sweep configs/study/sweep.yaml; \
	elif [ ! -e runs/study/run_12/final_info.json ]; then $(VENV)/bin/pipeline train --resume run_12 --runs-dir runs/study; fi
	$(VENV)/bin/pipeline eval $$(ls -d runs/study/run_* | sort -t_ -k2 -n) --config configs/study/eval.yaml
	$(VENV)/bin/pipeline report --runs-dir runs/study --out reports/study

# The second study of docs/results.md: which label-aware method makes dangerous knowledge removable without
# touching near-domain text. The store of configs/study2/harvest.yaml; the 36 full-length SAEs of
# configs/study2/sweep.yaml in one lockstep group (run_1-36), then the baseline trained shorter of
# sweep-shorter.yaml (run_37-42); each SAE evaluated four ways (SAEBench's selection and, for SAEs with a label
# block, the block; each with the static and the conditional clamp), each into its own eval directory (the core
# metrics, which no clamp changes, only into eval/: the other arms' reports read them from there); one
# report per inference arm (the block's against the permuted-label control, whose first run is STUDY2_PERMUTED;
# the others against the baseline, run_1), and under SAEBench's selection and the static clamp two more, each arm
# against each training control. Every step resumes when run again, as `make study` does. The run
# numbers and STUDY2_BLOCK follow the sweep files (tests/test_study2_configs.py checks that they agree).
STUDY2_RUNS := 36
STUDY2_PERMUTED := 31
STUDY2_SHORTER := 37
STUDY2_LAST := 42
STUDY2_BLOCK := 64
STUDY2_EVAL := $(VENV)/bin/pipeline eval --config configs/study2/eval.yaml
STUDY2_ALL := $$(ls -d runs/study2/run_* | sort -t_ -k2 -n)
STUDY2_BLOCKS := $$(for r in $(STUDY2_ALL); do grep -q label_block $$r/cfg.json && echo $$r; done)
STUDY2_REPORT := $(VENV)/bin/pipeline report --runs-dir runs/study2
study2: $(VENV)/.installed
	$(VENV)/bin/pipeline harvest --config configs/study2/harvest.yaml
	if [ ! -e runs/study2/run_1/train_config.json ]; then $(VENV)/bin/pipeline train --sweep configs/study2/sweep.yaml; \
	elif [ ! -e runs/study2/run_$(STUDY2_RUNS)/final_info.json ]; then $(VENV)/bin/pipeline train --resume run_$(STUDY2_RUNS) --runs-dir runs/study2; fi
	if [ ! -e runs/study2/run_$(STUDY2_SHORTER)/train_config.json ]; then $(VENV)/bin/pipeline train --sweep configs/study2/sweep-shorter.yaml; \
	elif [ ! -e runs/study2/run_$(STUDY2_LAST)/final_info.json ]; then $(VENV)/bin/pipeline train --resume run_$(STUDY2_LAST) --runs-dir runs/study2; fi
	$(STUDY2_EVAL) $(STUDY2_ALL)
	$(STUDY2_EVAL) $(STUDY2_ALL) --suite unlearning --clamp conditional
	$(STUDY2_EVAL) $(STUDY2_BLOCKS) --suite unlearning --select block --n-features $(STUDY2_BLOCK)
	$(STUDY2_EVAL) $(STUDY2_BLOCKS) --suite unlearning --select block --n-features $(STUDY2_BLOCK) --clamp conditional
	$(STUDY2_REPORT) --out reports/study2 --reference run_1
	$(STUDY2_REPORT) --out reports/study2-against-permuted --reference run_$(STUDY2_PERMUTED)
	$(STUDY2_REPORT) --out reports/study2-against-shorter --reference run_$(STUDY2_SHORTER)
	$(STUDY2_REPORT) --out reports/study2-saebench-conditional --eval-dir eval-saebench-conditional --reference run_1
	$(STUDY2_REPORT) --out reports/study2-block-static --eval-dir eval-block-static --reference run_$(STUDY2_PERMUTED)
	$(STUDY2_REPORT) --out reports/study2-block-conditional --eval-dir eval-block-conditional --reference run_$(STUDY2_PERMUTED)

# Both environments: the project's, and SAEBench's (for `pipeline eval --saebench`, the peer benchmarks and their tests).
test: $(VENV)/.installed-dev $(SAEBENCH_VENV)/.installed $(SAEBENCH_VENV)/.peers-installed
	$(VENV)/bin/python -m pytest -q --ignore tests/test_peers.py
	$(SAEBENCH_VENV)/bin/python -m pytest -q tests/test_saebench.py tests/test_peers.py

# The documentation site into site/ (open site/index.html). --strict: a broken link or a missing page
# fails the build. Material's end-of-life banner is not a build warning; NO_MKDOCS_2_WARNING hides it.
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# SAEBench pins numpy < 2 and datasets < 4, so it gets an environment of its own. The torchvision
# it pulls from PyPI is not a CPU build and breaks transformers' imports; sae-bench never imports it.
saebench-env: $(SAEBENCH_VENV)/.installed

$(SAEBENCH_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(SAEBENCH_VENV)/bin/python || $(PYTHON) -m venv $(SAEBENCH_VENV)
	$(SAEBENCH_VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt -U pip
	$(SAEBENCH_VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(SAEBENCH_VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt -e '.[saebench,test]'
	$(SAEBENCH_VENV)/bin/pip uninstall --disable-pip-version-check -q -y torchvision
	touch $@

# bench/peers.py's peers, in the SAEBench environment (SAELens is there already). dictionary-learning 0.1.0
# pulls nnsight 0.3.x, and with it torchvision (see above), diffusers, umap-learn and circuitsvis, none of which
# its trainers import; so it goes in without dependencies, with the few modules its import does need.
PEERS_PKGS := dictionary-learning==0.1.0 nnsight==0.3.7 python-socketio==5.18.1 python-engineio==4.15.1 \
	bidict==0.24.1 websocket-client==1.9.2
peers-env: $(SAEBENCH_VENV)/.peers-installed

$(SAEBENCH_VENV)/.peers-installed: $(SAEBENCH_VENV)/.installed
	$(SAEBENCH_VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt --no-deps $(PEERS_PKGS)
	touch $@

# What `make demo` and `make study` need (the project and the demo extra), then, for `make test` and
# `make docs`, the test and docs extras on top: SAELens, wandb, selenium and MkDocs take a minute to
# install that the demo would otherwise spend before its first token.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[demo,test,docs]'
	touch $@

clean-venv:
	rm -rf $(VENV) $(SAEBENCH_VENV)

# Wheels for the GPU machine (Python 3.12, with its own CUDA torch, transformers, typer and numpy):
# what bench/gpu.sh needs beyond those, into .whl/ (ignored; gpu.sh installs from it when present).
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
