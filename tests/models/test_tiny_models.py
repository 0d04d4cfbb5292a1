"""The tiny model factory: folders load with Auto classes; the tokenizer agrees with chat.py."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from huatuo_ray import dialogue as chat  # noqa: E402
from huatuo_ray.dialogue import (  # noqa: E402
    ASSISTANT_TAG,
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM,
    IGNORE_INDEX,
    USER_TAG,
    RecordError,
    turn,
)
from huatuo_ray.models.tiny import (  # noqa: E402
    TinyConfig,
    build_tiny_causal_lm,
    build_tiny_reward_model,
    demo_corpus,
)

Q1 = "医生您好，我发烧三十八度五，还咳嗽，怎么办？"
A1 = "您好！建议多喝温水、注意休息；如果超过三天不退，请及时就医。"
Q2 = "孩子也有点咳嗽，可以吃止咳药吗？"
A2 = "四岁以下的孩子不建议自行使用止咳药，请在儿科医生指导下用药。"
SENTENCES = [
    Q1,
    A1,
    "血压：一百四十五／九十五（mmHg），心率 72 次／分……“正常”吗？",
    f"{DEFAULT_SYSTEM}{USER_TAG}{Q2} {ASSISTANT_TAG}{A2}",
    "  两个空格开头，\t制表符，English words and 123 数字。 ",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    policy = build_tiny_causal_lm(str(root / "policy"))
    reward = build_tiny_reward_model(str(root / "reward"), tokenizer_dir=policy)
    return {"policy": policy, "reward": reward}


@pytest.fixture(scope="module")
def tok(built: dict[str, str]):
    return transformers.AutoTokenizer.from_pretrained(built["policy"])


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_config_keeps_head_dim_for_vllm() -> None:
    assert TinyConfig().head_dim >= 32
    with pytest.raises(ValueError, match="head_dim"):
        TinyConfig(hidden_size=64, num_heads=4)


def test_corpus_is_bundled() -> None:
    lines = demo_corpus()
    assert len(lines) > 200
    text = "\n".join(lines)
    assert DEFAULT_SYSTEM in text and USER_TAG in text and ASSISTANT_TAG in text


def test_folders_load_with_auto_classes(built: dict[str, str]) -> None:
    lm = transformers.AutoModelForCausalLM.from_pretrained(built["policy"])
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert lm.config.hidden_size // lm.config.num_attention_heads >= 32
    assert lm.dtype == torch.float32
    assert os.path.exists(os.path.join(built["policy"], "model.safetensors"))
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(built["reward"])
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    rtok = transformers.AutoTokenizer.from_pretrained(built["reward"])
    ptok = transformers.AutoTokenizer.from_pretrained(built["policy"])
    assert rtok.get_vocab() == ptok.get_vocab()
    assert lm.config.pad_token_id == ptok.pad_token_id == lm.generation_config.pad_token_id
    assert lm.generation_config.eos_token_id == ptok.eos_token_id
    batch = rtok([Q1, A1], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert rm(**batch).logits.shape == (2, 1)
    for name, task in (("policy", "causal_lm"), ("reward", "reward")):
        with open(os.path.join(built[name], "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        assert manifest["kind"] == "model" and manifest["schema_version"] == 1
        assert manifest["factory"] == "tiny" and manifest["task"] == task
        assert manifest["config"]["hidden_size"] == 64 and manifest["param_count"] > 0


def test_tokenizer_round_trips_chinese(tok) -> None:
    assert tok.chat_template == CHAT_TEMPLATE
    assert len(tok) <= TinyConfig().vocab_size
    for text in SENTENCES:
        ids = _enc(tok, text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_exactly_one_bos_after_reload(tok) -> None:
    bos = tok.bos_token_id
    assert bos not in _enc(tok, Q1)
    assert tok(Q1)["input_ids"][0] == bos  # asked for special tokens, like Llama
    assert chat._bos(tok) == [bos]  # though transformers 5 reloads add_bos_token as False
    turns = [turn("user", Q1), turn("assistant", A1)]
    for ids in (
        chat.encode_prompt(tok, turns[:1]),
        chat.tokenize_dialogue(tok, turns, 512).input_ids,
    ):
        assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("system", [None, "你是一名耐心的全科医生。"])
def test_chat_template_matches_render(tok, system: str | None) -> None:
    turns = [turn("user", Q1), turn("assistant", A1), turn("user", Q2)]
    if system is not None:
        turns = [turn("system", system), *turns]
    for gen_prompt in (True, False):
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen_prompt)
        assert text == chat.render(turns, tok.eos_token, gen_prompt, tok.bos_token)
    # The role tags are tokens, so segment-wise and whole-text tokenisation agree, and the
    # templated text tokenised without special tokens (as vLLM's chat endpoint does) has one BOS.
    text = chat.render(turns, tok.eos_token, True, tok.bos_token)
    assert _enc(tok, text) == chat.encode_prompt(tok, turns)


def test_generate_with_chat_template(built: dict[str, str], tok) -> None:
    lm = transformers.AutoModelForCausalLM.from_pretrained(built["policy"])
    prompt = chat.encode_prompt(tok, [turn("user", Q1)])
    ids = torch.tensor([prompt])
    out = lm.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
    )
    assert out.shape[1] == len(prompt) + 8
    assert out[0, : len(prompt)].tolist() == prompt


def test_labels_supervise_only_answers_and_eos(tok) -> None:
    turns = [turn("user", Q1), turn("assistant", A1), turn("user", Q2), turn("assistant", A2)]
    got = chat.tokenize_dialogue(tok, turns, max_length=1024)
    eos = tok.eos_token_id
    pieces = [
        ([tok.bos_token_id], False),
        (_enc(tok, DEFAULT_SYSTEM), False),
        (_enc(tok, f"{USER_TAG}{Q1} "), False),
        (_enc(tok, ASSISTANT_TAG), False),
        (_enc(tok, A1) + [eos], True),
        (_enc(tok, f"{USER_TAG}{Q2} "), False),
        (_enc(tok, ASSISTANT_TAG), False),
        (_enc(tok, A2) + [eos], True),
    ]
    want_ids, want_sup = [], []
    for ids, supervised in pieces:
        want_sup += [supervised] * len(ids)
        want_ids += ids
    assert got.input_ids == want_ids and not got.truncated
    assert [label != IGNORE_INDEX for label in got.labels] == want_sup
    sup = [i for i, label in enumerate(got.labels) if label != IGNORE_INDEX]
    assert [got.input_ids[i] for i in sup] == [got.labels[i] for i in sup]
    assert tok.decode([got.input_ids[i] for i in sup]) == A1 + tok.eos_token + A2 + tok.eos_token


@pytest.mark.parametrize("system", [None, "你是一名耐心的全科医生。"])
def test_encode_prompt_is_the_training_prefix(tok, system: str | None) -> None:
    head = [] if system is None else [turn("system", system)]
    contexts = ([turn("user", Q1)], [turn("user", Q1), turn("assistant", A1), turn("user", Q2)])
    for context in contexts:
        turns = head + context
        prompt = chat.encode_prompt(tok, turns)
        full = chat.tokenize_dialogue(tok, turns + [turn("assistant", A2)], max_length=1024)
        # start of the last supervised run = first token of the final answer
        start = max(
            i
            for i, label in enumerate(full.labels)
            if label != IGNORE_INDEX and (i == 0 or full.labels[i - 1] == IGNORE_INDEX)
        )
        assert prompt == full.input_ids[:start]


def test_too_short_max_length_raises(tok) -> None:
    turns = [turn("user", Q1), turn("assistant", A1)]
    prefix = len(chat.encode_prompt(tok, turns[:1]))
    with pytest.raises(RecordError):
        chat.tokenize_dialogue(tok, turns, max_length=prefix)
    cut = chat.tokenize_dialogue(tok, turns, max_length=prefix + 1)
    assert cut.truncated and cut.n_supervised == 1 and len(cut.input_ids) == prefix + 1
