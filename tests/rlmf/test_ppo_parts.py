"""PPO's parts without Ray: the Experience layout, freezing, the frozen-trunk reference against a
real second model, values and scores read from the right tokens, the hand-built reward model."""

from __future__ import annotations

import copy

import pytest
import torch

from huatuo_ray.rlmf.experience import concat, make_experience, per_length_group
from huatuo_ray.rlmf.model_ops import (
    FrozenTrunkReference,
    ValueModel,
    forward_logits,
    last_token_scores,
    response_values,
    token_logprobs,
)
from huatuo_ray.train.core import freeze_bottom

PAD = 2


def test_experience_layout_left_pads_prompts_and_right_pads_responses() -> None:
    exp = make_experience(
        [[5, 6, 7], [8]],
        [[9, 1], [10, 11, 12]],
        [True, False],
        PAD,
        [[-1.0, -2.0], [-3.0, -4.0, -5.0]],
    )
    assert exp.prompt_width == 3
    assert exp.sequences.tolist() == [[5, 6, 7, 9, 1, PAD], [PAD, PAD, 8, 10, 11, 12]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert exp.action_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert exp.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert exp.responses.tolist() == [[9, 1, PAD], [10, 11, 12]]
    assert exp.rollout_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert exp.finished.tolist() == [True, False]


def test_concat_repads_chunks_and_shards_split_rows() -> None:
    a = make_experience([[5, 6]], [[9]], [True], PAD)
    b = make_experience([[7]], [[10, 11, 12]], [False], PAD)
    a.values, b.values = torch.tensor([[0.5]]), torch.tensor([[1.0, 2.0, 3.0]])
    a.scores, b.scores = torch.tensor([1.0]), torch.tensor([2.0])
    both = concat([a, b], PAD)
    assert both.prompt_width == 2
    assert both.sequences.tolist() == [[5, 6, 9, PAD, PAD], [PAD, 7, 10, 11, 12]]
    assert both.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert both.values.tolist() == [[0.5, 0.0, 0.0], [1.0, 2.0, 3.0]]
    assert both.scores.tolist() == [1.0, 2.0]
    assert both.logprobs is None
    halves = both.shards(2)
    assert [h.sequences.tolist() for h in halves] == [
        [both.sequences[0].tolist()],
        [both.sequences[1].tolist()],
    ]
    parts = both.minibatches(1, torch.Generator().manual_seed(0))
    assert sorted(p.scores.item() for p in parts) == [1.0, 2.0]


def test_length_groups_put_similar_rows_together_and_trim_their_padding() -> None:
    # Prompt lengths 1, 4, 2, 3 (width 4); responses 3, 1, 2, 1 (width 3).
    exp = make_experience(
        [[5], [5, 6, 7, 8], [5, 6], [5, 6, 7]],
        [[9, 10, 11], [9], [9, 10], [9]],
        [True, True, False, True],
        PAD,
        [[-1.0, -2.0, -3.0], [-4.0], [-5.0, -6.0], [-7.0]],
    )
    exp.scores = torch.tensor([0.0, 1.0, 2.0, 3.0])
    groups = exp.length_groups(2)
    # Real tokens 4, 5, 4, 4: rows 0, 2 | 3, 1 (stable order among equals).
    assert [index.tolist() for index, _ in groups] == [[0, 2], [3, 1]]
    short, long = (part for _, part in groups)
    # Rows 0 and 2: prompts of 1 and 2 tokens (two left columns dropped), responses 3 and 2.
    assert short.prompt_width == 2
    assert short.sequences.tolist() == [[PAD, 5, 9, 10, 11], [5, 6, 9, 10, PAD]]
    assert short.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert short.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]
    assert short.action_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert short.rollout_logprobs.tolist() == [[-1.0, -2.0, -3.0], [-5.0, -6.0, 0.0]]
    assert short.scores.tolist() == [0.0, 2.0] and short.finished.tolist() == [True, False]
    # Rows 3 and 1: prompts of 3 and 4 tokens, one response token each: two right columns go.
    assert long.prompt_width == 4 and long.action_mask.tolist() == [[1], [1]]
    assert long.sequences.tolist() == [[PAD, 5, 6, 7, 9], [5, 6, 7, 8, 9]]
    # 20 of the 28 cells of the whole batch are computed: 10 + 10.
    assert sum(p.sequences.numel() for _, p in groups) == 20 < exp.sequences.numel() == 28


