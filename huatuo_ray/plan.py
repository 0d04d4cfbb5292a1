"""Stage ``plan``: will a preset's actor groups fit on the GPUs? Runs nothing, needs no GPU.

    python -m huatuo_ray plan --config jobs/paper/ppo.yaml --gpu-memory 80

Here ``--config`` names the preset to size (any stage's). For each actor group it prints the GPUs
and an estimate of the memory each GPU holds, then refuses (exit 1) a placement that does not fit,
naming the group and what would make it fit. The estimate, in bytes, per GPU:

* weights: parameters x 2 (bf16), divided over the workers under ZeRO-3, none with param offload;
* gradients: trainable parameters x 2, divided under ZeRO >= 2;
* optimizer states: trainable parameters x 12 (fp32 master, Adam m and v), divided under
  ZeRO >= 1, none with optimizer offload;
* activations at the micro-batch and length: 34 x batch x length x hidden per trained layer
  (2 x ... with gradient checkpointing, plus one whole layer), and the LM head's logits
  (8 x batch x length x vocab: bf16 logits, their fp32 copy and its gradient);
* a vLLM engine holds ``gpu_memory_utilization`` of each of its GPUs; its weights must fit in it
  with room for the KV cache;
* 1.5 GB of CUDA context per process on the GPU (inside vLLM's share for an engine).

Groups in one ``colocate`` entry share GPUs: their estimates add up. Model sizes come from the
model's ``config.json`` when it is readable here, else from a table of known models, else from
``model.params`` in the preset (the shape of the nearest known model of that size).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from huatuo_ray.config import ModelConfig, load_config, option

GB = 1e9
CONTEXT = 1.5 * GB


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of a model."""

    params: float
    layers: int
    hidden: int
    vocab: int
    source: str  # where the numbers came from

    @property
    def layer_params(self) -> float:
        return max(self.params - 2 * self.vocab * self.hidden, 0) / self.layers


#: Known models (lower-case name fragment -> params, layers, hidden, vocab), longest fragment first.
KNOWN = {
    "ziya-llama-13b": (13.0e9, 40, 5120, 39424),
    "llama-2-13b": (13.0e9, 40, 5120, 32000),
    "llama-13b": (13.0e9, 40, 5120, 32000),
    "qwen2.5-7b": (7.6e9, 28, 3584, 152064),
    "llama-2-7b": (6.7e9, 32, 4096, 32000),
    "llama-7b": (6.7e9, 32, 4096, 32000),
    "baichuan2-13b": (13.9e9, 40, 5120, 125696),
    "qwen2.5-0.5b": (0.49e9, 24, 896, 151936),
}


