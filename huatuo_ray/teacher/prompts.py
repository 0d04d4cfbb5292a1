"""The paper's teacher prompts, as :class:`string.Template` texts and builders of chat messages.

Sources (Zhang et al., "HuatuoGPT, Towards Taming Language Models To Be a Doctor", appendix; the
``$name`` placeholders keep the paper's names):

* A.1 :data:`SELF_INSTRUCT`: design 20 <role, instruction, input> triplets (the paper's Chinese).
  ``$format_and_examples`` is this project's addition: the answer format that
  :func:`~huatuo_ray.teacher.parsers.parse_triplets` reads and, self-instruct style, a few seed
  triplets. ``$n`` is the paper's 20.
* A.1 :data:`ROLE_ANSWER`: the role-enhanced answer prompt; ``$medical_role`` and ``$Question`` are
  the paper's ``[Medical Role]`` and ``{Question}``.
* A.2 :data:`PATIENT` (``$medical_case``) and :data:`DOCTOR` (``$doctor_diagnosis``): system prompts
  of the two agents of a distilled conversation. The Chinese of the doctor prompt was damaged in the
  paper's PDF; it is rebuilt here from the paper's English translation.
* A.3 :data:`POLISH_ANSWER` (``$Patient_Question``, ``$Doctor_Response``).
* A.4 :data:`POLISH_DIALOGUE` (``$dialogue``). This project adds the strict dialogue format (numbered
  "病人："/"医生：" utterances, see :func:`render_polish_dialogue`) and asks for the same number and
  order of utterances, which :func:`~huatuo_ray.teacher.parsers.parse_polished_dialogue` checks.
* B :data:`RATING`: mixed-feedback rating of two responses against the doctor's answer.
* D :data:`JUDGE`: pairwise judging of two multi-turn conversations. Conversations are rendered with
  the speaker labels of HuatuoGPT-II's ``evaluation/eval_huatuo_conv.py`` ("User:", "AI assistant:").
* :data:`EVAL_PATIENT`: HuatuoGPT-II's simulated patient for the evaluation consultations (its
  ``huatuo100_conv`` data), which never ends the conversation; :data:`DOCTOR_GREETING` is that
  data's first doctor message.
"""

from __future__ import annotations

from collections.abc import Sequence
from string import Template

from huatuo_ray.dialogue import turn
from huatuo_ray.teacher.parsers import SPEAKERS, VERDICT_CHOICES, Triplet

Message = dict[str, str]

# --- A.1 distilled instructions ----------------------------------------------------------------

SELF_INSTRUCT = Template(
    "你被要求设计${n}个不同的<角色，指令，输入>三元组，第一行是角色，第二行是该角色希望GPT帮助他"
    "提升生活工作效率的指令，第三行是该指令对应的输入。要求：\n"
    "1. 角色可以很具体，需要跟医疗场景有关，如果是医生的话，甚至可以细化到医疗科室，"
    "例如“呼吸内科医生”。\n"
    "2. 每个指令的描述应该是多样化的，指令的类型应该是多样化，动词尽量不要重复，以最大限度地提高"
    "多样性。每个指令应该是GPT语言模型能够完成的事情，不能生成绘制图片，不能阅读音频和网页链接；"
    "指令应该是1到2句话的长度，既可以是命令句，也可以是疑问句；指令通常有一个占位符，placeholder，"
    "例如“下面这个”或者“某个”，“输入”字段会指定。\n"
    "3. 输入应该为指令的具体例子，提供真实的实质性内容，因为指令可能很空洞，需要用一个具体的输入来"
    "限定，输入不能是只有一个链接或者文件名，或者没有特指的“一篇论文”，而应该是具体的内容。"
    "输入最好不要超过200字。\n"
    "4. 角色、指令和输入大多是中文的，角色、指令和输入都不要重复。指令是必须需要，请尽量提供角色和"
    "输入。输入可以为空。\n"
    "${format_and_examples}"
    "${n}个三元组的清单如下："
)
TRIPLET_FORMAT = "每个三元组以序号开头，三行分别以“角色：”“指令：”“输入：”开头，输入为空时写“无”。"
ROLE_ANSWER = Template(
    "假设你是一名经验丰富的${medical_role}，会对患者给予非常耐心且全面的回答，并且语气温柔亲切，"
    "非常受患者喜欢。如果患者没有提供给你足够的信息判断，你会反问他相关问题。而且在诊断最后，"
    "你还会给予他一些额外的建议。如果患者提问：\n\n${Question}\n\n那么，你会回答："
)
DEFAULT_ROLE = "医生"

