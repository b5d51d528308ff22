"""The seed's run 0: mean ||x - x_hat||_2 + lambda_1 mean ||f||_1, Adam, linear warm-up."""

from .base import Trainer


class BaselineTrainer(Trainer):
    name = "baseline"

    def loss(self, x, n_dangerous):
        return self.base_loss(x, n_dangerous)
