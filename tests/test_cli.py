"""Every config key can be overridden by a flag of the same name."""

import typer

import pipeline
from evaluate.config import EvalConfig
from harvest.config import HarvestConfig
from train.config import TrainConfig


def test_every_config_key_has_a_flag():
    command = typer.main.get_command(pipeline.app)
    for name, model in (("harvest", HarvestConfig), ("train", TrainConfig), ("eval", EvalConfig)):
        params = {p.name for p in command.commands[name].params}
        assert set(model.model_fields) <= params, (name, set(model.model_fields) - params)
