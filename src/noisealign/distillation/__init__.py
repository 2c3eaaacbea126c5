"""The distill stage's internals (the stage itself is :mod:`noisealign.distill`).

- :mod:`~noisealign.distillation.stage`: the steps of ``distill.main`` (inputs, model,
  features, training parts, the prompt-only baseline);
- :mod:`~noisealign.distillation.trainer`: the loss of a batch, the held-out metrics and the
  logged record of a step, run by :func:`noisealign.training.train`;
- :mod:`~noisealign.distillation.teacher`: a k-step teacher's labels of fresh noises;
- :mod:`~noisealign.distillation.card`: the model card, metrics.json and the saved folder.

The reward models themselves live in :mod:`noisealign.rewards`.
"""
