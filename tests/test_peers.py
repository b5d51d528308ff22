"""bench/peers.py, the peer libraries' side of `pipeline bench`: it runs and reports in the agreed format.

Runs where the peers are installed (.venv-saebench after `make peers-env`; `make test` runs it there).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PEERS = Path(__file__).resolve().parent.parent / "bench" / "peers.py"
MODULE = {"sae_lens": "sae_lens", "dictionary_learning": "dictionary_learning"}


@pytest.mark.parametrize("peer", ["sae_lens", "dictionary_learning"])
def test_peer_trainer_reports_tokens_per_second(peer, tmp_path):
    if importlib.util.find_spec(MODULE[peer]) is None:
        pytest.skip(f"{peer} is not installed here (make peers-env)")
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((1200, 32), dtype=np.float32))
    done = subprocess.run([sys.executable, str(PEERS), "train", "--acts", str(acts), "--d-sae", "64", "--batch-size",
                           "256", "--steps", "2", "--repeats", "2", "--peer", peer],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])  # library chatter goes to stderr
    assert record["bench"] == "train" and record["d_in"] == 32 and record["d_sae"] == 64
    assert 0 < record["min"] <= record["tok_per_s"] <= record["max"]
