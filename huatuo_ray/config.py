"""Typed configs: one dataclass per stage, shared parts below, YAML files and ``key.sub=value``.

A config is a tree of dataclasses. :func:`load_config` fills one from a YAML file plus command-line
overrides and checks every key, type and value before any work starts; a mistake raises
:class:`ConfigError` naming the key and where it came from (the file, or "command line").

Paths may be written ``${root}/...``: ``root`` is one folder or URI per preset (``jobs/paper``,
``jobs/open7b``) from which every stage's inputs and outputs derive. Its value is the ``root=``
override, else the file's own ``root:`` key, else the ``root:`` of ``pipeline.yaml`` beside the file.

Fields carry their help text in ``metadata["help"]`` (use :func:`option`), which ``--help`` prints.
Value checks live in each dataclass's ``__post_init__`` and raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    input: str | None = None,
    made_by: str | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field with help text. Mutable defaults are copied per instance.

    ``input`` marks a path the stage reads, checked before it starts
    (:func:`huatuo_ray.inputs.check_inputs`): ``"artifact"`` (a complete artifact folder),
    ``"finished"`` (the output folder of a finished stage, dataset or not: benchmark, judge),
    ``"file"`` (a file or folder) or ``"model"`` (a model folder, or a hub id). ``made_by`` names
    the stage that writes it, for the message when it is missing.
    """
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        kwargs["default_factory"] = lambda: _copy(value)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    metadata = {"help": help, "input": input, "made_by": made_by}
    return dataclasses.field(metadata=metadata, **kwargs)


def input_artifact(
    help: str, made_by: str | None = None, default: Any = dataclasses.MISSING
) -> Any:
    """A field naming a dataset artifact the stage reads (checked before it starts)."""
    return option(default, help=help, input="artifact", made_by=made_by)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


# --------------------------------------------------------------------------- shared parts


@dataclass
class ClusterConfig:
    """Where the stage's Ray driver connects."""

    address: str | None = option(
        None,
        help="Ray address; unset: ray.init()'s default (a submitted job's cluster, a running "
        "local one, else a new one); 'local': always a new local Ray",
    )
    num_cpus: int | None = option(
        None, help="CPUs of a new local Ray (ignored, with a note, when joining a running cluster)"
    )
    log_to_driver: bool = option(True, help="forward worker logs to the driver's terminal")


@dataclass
class ScalingConfig:
    """Ray Train workers."""

    num_workers: int = option(2, help="training workers (one DeepSpeed rank each)")
    use_gpu: bool = option(False, help="one GPU per worker")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", help="how workers spread over nodes"
    )


@dataclass
class CheckpointConfig:
    """Fault tolerance."""

    every_steps: int = option(50, help="checkpoint every N optimizer steps (and each epoch's end)")
    keep: int = option(2, help="checkpoints kept in storage (the newest)")
    max_failures: int = option(
        1, help="worker/node failures survived by restarting from the latest"
    )


