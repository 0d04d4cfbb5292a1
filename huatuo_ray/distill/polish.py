"""Stage ``polish``: real doctors' answers and dialogues rewritten by the teacher (A.3 / A.4).

    python -m huatuo_ray polish --config jobs/tiny/polish.yaml

Input: a dataset artifact of real data (the ``data`` stage's output for Huatuo-26M, cMedQA2,
webMedQA, MedDialog...). A record with one question and one answer is rewritten with the A.3
prompt (the doctor's answer as the reference); a longer dialogue with the A.4 prompt, and the
result must keep the number, order and roles of the turns, else it is rejected with the reason.
The real doctor's words stay in ``meta.reference`` for RLMF and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts
from huatuo_ray.chat import Dialogue, RecordError, turn
from huatuo_ray.config import ClusterConfig, TeacherConfig, option, to_dict
from huatuo_ray.distill.common import WorkersConfig, already_complete, ask_parsed, limiter_for_job
from huatuo_ray.distill.pipeline import Outcome, read_input_rows, run_teacher_map, write_result
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient


@dataclass
class PolishConfig:
    """Rewrite real doctor answers and dialogues with the teacher."""

    input: str = option(help="dataset artifact of real single-turn answers or dialogues")
    output: str = option(help="artifact folder to write (its _teacher_cache makes reruns free)")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limit: int | None = option(None, help="polish only the first N input records")
    overwrite: bool = option(False, help="redo a complete artifact (cached answers are reused)")
    shard_rows: int = option(10_000, help="records per Parquet shard")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


async def polish_record(row: dict[str, Any], teacher: TeacherClient, retries: int) -> Outcome:
    """One input record -> its polished version (or a reject reason)."""
    original = Dialogue.from_row(row)
    spoken = [t for t in original.turns if t["role"] != "system"]
    if not any(t["role"] == "assistant" for t in spoken):
        return Outcome.reject("no doctor reply to polish")
    if len(spoken) == 2 and [t["role"] for t in spoken] == ["user", "assistant"]:
        question, answer = spoken[0]["content"], spoken[1]["content"]
        messages = prompts.polish_answer_messages(question, answer)
        polished = await ask_parsed(
            teacher, messages, parsers.parse_answer, retries, grammars.answer()
        )
        turns = [turn("user", question), turn("assistant", polished)]
        source, reference = "polish_single", answer
    else:
        messages = prompts.polish_dialogue_messages(original.turns)
        turns = await ask_parsed(
            teacher,
            messages,
            lambda text: parsers.parse_polished_dialogue(text, original.turns),
            retries,
            grammars.polished_dialogue(original.turns),
        )
        source, reference = "polish_dialogue", [dict(t) for t in original.turns]
    record = Dialogue(
        id=f"polish-{original.id}",
        source=source,
        turns=turns,
        meta={"from_id": original.id, "from_source": original.source, "reference": reference},
    )
    try:
        return Outcome(record.validate())
    except RecordError as e:
        return Outcome.reject(f"polished record invalid: {e}")


def main(config: PolishConfig) -> dict:
    from huatuo_ray.runtime import connect

    connect(config.cluster, "polish")
    if (done := already_complete(config.output, config.overwrite)) is not None:
        return done
    rows = read_input_rows(config.input, config.limit)
    result = run_teacher_map(
        rows,
        "huatuo_ray.distill.polish.polish_record",
        config.teacher,
        config.output,
        workers=config.workers.num_workers,
        batch_size=config.workers.batch_size,
        fn_kwargs={"retries": config.workers.max_parse_retries},
        limiter_name=limiter_for_job(config.teacher),
        stage="polish",
    )
    return write_result(
        result,
        config.output,
        "polish",
        to_dict(config),
        [artifacts.input_summary(config.input)],
        config.teacher,
        config.shard_rows,
        extra={"inputs_read": len(rows)},
    )