def test_a_forward_by_length_groups_equals_the_whole_batchs(policy) -> None:
    prompts = [[5 + (7 * i + j) % 200 for j in range(2 + 5 * i)] for i in range(5)]
    responses = [[9 + (3 * i + j) % 100 for j in range(1 + 4 * (4 - i))] for i in range(5)]
    exp = make_experience(prompts, responses, [True] * 5, PAD)

    def forward(part):
        with torch.no_grad():
            return token_logprobs(forward_logits(policy, part), part.responses, 1.0)

    whole = forward(exp) * exp.action_mask
    grouped = per_length_group(exp, 2, forward)
    assert grouped.shape == whole.shape
    assert torch.allclose(grouped, whole, atol=1e-5)
    both = per_length_group(exp, 2, lambda part: (forward(part), None))
    assert torch.equal(both[0], grouped) and both[1] is None


@pytest.fixture(scope="module")
def policy(tiny_model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_freeze_bottom_trains_top_layers_and_named_modules(policy) -> None:
    model = copy.deepcopy(policy)
    names = freeze_bottom(model, 1, ["model.norm", "lm_head"])
    assert names and all(n.startswith(("model.layers.1.", "model.norm", "lm_head")) for n in names)
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert freeze_bottom(model, None, []) == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="no module"):
        freeze_bottom(model, 1, ["model.nope"])
    with pytest.raises(ValueError, match="layers"):
        freeze_bottom(model, 3, [])


@pytest.mark.parametrize("top", [1, 2])
def test_frozen_trunk_reference_equals_a_separate_reference_model(policy, top: int) -> None:
    """Train the top layers away from pi_0, then compare the hydra's reference log-probs with the
    untouched model's: the trunk is shared, the copy holds pi_0's top."""
    reference_model = copy.deepcopy(policy).eval()
    model = copy.deepcopy(policy)
    freeze_bottom(model, top, ["model.norm", "lm_head"])
    hydra = FrozenTrunkReference(model, top)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    exp = make_experience(
        [[0, 50, 60, 70], [0, 80]], [[11, 12, 13, 1], [14, 15]], [True, False], PAD
    )
    with torch.no_grad(), hydra.capture():
        policy_logits = forward_logits(model, exp)
    width = exp.action_mask.shape[1]
    ref_logits = hydra.logits(keep=width + 1)[:, :-1]
    with torch.no_grad():
        expected = forward_logits(reference_model, exp)
    mask = exp.action_mask.bool()
    got = token_logprobs(ref_logits, exp.responses, 1.0)[mask]
    want = token_logprobs(expected, exp.responses, 1.0)[mask]
    assert torch.allclose(got, want, atol=1e-5)
    moved = token_logprobs(policy_logits, exp.responses, 1.0)[mask]
    assert (moved - want).abs().max() > 1e-3  # the policy itself did move


def test_frozen_trunk_refuses_trainable_weights_below_the_branch(policy) -> None:
    model = copy.deepcopy(policy)
    freeze_bottom(model, 1, ["model.embed_tokens"])
    with pytest.raises(ValueError, match="separate"):
        FrozenTrunkReference(model, 1)
    # A head tied to the input embeddings would train the trunk through the head.
    tied = copy.deepcopy(policy)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    freeze_bottom(tied, 1, ["model.norm", "lm_head"])
    with pytest.raises(ValueError, match="separate"):
        FrozenTrunkReference(tied, 1)
    with pytest.raises(ValueError, match=">= 1"):
        FrozenTrunkReference(copy.deepcopy(policy), 0)


