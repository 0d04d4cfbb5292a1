"""huatuo-ray: the HuatuoGPT recipe (hybrid SFT + RLMF) as Ray jobs.

Importing the package is cheap: Ray, torch, DeepSpeed and vLLM are imported inside the stages
that use them.

Layout. *Stage packages* hold the recipes, one module per stage: ``distill`` (stage 1: the
teacher's data), ``rlmf`` (sampling, scoring, PPO), ``eval`` (benchmark, judge, consult, doctors,
report) and ``serve`` (the endpoint and the terminal chat); ``train`` holds the training recipes
(``sft``, ``reward-model``) beside the shared training core. The *cores* are what the stages are
built from: ``data`` (readers, record checks, text similarity), ``teacher`` (the client, prompts,
parsers and the teacher-stage frame), ``train`` (the DeepSpeed core and the Ray Train loop) and
``inference`` (vLLM/HF generation, OpenAI-compatible servers).

The rule: ``data``, ``teacher``, ``train`` and ``inference`` never import a stage package, and a
stage package never imports another stage package; shared code moves down into a core
(``tests/test_layout.py`` checks it).
"""

__version__ = "0.1.0"
