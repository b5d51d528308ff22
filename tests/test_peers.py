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


@pytest.mark.parametrize("peer,arch", [("sae_lens", "standard"), ("dictionary_learning", "standard"),
                                       ("sae_lens", "topk"), ("dictionary_learning", "topk"),
                                       ("dictionary_learning", "batchtopk"), ("dictionary_learning", "matryoshka")])
def test_peer_trainer_reports_tokens_per_second_and_quality(peer, arch, tmp_path):
    if importlib.util.find_spec(MODULE[peer]) is None:
        pytest.skip(f"{peer} is not installed here (make peers-env)")
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((1200, 32), dtype=np.float32))
    done = subprocess.run([sys.executable, str(PEERS), "train", "--acts", str(acts), "--d-sae", "64", "--batch-size",
                           "256", "--steps", "2", "--repeats", "2", "--peer", peer, "--arch", arch, "--k", "4",
                           "--heldout", "512"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])  # library chatter goes to stderr
    assert "error" not in record, record["error"]
    assert record["bench"] == "train" and record["arch"] == arch and record["d_in"] == 32 and record["d_sae"] == 64
    assert 0 < record["min"] <= record["tok_per_s"] <= record["max"]
    assert record["trained_tokens"] == (3 + 2) * 256
    ev, l0 = record["explained_variance"], record["l0"]
    assert ev["min"] <= ev["median"] <= ev["max"] < 1
    if arch == "standard":
        assert 0 < l0["median"] <= 64
    else:  # k per token, or k per token on average over each evaluation batch
        assert l0["min"] == l0["max"] == 4


def test_a_trainer_the_peer_lacks_is_refused_in_one_line(tmp_path):
    if importlib.util.find_spec("sae_lens") is None:
        pytest.skip("sae_lens is not installed here (make peers-env)")
    acts = tmp_path / "acts.npy"
    np.save(acts, np.zeros((300, 8), dtype=np.float32))
    done = subprocess.run([sys.executable, str(PEERS), "train", "--acts", str(acts), "--d-sae", "16", "--batch-size",
                           "256", "--steps", "1", "--repeats", "1", "--peer", "dictionary_learning", "--arch", "topk",
                           "--sparse-activations"], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "no topk trainer here with sparse activations" in done.stderr