def test_values_and_scores_are_read_at_the_right_tokens(tiny_model_dir: str, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from huatuo_ray.models.tiny import build_tiny_reward_model

    path = build_tiny_reward_model(str(tmp_path / "rm"), tokenizer_dir=tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    values_model = ValueModel(model)
    exp = make_experience([[0, 50, 60], [0, 80]], [[11, 12, 1], [14]], [True, False], PAD)
    with torch.no_grad():
        values = values_model(exp.sequences, exp.attention_mask, exp.position_ids)
        scores = last_token_scores(values, exp)
        # The classifier's own pooled score of each row alone, without padding.
        alone = [model(torch.tensor([[0, 50, 60, 11, 12, 1]])).logits.item(),
                 model(torch.tensor([[0, 80, 14]])).logits.item()]  # fmt: skip
    assert scores.tolist() == pytest.approx(alone, abs=1e-5)
    per_token = response_values(values, exp)
    assert per_token.shape == exp.action_mask.shape
    # V(s_0) of row 0 is read at its last prompt token (column 2).
    assert per_token[0, 0].item() == pytest.approx(values[0, 2].item())


def test_target_token_reward_model_prefers_the_target(tiny_model_dir: str, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tests.support.target_reward import build_target_token_reward_model

    path = build_target_token_reward_model(str(tmp_path / "target"), tiny_model_dir, 100)
    model = ValueModel(AutoModelForSequenceClassification.from_pretrained(path)).eval()
    responses = [[100, 100, 100, 1], [100, 6, 7, 1], [5, 6, 7, 1]]
    exp = make_experience([[0, 50, 60]] * 3, responses, [True] * 3, PAD)
    with torch.no_grad():
        scores = last_token_scores(model(exp.sequences, exp.attention_mask, exp.position_ids), exp)
    assert scores[0] > scores[1] > scores[2]


def _ppo_config(**overrides):
    from huatuo_ray.rlmf.ppo_config import PPOConfig

    return PPOConfig(inputs=["x"], output="y", **overrides)


def test_rewards_and_advantages_by_hand() -> None:
    from huatuo_ray.rlmf.ppo import add_rewards_and_advantages, final_scores
    from huatuo_ray.rlmf.ppo_config import RewardConfig

    config = _ppo_config(reward=RewardConfig(unfinished_score=-1.0), gamma=1.0, lam=0.5,
                         whiten_advantages=False)  # fmt: skip
    exp = make_experience([[5], [5]], [[7, 8], [7, 1]], [False, True], PAD)
    exp.logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    exp.ref_logprobs = torch.tensor([[-1.5, -2.0], [-1.0, -1.5]])
    exp.values = torch.tensor([[0.5, 0.25], [0.0, 0.0]])
    exp.scores = torch.tensor([2.0, 3.0])
    add_rewards_and_advantages(final_scores(exp, config), 0.1, config)
    # Row 0 was cut at the length limit: its score 2.0 becomes the penalty -1.0.
    assert exp.scores.tolist() == [-1.0, 3.0]
    assert exp.kl.tolist() == [[0.5, 0.0], [0.0, 0.5]]
    assert torch.allclose(exp.rewards, torch.tensor([[-0.05, -1.0], [0.0, 2.95]]))
    # Row 0: delta_1 = -1 - 0.25 = -1.25; delta_0 = -0.05 + 0.25 - 0.5 = -0.3;
    # A_0 = -0.3 + 0.5 * -1.25 = -0.925; returns = A + V.
    assert torch.allclose(exp.advantages[0], torch.tensor([-0.925, -1.25]))
    assert torch.allclose(exp.returns[0], torch.tensor([-0.425, -1.0]))
    assert torch.allclose(exp.advantages[1], torch.tensor([1.475, 2.95]))


def test_ppo_config_checks_batch_terms_and_resolves_the_reference() -> None:
    from huatuo_ray.rlmf.ppo_config import (
        CheckpointEvery,
        PolicyConfig,
        ReferenceConfig,
        resolve_reference,
    )
    from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig

    # The paper's top-2-layers setting shares the trunk, unless the head is tied to it.
    assert resolve_reference(_ppo_config(), tied_embeddings=False) == "frozen_trunk"
    assert resolve_reference(_ppo_config(), tied_embeddings=True) == "separate"
    full = _ppo_config(policy=PolicyConfig(trainable_layers=None))
    assert resolve_reference(full, False) == "separate"
    zero3 = _ppo_config(policy=PolicyConfig(deepspeed=DeepSpeedConfig(zero_stage=3)))
    assert resolve_reference(zero3, False) == "separate"
    with pytest.raises(ValueError, match="ZeRO"):
        _ppo_config(policy=PolicyConfig(deepspeed=DeepSpeedConfig(zero_stage=3)),
                    reference=ReferenceConfig(mode="frozen_trunk"))  # fmt: skip
    with pytest.raises(ValueError, match="ties its head"):
        resolve_reference(_ppo_config(reference=ReferenceConfig(mode="frozen_trunk")), True)
    with pytest.raises(ValueError, match="each in one list"):
        _ppo_config(colocate=[["critic", "reward"], ["reward", "policy"]])
    with pytest.raises(ValueError, match="keep"):
        _ppo_config(checkpoint=CheckpointEvery(every_iterations=1, keep=0))
    with pytest.raises(ValueError, match="minibatch_size"):
        _ppo_config(rollout_size=60)
    with pytest.raises(ValueError, match="micro_batch_size"):
        _ppo_config(micro_batch_size=3)
    with pytest.raises(ValueError, match="colocate"):
        _ppo_config(colocate=[["policy", "teacher"]])


def test_weight_sync_follows_the_placement_and_refuses_nccl_on_one_gpu() -> None:
    """Engines on the policy's GPUs take handles (ipc); elsewhere a broadcast group. NCCL
    between groups that share a GPU, or handles to engines on other GPUs, are refused at load
    with the fix, before any actor starts."""
    from huatuo_ray.rlmf.actors.group import Resources
    from huatuo_ray.rlmf.ppo_config import PolicyConfig, RolloutConfig
    from huatuo_ray.rlmf.weight_sync import resolve_method

    gpu = Resources(workers=1, num_gpus=1)
    on_gpus = dict(policy=PolicyConfig(resources=gpu), rollout=RolloutConfig(resources=gpu))
    hybrid = [["policy", "rollout"]]
    assert resolve_method("auto", hybrid, on_gpu=True) == "ipc"
    assert resolve_method("auto", hybrid, on_gpu=False) == "ipc"  # CPUs: via the object store
    assert resolve_method("auto", [["critic", "reward"]], on_gpu=True) == "broadcast"
    assert resolve_method("broadcast", hybrid, on_gpu=False) == "broadcast"  # gloo shares CPUs
    _ppo_config(colocate=hybrid, **on_gpus)  # auto: accepted
    with pytest.raises(
        ValueError, match=r"NCCL cannot join two ranks on one GPU; use weight_sync: ipc"
    ):
        _ppo_config(colocate=hybrid, weight_sync="broadcast", **on_gpus)
    with pytest.raises(ValueError, match="put rollout and policy in one colocate list"):
        _ppo_config(weight_sync="ipc", **on_gpus)


def test_groups_in_one_process_sync_in_memory_and_refuse_what_cannot_share_one() -> None:
    """``colocate_in_process``: an engine in the policy's process takes its weights by a copy in
    memory (auto -> in_process), never by a broadcast to itself; policy and critic (a
    torch.distributed world each) or a vLLM engine cannot share a process: refused at load."""
    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
    from huatuo_ray.rlmf.ppo_config import AlgorithmConfig, RewardConfig, RolloutConfig
    from huatuo_ray.rlmf.weight_sync import resolve_method

    fused = [["policy", "reference", "rollout"]]
    assert resolve_method("auto", fused, on_gpu=False, in_process=True) == "in_process"
    assert resolve_method("auto", fused, on_gpu=True, in_process=True) == "in_process"
    assert resolve_method("auto", fused, on_gpu=True, in_process=False) == "ipc"
    # Groups sharing a process without the engine: the engine's sync is unchanged.
    assert resolve_method("auto", [["critic", "reward"]], False, in_process=True) == "broadcast"
    assert resolve_method("object_store", fused, False, in_process=True) == "object_store"
    hf = RolloutConfig(engine=EngineConfig(backend="hf"), chunk_size=8)
    config = _ppo_config(colocate=fused, colocate_in_process=True, rollout=hf)
    assert config.colocate_in_process
    for method in ("broadcast", "ipc"):
        with pytest.raises(ValueError, match=f"{method}: .*neither broadcast to itself"):
            _ppo_config(colocate=fused, colocate_in_process=True, rollout=hf, weight_sync=method)
    with pytest.raises(ValueError, match="in_process copies .* colocate_in_process: true"):
        _ppo_config(colocate=fused, rollout=hf, weight_sync="in_process")
    with pytest.raises(ValueError, match="policy and critic cannot share a process"):
        _ppo_config(colocate=[["policy", "critic"]], colocate_in_process=True)
    for backend in ("vllm", "auto"):
        engine = RolloutConfig(engine=EngineConfig(backend=backend), chunk_size=8)
        with pytest.raises(ValueError, match="the engine in a shared process is the HF one"):
            _ppo_config(colocate=fused, colocate_in_process=True, rollout=engine)
    grpo = dict(algorithm=AlgorithmConfig(advantage="grpo"), sampling=SamplingConfig(n=4))
    with pytest.raises(ValueError, match="the teacher reward is an async actor of its own"):
        _ppo_config(colocate=[["policy", "reward", "rollout"]], colocate_in_process=True,
                    rollout=hf, reward=RewardConfig(kind="teacher"), **grpo)  # fmt: skip
    # A critic that a critic-free run does not create shares nothing: accepted.
    _ppo_config(colocate=[["policy", "critic", "rollout"]], colocate_in_process=True, rollout=hf,
                **grpo)  # fmt: skip


def test_a_section_given_in_part_keeps_the_stage_defaults(tmp_path) -> None:
    from huatuo_ray.config import load_config
    from huatuo_ray.rlmf.ppo_config import PPOConfig

    path = tmp_path / "ppo.yaml"
    path.write_text("inputs: [a]\noutput: b\npolicy:\n  optim: {lr: 1.0e-3}\n")
    config = load_config(PPOConfig, str(path), ["critic.optim.weight_decay=0.1"])
    assert config.policy.optim.lr == 1e-3
    # PPO's constant schedule stays (OptimConfig's own defaults would warm up and decay).
    assert (config.policy.optim.warmup_ratio, config.policy.optim.min_lr_ratio) == (0.0, 1.0)
    assert (config.critic.optim.lr, config.critic.optim.weight_decay) == (5e-6, 0.1)