def _from_config_json(path: str) -> ModelSize | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            c = json.load(f)
        h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads)
    inter = c.get("intermediate_size", 4 * h)
    attention = 2 * h * h + 2 * h * (h * kv // max(heads, 1))
    per_layer = attention + 3 * h * inter
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return ModelSize(layers * per_layer + embeddings, layers, h, vocab, f"{path}/config.json")


def model_size(model: ModelConfig, default_params: float | None = None) -> ModelSize:
    """The model's size: its config.json, a known model, or the preset's ``params`` hint
    (else ``default_params``)."""
    path = model.path
    local = path[len("file://") :] if path.startswith("file://") else path
    if "://" not in local and (found := _from_config_json(local)) is not None:
        return found
    name = path.lower()
    for fragment, (params, layers, hidden, vocab) in KNOWN.items():
        if fragment in name:
            return ModelSize(params, layers, hidden, vocab, f"known model {fragment}")
    params = model.params or default_params
    if params:
        _, (_, layers, hidden, vocab) = min(
            KNOWN.items(), key=lambda kv: abs(math.log(kv[1][0] / params))
        )
        return ModelSize(params, layers, hidden, vocab, "model.params in the preset")
    raise ValueError(
        f"model {path!r}: no readable config.json and not a known model; "
        "add model.params (e.g. 13.0e9) to the preset, or pass --params"
    )


# --------------------------------------------------------------------------- groups


@dataclass
class Group:
    """One actor group's estimate per GPU, in bytes."""

    name: str
    gpus: float  # in all
    parts: dict[str, float] = field(default_factory=dict)
    fixes: list[str] = field(default_factory=list)  # what would shrink it, most useful first

    @property
    def per_gpu(self) -> float:
        return sum(self.parts.values())


def trained(
    name: str, size: ModelSize, workers: int, ds, micro_batch: int, length: int,
    trainable_layers: int | None = None, checkpointing: bool = False, lm_head: bool = True,
    lora: bool = False,
) -> Group:  # fmt: skip
    """A DeepSpeed-trained model: weights, gradients, optimizer states, activations."""
    zero = ds.zero_stage
    layers = size.layers if trainable_layers is None else min(trainable_layers, size.layers)
    trainable = size.params if trainable_layers is None else layers * size.layer_params
    if lora:  # adapters of rank 16 on the attention and MLP projections: ~0.5% of the model
        trainable = 0.005 * size.params
    if trainable_layers is not None and lm_head:
        trainable += size.vocab * size.hidden
    tokens = micro_batch * length
    full_layer = 34 * tokens * size.hidden
    acts = (
        (2 * tokens * size.hidden * layers + full_layer) if checkpointing else full_layer * layers
    )
    weights = 0.0 if (zero == 3 and ds.offload_params) else 2 * size.params
    parts = {
        "weights": weights / (workers if zero == 3 else 1),
        "gradients": 2 * trainable / (workers if zero >= 2 else 1),
        "optimizer": 0.0 if ds.offload_optimizer else 12 * trainable / (workers if zero else 1),
        "activations": acts + (8 * tokens * size.vocab if lm_head else 0),
        "cuda context": CONTEXT,
    }
    fixes = []
    if zero < 3:
        fixes.append(f"deepspeed.zero_stage: 3 (weights divided over the {workers} workers)")
    if not ds.offload_optimizer:
        fixes.append("deepspeed.offload_optimizer: true (optimizer states in CPU memory)")
    if not checkpointing:
        fixes.append("gradient_checkpointing: true")
    fixes.append(f"a smaller micro_batch_size (now {micro_batch})")
    return Group(name, workers, parts, fixes)


def frozen(name: str, size: ModelSize, workers: int, micro_batch: int, length: int,
           lm_head: bool = True) -> Group:  # fmt: skip
    """A frozen model that only runs forward: weights and one layer's activations."""
    tokens = micro_batch * length
    parts = {
        "weights": 2 * size.params,
        "activations": 20 * tokens * size.hidden + (4 * tokens * size.vocab if lm_head else 0),
        "cuda context": CONTEXT,
    }
    return Group(name, workers, parts, ["a smaller micro_batch_size", "GPUs with more memory"])


def vllm(name: str, size: ModelSize, engines: int, tp: int, utilisation: float,
         gpu_memory: float) -> Group:  # fmt: skip
    """vLLM engines: each GPU gives ``gpu_memory_utilization`` of itself to the engine."""
    group = Group(name, engines * tp, {"vLLM share": utilisation * gpu_memory})  # its context too
    weights = 2 * size.params / tp
    if weights + 1 * GB > utilisation * gpu_memory:  # weights plus a minimal KV cache
        group.fixes.append(
            f"vLLM's share ({utilisation * gpu_memory / GB:.0f} GB) cannot hold the weights "
            f"({weights / GB:.1f} GB per GPU) and a KV cache: raise tensor_parallel_size "
            "(GPUs per engine) or gpu_memory_utilization"
        )
    return group


# --------------------------------------------------------------------------- stages


def _engine_groups(name: str, model: ModelConfig, engine, engines: int, gpus: float,
                   gpu_memory: float, params: float | None) -> list[Group]:  # fmt: skip
    if not gpus:
        return []
    size = model_size(model, params)
    if engine.backend == "hf":
        return [frozen(name, size, engines, 1, engine.max_model_len or 2048)]
    tp = max(engine.tensor_parallel_size, int(gpus))
    return [vllm(name, size, engines, tp, engine.gpu_memory_utilization, gpu_memory)]


def _ppo_groups(c, gpu_memory: float, params: float | None) -> tuple[list[Group], list[list[str]]]:
    policy_size = model_size(c.model, params)
    reward_size = model_size(c.reward.model, params)
    critic_size = model_size(c.critic.model, params) if c.critic.model.path else reward_size
    length = c.max_prompt_tokens + c.sampling.max_new_tokens
    # The reference is the policy's frozen trunk when only its top trains under ZeRO <= 2.
    trunk = (
        c.reference.mode != "separate"
        and c.policy.trainable_layers is not None
        and c.policy.deepspeed.zero_stage <= 2
    )
    groups = []
    if c.policy.resources.num_gpus:
        policy = trained(
            "policy", policy_size, c.policy.resources.workers, c.policy.deepspeed,
            c.micro_batch_size, length, c.policy.trainable_layers, c.policy.gradient_checkpointing,
        )  # fmt: skip
        if trunk:  # the reference's frozen copy of the trained top
            top = c.policy.trainable_layers * policy_size.layer_params
            policy.parts["reference top"] = 2 * (top + policy_size.vocab * policy_size.hidden)
        groups.append(policy)
    if c.critic.resources.num_gpus:
        groups.append(trained(
            "critic", critic_size, c.critic.resources.workers, c.critic.deepspeed,
            c.micro_batch_size, length, c.critic.trainable_layers,
            c.critic.gradient_checkpointing, lm_head=False,
        ))  # fmt: skip
    if c.reward.resources.num_gpus:
        groups.append(
            frozen("reward", reward_size, c.reward.resources.workers, c.micro_batch_size,
                   length, lm_head=False)
        )  # fmt: skip
    if not trunk and c.reference.resources.num_gpus:
        groups.append(
            frozen("reference", policy_size, c.reference.resources.workers, c.micro_batch_size,
                   length)
        )  # fmt: skip
    r = c.rollout
    groups += _engine_groups(
        "rollout", c.model, r.engine, r.resources.workers, r.resources.num_gpus, gpu_memory, params
    )
    return groups, [list(names) for names in c.colocate]


def stage_groups(
    stage: str, c, gpu_memory: float, params: float | None = None
) -> tuple[list[Group], list[list[str]]]:
    """The GPU actor groups of a stage's config, and which of them share GPUs (``params``: the
    size of models the preset gives none for)."""
    if stage in ("sft", "reward-model"):
        if not c.scaling.use_gpu:
            return [], []
        pairs = 2 if stage == "reward-model" else 1  # chosen and rejected in one micro-batch
        lora = getattr(getattr(c, "lora", None), "enabled", False)
        return [trained(
            f"{stage} workers", model_size(c.model, params), c.scaling.num_workers, c.deepspeed,
            pairs * c.micro_batch_size, c.max_length, checkpointing=c.gradient_checkpointing,
            lm_head=stage == "sft", lora=lora,
        )], []  # fmt: skip
    if stage == "ppo":
        return _ppo_groups(c, gpu_memory, params)
    if stage in ("sample", "benchmark"):
        return _engine_groups(
            "engines", c.model, c.engine, c.engines, c.gpus_per_engine, gpu_memory, params
        ), []
    if stage == "judge":
        groups = []
        for side in (c.a, c.b):
            if side.model:
                model = ModelConfig(path=side.model)
                groups += _engine_groups(
                    f"engines ({side.name})", model, c.engine, c.engines, c.gpus_per_engine,
                    gpu_memory, params,
                )  # fmt: skip
        return groups, []
    if stage == "serve":
        return _engine_groups(
            "replicas", c.model, c.engine, c.replicas, c.num_gpus, gpu_memory, params
        ), []
    return [], []


# --------------------------------------------------------------------------- the stage


@dataclass
class PlanConfig:
    """Estimate each actor group's GPU memory and refuse a placement that cannot fit."""

    preset: str = option(help="the preset to size (given as --config on the command line)")
    stage: str = option("", help="the preset's stage (default: its file name up to a dot)")
    overrides: list[str] = option([], help="key=value overrides of the preset")
    gpu_memory: float = option(80.0, help="GB of memory per GPU (A100: 40 or 80, H100: 80)")
    params: float | None = option(
        None, help="parameter count of models the preset gives no size for (no model.params)"
    )

    def __post_init__(self) -> None:
        if self.gpu_memory <= 0:
            raise ValueError("gpu_memory must be positive")


def _line(name: str, gpus: float, total: float, parts: dict[str, float]) -> str:
    detail = ", ".join(f"{k} {v / GB:.1f}" for k, v in parts.items() if v)
    return f"  {name:<22} {gpus:>4g} GPU  {total / GB:6.1f} GB per GPU  ({detail})"


def main(config: PlanConfig) -> dict:
    from huatuo_ray.stages import STAGES

    stage = config.stage or os.path.basename(config.preset).split(".")[0]
    if stage not in STAGES:
        raise SystemExit(f"plan: no stage {stage!r} (name it with stage=...)")
    values = load_config(STAGES[stage].load()[0], config.preset, config.overrides)
    try:
        groups, colocate = stage_groups(stage, values, config.gpu_memory * GB, config.params)
    except ValueError as e:
        raise SystemExit(f"plan: {e}") from None
    by_name = {g.name: g for g in groups}
    budget = config.gpu_memory * GB
    print(f"plan {config.preset} ({stage}) on GPUs of {config.gpu_memory:g} GB:")
    if not groups:
        print("  no GPU actor groups: nothing to place")
        return {"stage": stage, "groups": {}, "gpus": 0}
    shared = {n for names in colocate for n in names}
    units = [[g.name] for g in groups if g.name not in shared]
    units += [[n for n in names if n in by_name] for names in colocate]
    refused, report, gpus = [], {}, 0.0
    for names in (u for u in units if u):
        members = [by_name[n] for n in names]
        label = "+".join(names)
        parts: dict[str, float] = {}
        for g in members:
            for k, v in g.parts.items():
                parts[f"{g.name} {k}" if len(members) > 1 else k] = v
        total = sum(g.per_gpu for g in members)
        gpus += max(g.gpus for g in members)
        print(_line(label, max(g.gpus for g in members), total, parts))
        report[label] = round(total / GB, 1)
        vllm_problem = [f for g in members for f in g.fixes if f.startswith("vLLM's share")]
        if total > budget or vllm_problem:
            fixes = vllm_problem or [f for g in members for f in g.fixes]
            if len(members) > 1:
                fixes = [f"give {' and '.join(names)} their own GPUs (drop them from colocate)"]
                fixes += [f for g in members for f in g.fixes if "micro_batch" not in f][:2]
            fixes.append("GPUs with more memory (--gpu-memory)")
            refused.append(
                f"{label}: needs {total / GB:.1f} GB per GPU, the GPU has {config.gpu_memory:g} "
                f"GB; fix: " + "; or ".join(dict.fromkeys(fixes))
            )
    print(f"  GPUs in all: {gpus:g}")
    if refused:
        raise SystemExit("plan: does not fit:\n  " + "\n  ".join(refused))
    print("  fits")
    return {"stage": stage, "groups": report, "gpus": gpus}