# --- A.2 distilled conversations ---------------------------------------------------------------

PATIENT = Template(
    "你是一名患者，下面是你的病情，你正在向HuatuoGPT智能医生咨询病情相关的问题，"
    "请记住这是一个多轮咨询过程，每次询问要精炼一些，第一次询问要尽可能简单点、内容少一点。\n\n"
    "${medical_case}\n\n"
    "当你认为整个问诊应该结束的时候请说：再见"
)
DOCTOR = Template(
    "你是一名经验丰富的医生，会对患者给予非常耐心且全面的回答，说话方式要像医生，并且语气温柔亲切，"
    "非常受患者喜欢，对患者的询问要回复得更详细、更有帮助。如果患者没有提供足够的信息用以诊断，"
    "你要反问他相关问题，以获取更多用于诊断的信息。在做出诊断后，你还会给予他一些额外的、详细的"
    "建议。注意，你只能接收到患者的描述，无法看到图片之类的材料或附件。\n\n"
    "如果无法做出明确的诊断，请询问患者更多的病情信息，最后给出的诊断结果可以是：\n\n"
    "${doctor_diagnosis}"
)
EVAL_PATIENT = Template(
    "你是一名患者，下面是你的病情，你正在向医生咨询病情相关的问题，注意这是一个多轮问诊过程，"
    "切记不要让对话结束，要继续追问医生病情有关的问题。\n${medical_case}"
)
DOCTOR_GREETING = "你好，请问你有什么需要咨询的？"

# --- A.3 / A.4 real-world data polished by the teacher -----------------------------------------

POLISH_ANSWER = Template(
    "<患者问题>：${Patient_Question}\n\n"
    "<回复参考>：${Doctor_Response}\n\n"
    "你是HuatuoGPT人工智能模型，基于患者的问题，请你参考回复然后对患者的问题给出回复，"
    "说话方式要像医生，并且语气温柔亲切，对患者的询问要回复的更详细更有帮助，在必要时如果无法明确"
    "诊断患者的疾病，可以询问患者更多的信息。\n\n"
    "<HuatuoGPT回复>："
)
POLISH_DIALOGUE = Template(
    "你现在是一名医疗大模型，我将给你提供一段患者与医生的对话，请以医生的方式修改以下多轮对话，"
    "变成病人与医疗大模型的对话。改写的对话需满足以下要求：\n"
    "1. 信息更加丰富，但不改变诊断信息。\n"
    "2. 保留对话逻辑和顺序。\n"
    "3. 修改对话中出现的医生信息，医生是一名医疗大模型，没有所属医院及个人信息。\n"
    "以下是对话内容。\n\n"
    "${dialogue}\n\n"
    "请直接给出修改好的对话，严格按照原来的格式及顺序（共${n_turns}条发言，每条以“[序号] 病人：”"
    "或“[序号] 医生：”开头，发言之间空一行，不要合并、拆分、增加或删除任何一条发言）："
)

# --- B mixed feedback, D auto evaluation -------------------------------------------------------