@dataclass
class ModelConfig:
    """A Hugging Face causal LM: a local folder, a URI, or a hub id."""

    path: str = option("", help="HF folder or hub id of the model", input="model")
    trust_remote_code: bool = option(False, help="run code shipped with the model (off: safer)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="weights dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    params: float | None = option(
        None, help="parameter count, for `plan` when the model's config.json is not readable"
    )


@dataclass
class BatchConfig:
    """The Batch API (``teacher.mode: batch``): OpenAI's ``/v1/files`` + ``/v1/batches`` and the
    services with the same shape (Azure OpenAI global batch, vLLM's ``run_batch`` files)."""

    max_requests_per_file: int = option(50_000, help="requests per batch file (OpenAI: 50,000)")
    max_bytes_per_file: int = option(200 * 2**20, help="bytes per batch file (OpenAI: 200 MB)")
    completion_window: str = option("24h", help="the window the service has to finish a batch")
    poll_s: float = option(30.0, help="first wait between two looks at a batch's status")
    poll_max_s: float = option(600.0, help="longest wait between two looks (back-off x1.5)")
    max_rounds: int = option(
        6,
        help="batch rounds (a record's next request, a parse retry: one round each); what is "
        "still missing after them is asked online",
    )
    failed_lines: Literal["online", "reject"] = option(
        "online",
        help="a line the batch failed or left expired: asked online, or its record rejected "
        "with the reason",
    )
    parse_retries: Literal["batch", "online"] = option(
        "batch", help="where an answer that did not parse is asked again: next round or online"
    )
    discount: float = option(0.5, help="share off the online price for batch answers (OpenAI: 0.5)")

    def __post_init__(self) -> None:
        if self.max_requests_per_file < 1 or self.max_bytes_per_file < 1:
            raise ValueError("max_requests_per_file and max_bytes_per_file must be >= 1")
        if self.poll_s <= 0 or self.poll_max_s < self.poll_s or self.max_rounds < 1:
            raise ValueError("poll_s must be > 0, poll_max_s >= poll_s, max_rounds >= 1")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError("discount must lie in [0, 1]")


@dataclass
class TeacherConfig:
    """An OpenAI-compatible endpoint. The API key is read from the environment, never stored."""

    base_url: str = option(
        "https://api.openai.com/v1",
        help="endpoint base URL (azure: https://RESOURCE.openai.azure.com, without /openai)",
    )
    model: str = option(
        "gpt-4o-mini", help="model name sent to the endpoint (azure: the deployment name)"
    )
    api_kind: Literal["openai", "azure"] = option(
        "openai",
        help="openai: any OpenAI-compatible API (OpenAI, DeepSeek, vLLM); azure: Azure OpenAI "
        "through its deployments path, api-version and api-key header",
    )
    azure_api_version: str = option(
        "2024-10-21", help="azure only: the api-version query parameter"
    )
    api_key_env: str = option(
        "OPENAI_API_KEY",
        help="name of the environment variable holding the key (pass it to a Ray job with "
        "--runtime-env-json, never in the config); empty: an endpoint that checks no key",
    )
    max_concurrency: int = option(16, help="requests in flight per worker process")
    requests_per_minute: float | None = option(
        None, help="limit shared by all workers of the job (None: no limit)"
    )
    tokens_per_minute: float | None = option(
        None, help="limit shared by all workers; a request counts prompt chars + max_tokens"
    )
    timeout_s: float = option(
        600.0, help="time-out of one request (a 1,024-token answer of a slow model takes minutes)"
    )
    max_retries: int = option(6, help="retries on 429, 5xx, time-outs and unreadable replies")
    backoff_base_s: float = option(1.0, help="first back-off; doubles per retry, with jitter")
    backoff_max_s: float = option(60.0, help="longest back-off between two tries")
    temperature: float | None = option(
        0.7, help="sampling temperature; null: not sent (OpenAI reasoning models accept only 1)"
    )
    top_p: float | None = option(1.0, help="nucleus sampling; null: not sent")
    max_tokens: int = option(
        1024, help="longest answer in tokens (reasoning models: reasoning tokens count too)"
    )
    max_tokens_field: Literal["auto", "max_tokens", "max_completion_tokens"] = option(
        "auto",
        help="request field carrying max_tokens; auto: max_completion_tokens for OpenAI "
        "reasoning models (o1, o3, o4-*, gpt-5*), max_tokens for every other model",
    )
    reasoning_effort: str | None = option(
        None, help="reasoning models: minimal, low, medium or high; null: not sent"
    )
    structured_outputs: bool | Literal["vllm", "json_schema"] = option(
        False,
        help="constrain each answer to the shape its parser reads: vllm (or true) sends vLLM's "
        "structured_outputs field (small local models); json_schema sends OpenAI's "
        "response_format json_schema (OpenAI, Azure, vLLM); false: plain text",
    )
    extra_body: dict[str, Any] = option(
        {}, help="sent as is, e.g. vLLM structured outputs {structured_outputs: {regex: ...}}"
    )
    price_input_per_1m: float = option(0.0, help="USD per million prompt tokens, for the cost")
    price_output_per_1m: float = option(0.0, help="USD per million completion tokens")
    price_cached_input_per_1m: float | None = option(
        None,
        help="USD per million prompt tokens the server read from its prompt cache (usage "
        "prompt_tokens_details.cached_tokens); null: the input price",
    )
    mode: Literal["online", "batch"] = option(
        "online",
        help="online: one request at a time, answers in seconds; batch: the Batch API (/v1/files"
        " + /v1/batches), half the price, answers within completion_window (hours); see README",
    )
    batch: BatchConfig = option(BatchConfig(), help="settings of teacher.mode: batch")

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("max_retries must be >= 0 and timeout_s > 0")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive when set")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.structured_outputs is True:  # the older spelling of vLLM's field
            self.structured_outputs = "vllm"

    @property
    def tokens_field(self) -> str:
        """The request field that carries ``max_tokens`` for this model."""
        if self.max_tokens_field != "auto":
            return self.max_tokens_field
        name = self.model.rsplit("/", 1)[-1].lower()
        return "max_completion_tokens" if REASONING_MODEL.match(name) else "max_tokens"


#: OpenAI's reasoning families, which refuse ``max_tokens`` (o1, o3, o4-mini, gpt-5, gpt-5.1 ...).
REASONING_MODEL = re.compile(r"^(o[1-9](?![0-9])|gpt-5)")


# --------------------------------------------------------------------------- loading


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None) -> Any:
    """Build ``cls`` from a YAML file and ``key.sub=value`` overrides; raise ConfigError."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        raw = loaded
        _mark_origin(raw, "", path, origin)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: override {item!r} is not key=value")
        _set_dotted(raw, key.strip(), _parse_override(text), item)
        origin[key.strip()] = "command line"
    if "root" not in {f.name for f in dataclasses.fields(cls)}:
        raw = _with_root(raw, path, origin)
    return _build(cls, raw, "", origin, path or "command line")


ROOT = "${root}"


def _uses_root(value: Any) -> bool:
    if isinstance(value, str):
        return ROOT in value
    if isinstance(value, list):
        return any(_uses_root(v) for v in value)
    if isinstance(value, dict):
        return any(_uses_root(v) for v in value.values())
    return False


def _substituted(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(ROOT, root)
    if isinstance(value, list):
        return [_substituted(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _substituted(v, root) for k, v in value.items()}
    return value


def preset_root(path: str | None) -> str | None:
    """The ``root:`` of the ``pipeline.yaml`` beside a preset (None when there is none)."""
    import os

    if not path:
        return None
    sibling = os.path.join(os.path.dirname(path), "pipeline.yaml")
    try:
        with open(sibling, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    root = loaded.get("root") if isinstance(loaded, dict) else None
    return str(root) if root else None


def _with_root(raw: dict[str, Any], path: str | None, origin: dict[str, str]) -> dict[str, Any]:
    """``raw`` without its ``root`` key and with every ``${root}`` replaced by the root."""
    raw = dict(raw)
    root = raw.pop("root", None)
    if not _uses_root(raw):
        return raw
    if root is None:
        root = preset_root(path)
    if not root or not isinstance(root, str):
        where = path or "command line"
        raise ConfigError(
            f"{where}: paths use {ROOT} but no root is set: pass root=PATH_OR_URI, or give "
            "root: in the file or in the pipeline.yaml beside it"
        )
    return _substituted(raw, root.rstrip("/"))


def _mark_origin(tree: dict[str, Any], prefix: str, path: str, origin: dict[str, str]) -> None:
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        origin[dotted] = path
        if isinstance(v, dict):
            _mark_origin(v, dotted + ".", path, origin)


def _parse_override(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _where(origin: dict[str, str], dotted: str, default: str) -> str:
    # The most specific key that has an origin tells where the value came from.
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in origin:
            return origin[".".join(parts[:i])]
    return default


def _build(cls: type, raw: Any, prefix: str, origin: dict[str, str], default_origin: str) -> Any:
    where = _where(origin, prefix.rstrip("."), default_origin) if prefix else default_origin
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.')} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        near = ", ".join(sorted(fields))
        raise ConfigError(
            f"{_where(origin, key, default_origin)}: unknown key {key!r}; {cls.__name__} has: {near}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{default_origin}: missing required key {dotted!r}")
            continue
        value = raw[name]
        if (
            dataclasses.is_dataclass(hints[name])
            and f.default_factory is not dataclasses.MISSING
            and isinstance(value, dict)
        ):
            # A section given in part keeps this stage's defaults for the rest (e.g. PPO's
            # constant learning rate), not the section class's own defaults.
            value = _merged(to_dict(f.default_factory()), value)
        kwargs[name] = _coerce(hints[name], value, dotted, origin, default_origin)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, dotted: str, origin: dict[str, str], default_origin: str) -> Any:
    where = _where(origin, dotted, default_origin)
    from_cli = where == "command line"

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {dotted}: expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted + ".", origin, default_origin)
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted, origin, default_origin)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin_tp is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin_tp is list:
        if not isinstance(value, list):
            raise fail("a list")
        return [
            _coerce(args[0], v, f"{dotted}[{i}]", origin, default_origin)
            for i, v in enumerate(value)
        ]
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {
            str(k): _coerce(args[1], v, f"{dotted}.{k}", origin, default_origin)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-3 (no dot) as text; it is plainly a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        # On the command line `output=123` or `model=7b` is plainly meant as text.
        if from_cli and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise ConfigError(f"{where}: {dotted}: unsupported config type {tp!r}")


# --------------------------------------------------------------------------- help and dumps


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per leaf field: ``key (type, default) help`` for ``--help``. Defaults of a
    section come from the enclosing field's factory when it has one (a stage's own defaults)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            section = getattr(defaults, f.name, None) if defaults is not None else None
            if section is None and f.default_factory is not dataclasses.MISSING:
                section = f.default_factory()
            lines.append(f"  [{prefix}{f.name}] {(tp.__doc__ or '').strip().splitlines()[0]}")
            lines += describe(tp, f"{prefix}{f.name}.", section)
            continue
        if defaults is not None:
            default = repr(getattr(defaults, f.name))
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        type_name = str(tp).replace("typing.", "")
        if isinstance(tp, type):
            type_name = tp.__name__
        lines.append(
            f"  {prefix}{f.name}: {type_name} = {default}\n      {f.metadata.get('help', '')}"
        )
    return lines


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready copy of a config, for manifests (no secrets live in configs)."""
    return dataclasses.asdict(config)
