"""Patient worker: the teacher as the patient of consultation rollouts
(:func:`~huatuo_ray.rlmf.consultation.run_consultations`), one async Ray actor holding one
teacher client (its cache, rate limits and usage), every open consultation's reply in flight
together on the actor's event loop.

A reply that fails for good (unparseable after the retries, or its request failed) comes back
as :class:`PatientFailed` and drops that consultation only; an error every request would meet
(a wrong key, an unknown model) stops the run. The cache under the run's output makes a rerun
after a kill replay the patients' answers instead of paying for them again. A round of replies
that could pass the patients' budget (:class:`~huatuo_ray.rlmf.teacher_reward.TeacherBudget`,
counted as if none were cached) is not sent: ``replies`` answers None and the run stops cleanly.
"""

from __future__ import annotations

import asyncio

from huatuo_ray.config import TeacherConfig
from huatuo_ray.rlmf.teacher_reward import PaidTeacherWorker, TeacherBudget


class PatientFailed(RuntimeError):
    """This consultation's patient gave no usable reply (the reason is the message)."""


class PatientWorker(PaidTeacherWorker):
    def __init__(
        self,
        teacher: TeacherConfig,
        cache_uri: str,
        retries: int = 2,
        budget: TeacherBudget | None = None,
    ):
        self.open_client(teacher, cache_uri, budget or TeacherBudget())
        self.retries = retries

    async def replies(
        self, requests: list[tuple[str, list[dict[str, str]], int]]
    ) -> list[str | PatientFailed] | None:
        """The next line of each patient: (brief, the turns so far in the doctor's view, the
        consultation's seed) in, its text or :class:`PatientFailed` out, in order; None when
        the round could pass the budget (nothing was sent)."""
        from huatuo_ray.dialogue import RecordError
        from huatuo_ray.teacher.agents import patient_turn
        from huatuo_ray.teacher.client import TeacherError

        async def one(brief: str, turns: list[dict[str, str]], seed: int) -> str | PatientFailed:
            try:
                return await patient_turn(self.client, brief, turns, self.retries, seed)
            except (RecordError, TeacherError) as e:  # a fatal error stops the run instead
                return PatientFailed(str(e))

        if self._would_pass_budget(len(requests)):
            return None
        paid_before = self.client.usage.paid
        answers = await asyncio.gather(*(one(*r) for r in requests))
        self.iteration_paid += self.client.usage.paid - paid_before
        await self.client.flush()  # answers in the cache before the driver goes on
        return list(answers)