RATING = Template(
    "Here is a conversation history:\n[History]\n${History}\n[End of History]\n\n"
    "Here is the final question and the standard answer:\n"
    "[Question]\n${Query}\n[End of question]\n"
    "[Standard answer]\n${Doctor_response}\n[End of standard answer]\n\n"
    "Based on the conversation history, user question, and standard answer, please rate the "
    "following two AI responses on a scale of 1 to 10, considering accuracy, conciseness, and "
    "similarity to the standard answer. Please provide the ratings in the following format: "
    '"Rating A: [score]; Rating B: [score]".\n\n'
    "[Assistant A]\n${Response_A}\n[End of Assistant A]\n\n"
    "[Assistant B]\n${Response_B}\n[End of Assistant B]"
)
# Our own (not the paper's): RLMF's rating (B) applied to whole consultations on one case, with
# the judge's consultation criteria (D), so that consultation RL rewards what `judge` compares.
CONSULTATION_RATING = Template(
    "Here is a patient's case and how a real doctor handled the consultation:\n"
    "[Case]\n${Case}\n[End of case]\n"
    "[Standard consultation]\n${Doctor_consultation}\n[End of standard consultation]\n\n"
    "Below are two consultations of AI doctors with this patient. Rate the AI doctor of each on "
    "a scale of 1 to 10: it asks for the information it needs before advising, its diagnosis is "
    "the most reasonable inference and never stated as more certain than the information allows, "
    "its advice is correct, safe and effective, and it speaks clearly and warmly, like the real "
    "doctor. Please provide the ratings in the following format: "
    '"Rating A: [score]; Rating B: [score]".\n\n'
    "[Assistant A]\n${Response_A}\n[End of Assistant A]\n\n"
    "[Assistant B]\n${Response_B}\n[End of Assistant B]"
)
JUDGE = Template(
    "[Assistant 1]\n${Response_A}\n[End of Assistant 1]\n\n"
    "[Assistant 2]\n${Response_B}\n[End of Assistant 2]\n\n"
    "[System]\n"
    "We would like to request your feedback on two multi-turn conversations between the AI "
    "assistant and the user displayed above.\n"
    "Requirements: Focus on the AI's response in the conversation. The AI assistant should act "
    "like the doctor using the tone, manner, and vocabulary the human doctor would use. It should "
    "be to the point, without unnecessary elaboration or extraneous information. The AI assistant "
    "should respond appropriately to the user in a manner that helps to progress the conversation. "
    "The description of symptoms should be comprehensive and accurate, and the provided diagnosis "
    "should be the most reasonable inference based on all relevant factors and possibilities. The "
    "treatment recommendations should be effective and reliable, taking into account the severity "
    "or stages of the illness. The prescriptions should be effective and reliable, considering "
    "indications, contraindications, and dosages.\n"
    "Please compare the performance of the AI assistant in each conversation. You should tell me "
    "whether Assistant 1 is 'better than', 'worse than', or 'equal to' Assistant 2.\n"
    "Please first compare their responses and analyze which one is more in line with the given "
    "requirements.\n"
    "In the last line, please output a single line containing only a single label selecting from "
    "'${better}', '${worse}', and '${equal}'."
)
HISTORY_NONE = "(none)"


def _user(content: str) -> list[Message]:
    return [turn("user", content)]


def _spoken(turns: Sequence[Message]) -> list[Message]:
    return [t for t in turns if t["role"] != "system"]


def render_triplet(index: int, triplet: Triplet) -> str:
    """One numbered triplet in the format the self-instruct answer is asked to use."""
    given = triplet.input or "无"
    return f"{index}. 角色：{triplet.role}\n指令：{triplet.instruction}\n输入：{given}"


def self_instruct_messages(seed_examples: Sequence[Triplet], n: int = 20) -> list[Message]:
    """A.1 prompt 1: ask for ``n`` new triplets, showing the seed examples and the format."""
    parts = [f"输出格式：{TRIPLET_FORMAT}"]
    if seed_examples:
        shown = "\n\n".join(render_triplet(i, t) for i, t in enumerate(seed_examples, start=1))
        parts.append(f"下面是几个示例，请给出与示例不重复的新三元组：\n\n{shown}")
    text = SELF_INSTRUCT.substitute(n=n, format_and_examples="\n\n".join(parts) + "\n\n")
    return _user(text)


def role_answer_messages(role: str, question: str) -> list[Message]:
    """A.1 prompt 2: answer ``question`` (a triplet's instruction and input) as ``role``."""
    text = ROLE_ANSWER.substitute(medical_role=role.strip() or DEFAULT_ROLE, Question=question)
    return _user(text)


def patient_system_prompt(medical_case: str) -> str:
    """A.2 system prompt of the simulated patient; it sees the case, never the diagnosis."""
    return PATIENT.substitute(medical_case=medical_case.strip())


def doctor_system_prompt(doctor_diagnosis: str) -> str:
    """A.2 system prompt of the teacher doctor; it sees the diagnosis, never the case."""
    return DOCTOR.substitute(doctor_diagnosis=doctor_diagnosis.strip())


def eval_patient_system_prompt(medical_case: str) -> str:
    """HuatuoGPT-II's evaluation patient: keeps asking, never ends the consultation."""
    return EVAL_PATIENT.substitute(medical_case=medical_case.strip())


