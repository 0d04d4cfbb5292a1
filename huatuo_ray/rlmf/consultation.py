"""A consultation as one RL sample: the opening as the prompt, every later turn as the response,
the doctor's tokens (the policy's) the only actions.

The tokens are the training chat template's (:mod:`~huatuo_ray.dialogue`), segment by segment
as :func:`~huatuo_ray.dialogue.tokenize_dialogue` lays them out for SFT: a doctor turn is the
tokens the policy sampled (its EOS included) after the assistant tag; a patient turn is the
user tag, the text and a space, then the assistant tag that opens the doctor's next turn. So
the policy is scored on exactly the context it will see when serving, and the loss, the KL and
the advantages cover its own tokens only (``action_mask`` 0 on the patient's, which stay in
the sequence as context: :func:`~huatuo_ray.rlmf.experience.make_experience`,
:func:`~huatuo_ray.rlmf.ppo_math.gae` across the gaps).

Consultation rollouts (the policy as the doctor, the teacher as the patient) build one
:class:`Transcript` per consultation, turn by turn (:func:`run_consultations`: every open
consultation's next doctor turn in one engine call, the patients' replies asked together,
finished consultations leaving the batch); :meth:`Transcript.from_turns` builds one from a
finished dialogue.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray.dialogue import (
    ASSISTANT_TAG,
    USER_TAG,
    RecordError,
    encode_prompt,
    encode_text,
    turn,
)

log = logging.getLogger(__name__)


@dataclass
class Transcript:
    """``prompt``: the opening (system and the patient's first words, ending in the assistant
    tag); ``response``: the turns since, with ``actions`` (1: a doctor token) beside them."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the engine's; 0 on patient tokens
    doctor_turns: int = 0
    cut_turns: int = 0  # doctor turns cut at max_new_tokens (no EOS)

    @classmethod
    def open(cls, tokenizer: Any, opening: list[dict[str, str]]) -> Transcript:
        """The opening turns (a system turn, then the patient's first words)."""
        return cls(encode_prompt(tokenizer, opening))

    def add_doctor(
        self, token_ids: list[int], logprobs: list[float] | None = None, finished: bool = True
    ) -> None:
        """The doctor's turn as the policy sampled it (EOS included when it ended: ``finished``),
        with the engine's log-prob of each token when it gave them."""
        self.cut_turns += not finished
        self.response += token_ids
        self.actions += [1] * len(token_ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(token_ids)
        self.doctor_turns += 1

    def add_patient(self, tokenizer: Any, text: str) -> None:
        """The patient's reply, and the assistant tag the doctor's next turn starts after."""
        ids = encode_text(tokenizer, f"{USER_TAG}{text} ") + encode_text(tokenizer, ASSISTANT_TAG)
        self.response += ids
        self.actions += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def next_prompt(self) -> list[int]:
        """What the engine continues for the doctor's next turn: the whole consultation."""
        return self.prompt + self.response

    @property
    def doctor_tokens(self) -> int:
        return sum(self.actions)

    @classmethod
    def from_turns(cls, tokenizer: Any, turns: list[dict[str, str]]) -> Transcript:
        """A finished dialogue (system, then the patient first, then alternating) as a
        transcript, the doctor's turns tokenised as training tokenises them."""
        first = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), None)
        if first is None:
            raise RecordError("a consultation needs a doctor turn")
        transcript = cls.open(tokenizer, turns[:first])
        for t in turns[first:]:
            if t["role"] == "assistant":
                transcript.add_doctor(
                    encode_text(tokenizer, t["content"]) + [tokenizer.eos_token_id]
                )
            elif t["role"] == "user":
                transcript.add_patient(tokenizer, t["content"])
            else:
                raise RecordError(f"unexpected {t['role']!r} turn inside a consultation")
        return transcript


# ---------------------------------------------------------------- rollouts

#: How a consultation can end. Kept: the patient said goodbye, or ``max_turns`` were done.
#: Dropped, counted by reason: the next doctor turn would pass the length limit, or the patient's
#: reply failed (unparseable after the retries, or its request failed for good).
KEPT_ENDINGS = ("goodbye", "turn_limit")
DROPPED_ENDINGS = ("too_long", "patient_error")

# The next doctor turn of every open consultation (prompt token ids, seeds): one sample each.
DoctorCall = Callable[[list[list[int]], list[int]], list[Any]]
# The next patient line of each (patient brief, turns so far in the doctor's view, the
# consultation's seed): its text, or an Exception when it failed for good; None for the whole
# round when the patients' budget would be passed
# (:class:`~huatuo_ray.rlmf.actors.patient.PatientWorker`).
PatientCall = Callable[[list[tuple[str, list[dict[str, str]], int]]], list[Any] | None]


