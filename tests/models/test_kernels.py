"""Every place that loads a model to run it also makes the shared kernel choices
(:func:`huatuo_ray.models.kernels.shape_stable_attention`): a loader without them would bring back
cuDNN attention's per-shape set-up on Hopper GPUs (a GRPO train step 2.5-3.0 s instead of 0.18 s
on the H200)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "huatuo_ray"


def _loads_a_model(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
        and "AutoModelFor" in ast.unparse(node.func.value)
    )


def test_every_model_loader_makes_the_shared_kernel_choices() -> None:
    loaders = []
    for path in PACKAGE.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, ast.FunctionDef) and any(map(_loads_a_model, ast.walk(fn))):
                calls = {ast.unparse(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
                loaders.append((path.name, fn.name))
                assert "shape_stable_attention" in calls, (path, fn.name)
    # The training core, the HF engine, DPO's reference pass, the base model's preflight.
    assert len(loaders) >= 4, loaders


def test_it_is_a_no_op_without_a_gpu() -> None:
    import torch

    from huatuo_ray.models.kernels import shape_stable_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    shape_stable_attention()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