def patient_messages(
    system_prompt: str, turns: Sequence[Message], greeting: str | None = DOCTOR_GREETING
) -> list[Message]:
    """Chat messages from the patient's side: the dialogue's roles swapped.

    In the dialogue the patient is ``user``; to the patient model the doctor is ``user``. When the
    dialogue does not open with the doctor, ``greeting`` is put first as the doctor's line, so that
    the patient model always answers a user message (it is not part of the dialogue).
    """
    swap = {"user": "assistant", "assistant": "user"}
    spoken = [turn(swap[t["role"]], t["content"]) for t in _spoken(turns)]
    if greeting and (not spoken or spoken[0]["role"] != "user"):
        spoken.insert(0, turn("user", greeting))
    return [turn("system", system_prompt), *spoken]


def doctor_messages(system_prompt: str, turns: Sequence[Message]) -> list[Message]:
    """Chat messages from the doctor's side: the system prompt, then the dialogue as it is."""
    return [turn("system", system_prompt), *(turn(t["role"], t["content"]) for t in _spoken(turns))]


def polish_answer_messages(question: str, doctor_answer: str) -> list[Message]:
    """A.3: rewrite a real doctor's answer in HuatuoGPT's voice."""
    text = POLISH_ANSWER.substitute(Patient_Question=question, Doctor_Response=doctor_answer)
    return _user(text)


def render_polish_dialogue(turns: Sequence[Message]) -> str:
    """The strict format of A.4: "[i] 病人：..." / "[i] 医生：...", one blank line between."""
    return "\n\n".join(
        f"[{i}] {SPEAKERS[t['role']]}：{t['content'].strip()}"
        for i, t in enumerate(_spoken(turns), start=1)
    )


def polish_dialogue_messages(turns: Sequence[Message]) -> list[Message]:
    """A.4: rewrite a real doctor-patient dialogue; system turns are not shown."""
    dialogue = render_polish_dialogue(turns)
    return _user(POLISH_DIALOGUE.substitute(dialogue=dialogue, n_turns=len(_spoken(turns))))


def render_conversation(
    turns: Sequence[Message], user_label: str = "User", assistant_label: str = "AI assistant"
) -> str:
    """A conversation as text, one "Label: content" line per turn (system turns left out)."""
    labels = {"user": user_label, "assistant": assistant_label}
    return "\n".join(f"{labels[t['role']]}: {t['content'].strip()}" for t in _spoken(turns))


def rating_messages(
    history_turns: Sequence[Message],
    query: str,
    reference: str,
    response_a: str,
    response_b: str,
) -> list[Message]:
    """B: rate two responses to ``query`` against the doctor's ``reference`` answer."""
    text = RATING.substitute(
        History=render_conversation(history_turns) or HISTORY_NONE,
        Query=query,
        Doctor_response=reference,
        Response_A=response_a,
        Response_B=response_b,
    )
    return _user(text)


def consultation_rating_messages(
    case: str,
    reference: str,
    consultation_a: Sequence[Message] | str,
    consultation_b: Sequence[Message] | str,
) -> list[Message]:
    """Rate two whole consultations on ``case`` (turn lists in the doctor's view, user =
    patient, or already rendered text) against the real doctor's (``reference``, as text); the
    answer reads like :data:`RATING`'s."""

    def text(turns: Sequence[Message] | str) -> str:
        return (
            turns if isinstance(turns, str) else render_conversation(turns, "Patient", "AI doctor")
        )

    return _user(
        CONSULTATION_RATING.substitute(
            Case=case.strip(),
            Doctor_consultation=reference.strip() or HISTORY_NONE,
            Response_A=text(consultation_a),
            Response_B=text(consultation_b),
        )
    )


def judge_messages(
    conversation_a: Sequence[Message] | str, conversation_b: Sequence[Message] | str
) -> list[Message]:
    """D: compare two conversations (turn lists, or already rendered text) pairwise."""

    def text(conversation: Sequence[Message] | str) -> str:
        return conversation if isinstance(conversation, str) else render_conversation(conversation)

    better, worse, equal = VERDICT_CHOICES
    return _user(
        JUDGE.substitute(
            Response_A=text(conversation_a),
            Response_B=text(conversation_b),
            better=better,
            worse=worse,
            equal=equal,
        )
    )
