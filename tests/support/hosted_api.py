"""A loopback server with the rules of hosted OpenAI-compatible APIs (OpenAI, Azure OpenAI).

:class:`HostedAPIServer` is the scripted teacher of :mod:`tests.support.openai_servers` that also
refuses what the real services refuse, with their status codes and error bodies (taken from the
bodies these services return, as users have reported them):

* an unknown model: 404 ``model_not_found``;
* a reasoning model (OpenAI's o-series, gpt-5) sent ``max_tokens``: 400
  ``unsupported_parameter``; sent a ``temperature`` or ``top_p`` other than 1: 400
  ``unsupported_value``; a chat model sent ``reasoning_effort``, or any model a field the API does
  not know (vLLM's ``structured_outputs``): 400 "Unrecognized request argument supplied: ..."
  (no code);
* a ``response_format`` json_schema that breaks the strict-mode rules: 400;
* Azure OpenAI's path ``/openai/deployments/{deployment}/chat/completions?api-version=...`` with
  the key in an ``api-key`` header: 404 ``DeploymentNotFound`` for an unknown deployment, 404
  without ``api-version``, Azure's 401 body for a wrong key;
* optional rate-limit headers on every answer (``rate_limit(n_answered) -> headers``).

An exhausted quota (429 ``insufficient_quota``), a wrong OpenAI key (401 ``invalid_api_key``,
whose message echoes a masked key) and filtered answers are scripted by the responder
(:class:`~tests.support.openai_servers.ScriptedHTTPError`,
:class:`~tests.support.openai_servers.ScriptedReply`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from tests.support.openai_servers import (
    Responder,
    ScriptedOpenAIServer,
    _json_response,
    openai_error_body,
)

#: Body fields OpenAI's chat completions accept (a field outside it is "unrecognized").
KNOWN_FIELDS = frozenset(
    "model messages max_tokens max_completion_tokens temperature top_p n stream stream_options "
    "seed stop response_format reasoning_effort user metadata store presence_penalty "
    "frequency_penalty logprobs top_logprobs logit_bias tools tool_choice parallel_tool_calls "
    "service_tier modalities prediction audio verbosity".split()
)
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
AZURE_401 = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
    "valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)


def invalid_key_message(key: str) -> str:
    """OpenAI's 401 message, which shows the start and end of the key it was sent."""
    return (
        f"Incorrect API key provided: {key[:3]}********{key[-4:]}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )


def _error(status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    return _json_response(status, openai_error_body(message, "invalid_request_error", code, param))


def strict_schema_error(schema: Any, where: str = "()") -> str | None:
    """Why a json_schema breaks OpenAI's strict mode (None: it does not)."""
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object":
        if schema.get("additionalProperties") is not False:
            return f"In context={where}, 'additionalProperties' is required to be supplied and to be false."
        props = schema.get("properties") or {}
        if sorted(schema.get("required") or []) != sorted(props):
            return f"In context={where}, 'required' is required to be supplied and to be an array including every key in properties."
        for name, sub in props.items():
            if (why := strict_schema_error(sub, f"('properties', '{name}')")) is not None:
                return why
    if schema.get("type") == "array":
        return strict_schema_error(schema.get("items"), f"{where}, 'items'")
    return None


class HostedAPIServer(ScriptedOpenAIServer):
    """:class:`ScriptedOpenAIServer` with a hosted API's rules (see the module docstring)."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        chat_models: Iterable[str] = ("scripted-teacher",),
        reasoning_models: Iterable[str] = (),
        azure_deployments: Mapping[str, str] | None = None,
        rate_limit: Callable[[int], Mapping[str, str]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.chat_models, self.reasoning_models = set(chat_models), set(reasoning_models)
        super().__init__(responder, models=self.chat_models | self.reasoning_models, **kwargs)
        self.azure_deployments = dict(azure_deployments or {})
        self.rate_limit = rate_limit
        self.azure_calls: list[dict[str, Any]] = []  # deployment, api_version, auth headers seen

    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.router.add_post(
            "/openai/deployments/{deployment}/chat/completions", self._chat_completions
        )
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.path.startswith("/openai/") or super()._authorized(request)

    def _headers(self, body: dict[str, Any]) -> dict[str, str]:
        return dict(self.rate_limit(self.stats.succeeded)) if self.rate_limit else {}

    def _check(self, body: dict[str, Any], request: web.Request) -> web.Response | None:
        model = str(body.get("model"))
        if request.path.startswith("/openai/"):
            refused = self._check_azure(request)
            if refused is not None:
                return refused
            model = self.azure_deployments[request.match_info["deployment"]]
            body["model"] = model
        elif model not in self.models:
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "model_not_found",
            )
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if model in self.chat_models and "reasoning_effort" in body:
            unknown = ["reasoning_effort", *unknown]
        if unknown:
            return _error(400, f"Unrecognized request argument supplied: {unknown[0]}", None)
        if model in self.reasoning_models:
            if "max_tokens" in body:
                return _error(
                    400,
                    "Unsupported parameter: 'max_tokens' is not supported with this model. "
                    "Use 'max_completion_tokens' instead.",
                    "unsupported_parameter",
                    "max_tokens",
                )
            for name in ("temperature", "top_p"):
                if name in body and body[name] != 1:
                    return _error(
                        400,
                        f"Unsupported value: '{name}' does not support {body[name]} with this "
                        "model. Only the default (1) value is supported.",
                        "unsupported_value",
                        name,
                    )
        return self._check_response_format(body.get("response_format"))

    def _check_azure(self, request: web.Request) -> web.Response | None:
        deployment = request.match_info["deployment"]
        self.azure_calls.append(
            {
                "deployment": deployment,
                "api_version": request.query.get("api-version"),
                "api_key": request.headers.get("api-key"),
                "authorization": request.headers.get("Authorization"),
            }
        )
        if not request.query.get("api-version"):
            return _json_response(404, {"error": {"code": "404", "message": "Resource not found"}})
        if self.require_api_key is not None and (
            request.headers.get("api-key") != self.require_api_key
        ):
            return _json_response(401, {"error": {"code": "401", "message": AZURE_401}})
        if deployment not in self.azure_deployments:
            return _json_response(
                404,
                {
                    "error": {
                        "code": "DeploymentNotFound",
                        "message": "The API deployment for this resource does not exist. If "
                        "you created the deployment within the last 5 minutes, please wait a "
                        "moment and try again.",
                    }
                },
            )
        return None

    @staticmethod
    def _check_response_format(fmt: Any) -> web.Response | None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return None
        spec = fmt.get("json_schema") or {}
        name = str(spec.get("name", ""))
        if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
            return _error(
                400,
                "Invalid 'response_format.json_schema.name': string does not match pattern. "
                "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                "invalid_value",
                "response_format.json_schema.name",
            )
        if spec.get("strict") and (why := strict_schema_error(spec.get("schema"))) is not None:
            return _error(
                400, f"Invalid schema for response_format '{name}': {why}", None, "response_format"
            )
        return None
