"""The Ray Train loop of every loss-driven training stage (``sft``, ``reward-model``, ``dpo``).

A stage gives a :class:`StageSpec`: its model head, its micro-batches, the loss of one, its
validation and what "better" means. :func:`run_training` does the rest on each Ray Train worker,
around one :class:`~huatuo_ray.train.core.TrainingCore`:

* epochs of micro-batches streamed from the worker's dataset shard (prefetched onto the device
  while the previous one computes); an optimizer step at each accumulation boundary; loss, lr,
  grad norm, tokens/s and where the step's time went (waiting for data, computing, the rest) to
  TensorBoard, the terminal and the dashboard (:class:`~huatuo_ray.train.metrics.TrainMetrics`),
  not to Ray Train, whose ``report`` waits for its controller's next poll (2 s): a report per step
  would cap every run at one step per 2 s;
* validation every ``eval_every_steps`` (if the config has it) and at each epoch's end (unless that
  step's was just validated); when it is the best so far, the weights are saved as a Hugging Face
  folder to ``OUTPUT/best`` (the paper kept the weights that did best on validation);
* checkpoints every ``checkpoint.every_steps`` optimizer steps and at each epoch's end: every rank
  writes its DeepSpeed shards plus the loop state into a fresh folder reported with
  ``ray.train.report`` (the only reports). Ray Train keeps the newest ``checkpoint.keep`` and hands the latest back
  through ``ray.train.get_checkpoint()`` after a worker failure or when the job is submitted
  again with the same ``run_name``. The run continues from that step: batches already done in the
  epoch are skipped by count, not repeated (Ray Data may hand them out in another order after a
  restart, so "the same batches" holds for the count, not for each sample);
* at the end rank 0 writes the run's history to ``OUTPUT/_train_state.json``.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from huatuo_ray import storage
from huatuo_ray.config import CheckpointConfig, ClusterConfig, ModelConfig, ScalingConfig, option
from huatuo_ray.train import core as train_core
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig
from huatuo_ray.train.lora import LoRAConfig
from huatuo_ray.train.metrics import TIMING, StepClock

TRAIN_STATE = "_train_state.json"
PREFETCH_BATCHES = 4  # micro-batches made ready ahead of the one computing


@dataclass(kw_only=True)
class TrainStageConfig:
    """The fields every loss-driven training stage has; a stage's config extends it.

    Batch terms (see :mod:`~huatuo_ray.train.deepspeed_setup`): ``micro_batch_size`` rows per
    worker per forward/backward, ``global_batch_size`` rows per optimizer step over all workers.
    """

    output: str = option(help="model artifact folder to write")
    model: ModelConfig = field(default_factory=ModelConfig)
    attn_implementation: str = option(
        "sdpa", help="sdpa or eager take the packing mask; flash_attention_2 uses position_ids"
    )
    micro_batch_size: int = option(4, help="rows per worker per forward/backward")
    global_batch_size: int = option(128, help="rows per optimizer step over all workers")
    epochs: int = option(3, help="passes over the training set")
    eval_every_steps: int | None = option(
        None, help="also validate every N steps (always per epoch)"
    )
    gradient_checkpointing: bool = option(False, help="recompute activations to save memory")
    seed: int = option(0, help="seed of initialisation and shuffling")
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage_path: str = option("outputs/ray_train", help="Ray Train storage (local or s3://...)")
    run_name: str = option("train", help="run name under storage_path: the same name resumes")
    tensorboard_dir: str | None = option(None, help="TensorBoard logs (default OUTPUT/tensorboard)")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tokenize_in_driver_below: int = option(
        1000,
        help="a dataset (split) of fewer records is tokenised in the driver, in milliseconds, "
        "where Ray Data's first tasks take seconds to start; 0: always on Ray Data",
    )

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.epochs < 1:
            raise ValueError("micro_batch_size >= 1 and epochs >= 1 are needed")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")


@dataclass
class TrainRun:
    """One worker's view of the run, handed to the stage's functions."""

    config: Any  # the stage config
    rank: int
    world: int
    device: Any
    dtype: Any  # what the engine computes in
    tokenizer: Any
    pad_id: int
    core: train_core.TrainingCore | None = None

    @property
    def model(self) -> Any:
        """The engine: call it like the model."""
        return self.core.module

    @property
    def feed(self) -> dict[str, Any]:
        """``iter_torch_batches`` options that keep the next micro-batches collated, pinned and on
        the device before the step asks for them (Ray Data does it in a background thread)."""
        return {"prefetch_batches": PREFETCH_BATCHES, "pin_memory": self.device.type == "cuda"}


class StageSpec(Protocol):
    """What a loss-driven stage supplies to :func:`run_training`."""

    name: str
    head: Literal["causal", "score"]

    def batches(self, run: TrainRun, shard: Any, epoch: int) -> Iterable[dict[str, Any]]:
        """The worker's micro-batches of one epoch."""

    def loss(self, run: TrainRun, batch: dict[str, Any]) -> Any:
        """The loss of one micro-batch (a scalar tensor)."""

    def validate(self, run: TrainRun, shard: Any) -> dict[str, float]:
        """Validation metrics over the shard, reduced over all workers (all ranks call it)."""

    def better(self, new: dict[str, float], best: dict[str, Any] | None) -> bool:
        """Whether ``new`` validation metrics beat the best so far (None: no best yet)."""

    def on_best(self, run: TrainRun, train_shard: Any) -> dict[str, Any]:
        """State to keep with a new best model (e.g. reward statistics); all ranks call it."""