@dataclass
class Consultation:
    """One consultation of a rollout: its case (``brief``: the patient's system prompt, which
    holds the case), what was said in the doctor's view (user = patient), the transcript the
    policy trains on, and how it ended (None while open)."""

    case_id: str
    brief: str
    seed: int
    turns: list[dict[str, str]] = field(default_factory=list)
    transcript: Transcript | None = None
    ended: str | None = None
    error: str | None = None


@dataclass
class ConsultationRollout:
    """What :func:`run_consultations` did: the consultations kept (in their input order), those
    dropped by reason, and the engine's batch at each doctor turn (the open consultations)."""

    kept: list[Consultation]
    dropped: Counter
    engine_batches: list[int]
    patient_requests: int
    budget_spent: bool = False  # the patients' budget stopped the rollout (nothing kept)


def turn_seed(seed: int, doctor_turn: int) -> int:
    """A consultation's seed for its ``doctor_turn``-th turn (each turn draws fresh noise)."""
    return (seed * 1_000_003 + doctor_turn) % 2**31


def run_consultations(
    consultations: list[Consultation],
    tokenizer: Any,
    doctor: DoctorCall,
    patient: PatientCall,
    max_turns: int,
    max_tokens: int,
    max_new_tokens: int,
    system: str | None = None,
) -> ConsultationRollout:
    """Play every consultation out, all together: the patients open (each from its brief), then
    each round sends the next doctor turn of every open consultation to ``doctor`` in one call
    (the engine's batch is the open consultations) and asks the patients of those still open
    for their replies in one call (concurrent requests), until each patient says goodbye or
    ``max_turns`` doctor turns are done. A consultation whose next doctor turn could pass
    ``max_tokens`` (prompt, turns so far and ``max_new_tokens``) or whose patient failed is
    dropped, counted by reason. ``system``: the doctor's system turn, when training had one.
    When the patients' budget would be passed the rollout stops there (``budget_spent``,
    nothing kept: the run stops without training on it)."""
    from huatuo_ray.teacher.parsers import is_goodbye

    requests = 0

    def ask_patients(open_now: list[Consultation]) -> list[Any] | None:
        nonlocal requests
        said = patient([(c.brief, list(c.turns), c.seed) for c in open_now])
        requests += len(open_now) if said is not None else 0
        return said

    def spent() -> ConsultationRollout:
        return ConsultationRollout([], Counter(), batches, requests, budget_spent=True)

    batches: list[int] = []
    openings = ask_patients(consultations)
    if openings is None:
        return spent()
    for c, said in zip(consultations, openings):
        if isinstance(said, Exception):
            c.ended, c.error = "patient_error", str(said)
            continue
        c.turns.append(turn("user", said))
        opening = ([turn("system", system)] if system else []) + c.turns
        c.transcript = Transcript.open(tokenizer, opening)
    for doctor_turn in range(max_turns):
        open_now = []
        for c in consultations:
            if c.ended is None:
                if len(c.transcript.next_prompt()) + max_new_tokens > max_tokens:
                    c.ended = "too_long"
                else:
                    open_now.append(c)
        if not open_now:
            break
        batches.append(len(open_now))
        prompts = [c.transcript.next_prompt() for c in open_now]
        samples = doctor(prompts, [turn_seed(c.seed, doctor_turn) for c in open_now])
        for c, sample in zip(open_now, samples):
            c.transcript.add_doctor(sample.token_ids, sample.logprobs, sample.finished)
            c.turns.append(turn("assistant", sample.text.strip()))
        if doctor_turn == max_turns - 1:
            for c in open_now:
                c.ended = "turn_limit"
            break
        replies = ask_patients(open_now)
        if replies is None:
            return spent()
        for c, said in zip(open_now, replies):
            if isinstance(said, Exception):
                c.ended, c.error = "patient_error", str(said)
            elif is_goodbye(said):
                c.ended = "goodbye"
            else:
                c.turns.append(turn("user", said))
                c.transcript.add_patient(tokenizer, said)
    kept = [c for c in consultations if c.ended in KEPT_ENDINGS]
    dropped = Counter(c.ended for c in consultations if c.ended in DROPPED_ENDINGS)
    return ConsultationRollout(kept, dropped, batches, requests)


# ---------------------------------------------------------------- the stage's rollout


