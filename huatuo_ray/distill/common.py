"""What the teacher stages share: their worker settings, parse-and-retry, and the stage frame."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from huatuo_ray import artifacts, storage
from huatuo_ray.chat import RecordError
from huatuo_ray.config import TeacherConfig, option
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.parsers import ParseError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WorkersConfig:
    """Ray Data workers that call the teacher."""

    num_workers: int = option(2, help="actors calling the teacher (each keeps max_concurrency)")
    batch_size: int = option(16, help="records per Ray Data batch; a batch's records run at once")
    max_parse_retries: int = option(
        2, help="ask again (a new, paid request) when an answer does not parse; then reject"
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.batch_size < 1 or self.max_parse_retries < 0:
            raise ValueError("num_workers and batch_size must be >= 1, max_parse_retries >= 0")


async def ask_parsed(
    teacher: TeacherClient,
    messages: list[dict[str, str]],
    parse: Callable[[str], T],
    retries: int,
    grammar: dict[str, Any] | None = None,
    **sampling: Any,
) -> T:
    """Ask, parse; on a parse error ask again as a new request (``variant``), up to ``retries``.

    ``grammar`` (see :mod:`~huatuo_ray.teacher.grammars`) is sent as vLLM structured outputs when
    the teacher config turns them on. Raises :class:`RecordError` with the last parse reason:
    the record becomes a reject.
    """
    if grammar is not None and teacher.config.structured_outputs:
        sampling["extra_body"] = {**teacher.config.extra_body, "structured_outputs": grammar}
    last: ParseError | None = None
    cut = False
    for variant in range(retries + 1):
        answer = await teacher.chat(messages, variant=variant, **sampling)
        try:
            return parse(answer.text)
        except ParseError as e:
            last = e
            cut = answer.finish_reason == "length"
    why = last.reason if last else "?"
    if cut:  # the usual cause of a bad shape: say so, it tells the user to raise max_tokens
        why += f" (answer cut at max_tokens={teacher.sampling(**sampling)['max_tokens']})"
    raise RecordError(f"unparseable teacher answer: {why}")


def already_complete(output: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a finished run (nothing to do), or None after clearing old results.

    The teacher cache under the output folder is kept: it is what makes a rerun free.
    """
    if storage.exists(storage.join(output, artifacts.MANIFEST)) and not overwrite:
        log.info(
            "%s is already complete; overwrite=true redoes it (cached answers are reused)", output
        )
        return artifacts.read_manifest(output)
    if storage.is_dir(output):
        for path in storage.list_files(output):
            if path.endswith((".parquet", artifacts.REJECTS, artifacts.MANIFEST)):
                storage.delete(path)
    return None


def limiter_for_job(teacher: TeacherConfig) -> str | None:
    """Create the job's shared RPM/TPM limiter actor; return its name for the workers."""
    import ray

    from huatuo_ray.teacher.limiter import shared_limiter

    name = f"huatuo-teacher-limiter-{ray.get_runtime_context().get_job_id()}"
    handle = shared_limiter(name, teacher.requests_per_minute, teacher.tokens_per_minute)
    return name if handle is not None else None
