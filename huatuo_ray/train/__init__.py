"""Training: the one DeepSpeed core (:mod:`~huatuo_ray.train.core`) and Ray Train loop
(:mod:`~huatuo_ray.train.loop`) every trainer uses, the driver's side of a Ray Train run
(:mod:`~huatuo_ray.train.ray_trainer`), the losses, what the pair stages share
(:mod:`~huatuo_ray.train.preference_data`), and the ``sft``, ``reward-model`` and ``dpo``
recipes."""
