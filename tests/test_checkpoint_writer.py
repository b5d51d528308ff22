"""Checkpoints written by the writer thread: the state as it was when saved, complete on disk after
`wait`, and a failed write raised on the training thread."""

import pytest
import torch

from train.checkpointing import CheckpointJob, CheckpointWriter
from train.runs import checkpoint_step, load_checkpoint


def test_a_checkpoint_holds_the_state_at_save_time_though_training_goes_on(tmp_path):
    live = {"w": torch.arange(12.0).reshape(3, 4).T, "step_count": torch.tensor(7)}  # a transpose, as W_enc
    saved = {k: v.clone() for k, v in live.items()}
    writer = CheckpointWriter()
    try:
        writer.save([CheckpointJob(tmp_path, 7, live, {"trainer": "t"})])
        live["w"].add_(100.0)  # the next step changes the trainer's tensors while the write may run
        writer.save([CheckpointJob(tmp_path, 8, live, {"trainer": "t"}, keep_previous=True)])  # after step 7's
        writer.wait()
        assert checkpoint_step(tmp_path) == 8
    finally:
        writer.close()
    _, at_7, state_7 = load_checkpoint(tmp_path, step=7)
    _, at_8, state_8 = load_checkpoint(tmp_path)
    assert state_7 == {"trainer": "t", "step": 7} and state_8["step"] == 8
    assert all(torch.equal(at_7[k], saved[k]) for k in saved)
    assert torch.equal(at_8["w"], saved["w"] + 100.0)


def test_a_failed_write_is_raised_on_the_training_thread(tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    writer = CheckpointWriter()
    writer.save([CheckpointJob(blocked, 1, {"w": torch.zeros(2)}, {})])
    with pytest.raises(OSError):
        writer.close()