def run_training(loop_config: dict[str, Any], spec: StageSpec) -> None:
    """What each Ray Train worker runs. ``loop_config``: ``config`` (the stage config),
    ``train_rows`` (rows of the train split), ``has_validation``, ``tensorboard_dir``."""
    import ray.train

    from huatuo_ray.train import deepspeed_setup as ds_setup
    from huatuo_ray.train.metrics import TrainMetrics

    config = loop_config["config"]
    run = _start(config)
    module = train_core.load_model(
        config.model,
        spec.head,
        run.dtype,
        pad_id=run.pad_id if spec.head == "score" else None,
        gradient_checkpointing=config.gradient_checkpointing,
        attn_implementation=config.attn_implementation,
        lora=config.lora,
    )
    accumulation = ds_setup.gradient_accumulation(
        config.global_batch_size, config.micro_batch_size, run.world
    )
    # Partial accumulations carry over into the next epoch, so count steps over all epochs.
    total_steps = max(1, loop_config["train_rows"] * config.epochs // config.global_batch_size)
    run.core = train_core.TrainingCore(
        module,
        config.deepspeed,
        config.optim,
        config.micro_batch_size,
        accumulation,
        total_steps,
        run.device.type == "cuda",
    )
    epochs = _Epochs(
        spec,
        run,
        _restore(run.core),
        TrainMetrics(spec.name, run.rank == 0, loop_config["tensorboard_dir"], total_steps),
        ray.train.get_dataset_shard("train"),
        ray.train.get_dataset_shard("validation") if loop_config["has_validation"] else None,
    )
    epochs.fit()
    epochs.finish()


class _Epochs:
    """The epoch loop of one worker, with its state (what a checkpoint saves)."""

    def __init__(
        self, spec: StageSpec, run: TrainRun, state: dict, metrics: Any, train: Any, val: Any
    ):
        self.spec, self.run, self.state, self.metrics = spec, run, state, metrics
        self.train_shard, self.val_shard = train, val

    def fit(self) -> None:
        run, state, config = self.run, self.state, self.run.config
        run.model.train()
        clock = StepClock(_device_sync(run.device))
        while state["epoch"] < config.epochs:
            skip = state["micro_in_epoch"]
            batches = iter(self.spec.batches(run, self.train_shard, state["epoch"]))
            for micro in itertools.count():
                clock.waiting()
                batch = next(batches, None)
                if batch is None:
                    break
                if micro < skip:
                    continue  # done before the restart
                clock.got_batch()
                loss = self.spec.loss(run, batch)
                stepped = run.core.backward_step(loss)
                state["micro_in_epoch"] = micro + 1
                self.metrics.add_micro(batch, loss)
                timing = clock.computed(step_end=stepped)
                if timing is not None:
                    self.after_step(timing)
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
            self.checkpoint(self.validate_unless_done())

    def after_step(self, timing: dict[str, float]) -> None:
        """Log the step; validate and checkpoint when due. Only a checkpoint goes through
        ``ray.train.report`` (it waits for Ray Train's controller, ~2 s)."""
        state, config = self.state, self.run.config
        state["step"] += 1
        logged = self.metrics.log_step(
            state["step"], self.run.core.lr, self.run.core.grad_norm(), timing
        )
        state["train_loss"].append([state["step"], logged["loss"]])
        state["tokens_per_s"].append([state["step"], logged["tokens_per_s"]])
        state["step_timing"].append([state["step"], *(logged[k] for k in ("step_s", *TIMING))])
        every = config.eval_every_steps
        extra = self.validate() if every and state["step"] % every == 0 else {}
        if state["step"] % config.checkpoint.every_steps == 0:
            self.checkpoint({**logged, **extra})

    def validate(self) -> dict[str, Any]:
        """Validation metrics; the weights to ``OUTPUT/best`` when they are the best so far."""
        if self.val_shard is None:
            return {}
        state, run = self.state, self.run
        values = self.spec.validate(run, self.val_shard)
        improved = self.spec.better(values, state["best"])
        state["history"].append({"step": state["step"], **values})
        if improved:
            state["best"] = {"step": state["step"], **values}
            state.update(self.spec.on_best(run, self.train_shard))
            run.core.save_hf_model(run.tokenizer, storage.join(run.config.output, "best"))
        self.metrics.log_validation(state["step"], values["val_loss"], improved)
        return values

    def validate_unless_done(self) -> dict[str, Any]:
        """An epoch's closing validation, unless the weights are those validated last (the
        last step's was due by ``eval_every_steps``): the same pass twice gives the same values."""
        history = self.state["history"]
        if history and history[-1]["step"] == self.state["step"]:
            return {k: v for k, v in history[-1].items() if k != "step"}
        return self.validate()

    def checkpoint(self, values: dict[str, Any]) -> None:
        """Every rank writes its shards and reports them with ``values`` to Ray Train."""
        import ray.train

        values = {"step": self.state["step"], "epoch": self.state["epoch"], **values}
        with tempfile.TemporaryDirectory() as folder:
            self.run.core.save_checkpoint(folder, self.state)
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def finish(self) -> None:
        run = self.run
        self.metrics.close()
        if run.rank == 0:
            history = {k: v for k, v in self.state.items() if k != "micro_in_epoch"}
            storage.write_json(storage.join(run.config.output, TRAIN_STATE), history)
        if self.val_shard is None:  # no validation to choose by: the last weights are the model
            run.core.save_hf_model(run.tokenizer, storage.join(run.config.output, "best"))


def _start(config: Any) -> TrainRun:
    import ray.train
    import torch

    from huatuo_ray.train import deepspeed_setup as ds_setup

    ctx = ray.train.get_context()
    device, on_gpu = train_core.device_and_backend()
    torch.manual_seed(config.seed)
    train_core.init_process_group(on_gpu)
    tokenizer, pad_id = train_core.load_tokenizer(config.model)
    bf16 = ds_setup.use_bf16(config.deepspeed, on_gpu)
    return TrainRun(
        config=config,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=device,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        tokenizer=tokenizer,
        pad_id=pad_id,
    )


def _device_sync(device: Any) -> Any:
    """What waits for the device to finish its queued work (None on CPU: nothing is queued)."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else None


def _restore(core: train_core.TrainingCore) -> dict[str, Any]:
    """The loop state: fresh, or from the checkpoint Ray Train hands back."""
    import ray.train

    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "micro_in_epoch": 0,
        "best": None,  # {step, <validation metrics>} of the saved best weights
        "history": [],  # validation: [{step, <metrics>}]
        "train_loss": [],  # [[step, loss]]
        "tokens_per_s": [],  # [[step, real tokens/s over all workers]]
        "step_timing": [],  # [[step, step_s, data_wait_s, compute_s, other_s]] (slowest worker)
        "restarts": [],  # steps at which a run resumed from a checkpoint
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = core.load_checkpoint(folder)
        state.setdefault("step_timing", [])  # a checkpoint written before step timing existed
        state["restarts"].append(state["step"])
    return state
