"""Training: the one DeepSpeed core (:mod:`~huatuo_ray.train.core`) and Ray Train loop
(:mod:`~huatuo_ray.train.loop`) every trainer uses, the losses, and the ``sft`` and ``reward-model``
recipes."""