def sample_consultations(
    config: Any,
    groups: dict[str, Any],
    batch: list[Any],
    seeds: list[int],
    tokenizer: Any,
    pad_id: int,
    counts: dict[str, float],
    figures: dict[str, Any],
) -> tuple[Any, list[dict[str, Any]]] | None:
    """``rollout.mode: consultation``: one consultation per row of ``batch`` (cases from
    :class:`~huatuo_ray.rlmf.rl_prompts.PromptStream`, a group's ``sampling.n`` in consecutive
    rows, each with its own seed), the rollout engines as the doctor (each round's open
    consultations shared over the engines, one call each) and the ``patient`` group's worker as
    the patients. Returns the Experience of the whole groups kept, with each row's reward info
    (the turns and how the consultation ended in ``meta``), or None when no group was kept or
    the patients' budget is spent (``counts["budget_spent"]``). A group with a dropped
    consultation is left out whole, as group advantages need the whole group; the drops are
    counted by reason (``counts``), the engines' and the driver's batches go to ``figures``."""
    import ray

    from huatuo_ray.rlmf.experience import make_experience

    engines = groups["rollout"].workers
    patient_worker = groups["patient"].workers[0]

    called: list[list[int]] = []  # the engines each round went to (fewer prompts than engines)

    def doctor(prompts: list[list[int]], turn_seeds: list[int]) -> list[Any]:
        bounds = [round(i * len(prompts) / len(engines)) for i in range(len(engines) + 1)]
        shares = [(e, a, b) for e, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]
        called.append([e for e, _, _ in shares])
        calls = [engines[e].generate.remote(prompts[a:b], turn_seeds[a:b]) for e, a, b in shares]
        return [s for samples in ray.get(calls) for s in samples]

    def patient(requests: list[tuple[str, list[dict[str, str]], int]]) -> list[Any] | None:
        return ray.get(patient_worker.replies.remote(requests))

    ask = config.rollout.consultation
    consultations = [
        Consultation(p.id, p.info["meta"]["brief"], seed) for p, seed in zip(batch, seeds)
    ]
    rollout = run_consultations(
        consultations, tokenizer, doctor, patient, ask.max_turns, ask.max_tokens,
        config.sampling.max_new_tokens,
    )  # fmt: skip
    counts["patient_requests"] = counts.get("patient_requests", 0) + rollout.patient_requests
    for reason, n in rollout.dropped.items():
        counts[f"consultations_{reason}"] = counts.get(f"consultations_{reason}", 0) + n
    if rollout.dropped:  # why, in the stage's log: the first patient's error says the most
        why = next((c.error for c in consultations if c.error), "")
        log.warning(
            "consultations dropped: %s%s", dict(rollout.dropped), f" ({why})" if why else ""
        )
    # What the engines decoded at once, by their own count: each round's open consultations.
    stats = ray.get(groups["rollout"].call("engine_stats"))
    figures["engine_batch"] = sum(s["mean_batch"] for s in stats) / len(stats)
    each = [iter(s["calls"]) for s in stats]
    per_round = [sum(next(each[e]) for e in engines_called) for engines_called in called]
    figures["engine_calls"] = figures.get("engine_calls", []) + per_round
    figures["open_consultations"] = figures.get("open_consultations", []) + rollout.engine_batches
    if rollout.budget_spent:
        counts["budget_spent"] = counts["patient_budget_spent"] = 1
        return None
    n = config.sampling.n
    whole = [
        g for g in range(len(consultations) // n)
        if all(c.ended in KEPT_ENDINGS for c in consultations[g * n : (g + 1) * n])
    ]  # fmt: skip
    counts["dropped_groups"] = (
        counts.get("dropped_groups", 0) + len(consultations) // n - len(whole)
    )
    rows = [g * n + k for g in whole for k in range(n)]
    if not rows:
        return None
    kept = [consultations[i] for i in rows]
    transcripts = [c.transcript for c in kept]
    counts["consultations_kept"] = counts.get("consultations_kept", 0) + len(kept)
    counts["doctor_turns"] = counts.get("doctor_turns", 0) + sum(
        t.doctor_turns for t in transcripts
    )
    exp = make_experience(
        [t.prompt for t in transcripts],
        [t.response for t in transcripts],
        [t.cut_turns == 0 for t in transcripts],
        pad_id,
        [t.logprobs for t in transcripts],
        action_masks=[t.actions for t in transcripts],
    )
    infos = []
    for i, c in zip(rows, kept):
        info = batch[i].info
        infos.append({**info, "meta": {**info["meta"], "turns": c.turns, "ended": c.ended}})
    return exp, infos
