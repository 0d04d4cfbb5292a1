"""The training core on its own (one DeepSpeed rank on gloo, in a child process so that this
process's torch.distributed stays untouched): steps at accumulation boundaries, a checkpoint
round trip that restores weights, schedule and loop state, and a refused world-size change."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from huatuo_ray.config import ModelConfig
    from huatuo_ray.runtime import free_port
    from huatuo_ray.train import core
    from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig

    model_dir, folder = sys.argv[1], sys.argv[2]
    core.init_process_group(False, ("127.0.0.1", free_port()), 0, 1)
    ds, optim = DeepSpeedConfig(zero_stage=2, precision="fp32"), OptimConfig(lr=1e-3)

    def build():
        torch.manual_seed(0)
        model = core.load_model(ModelConfig(path=model_dir), "causal", torch.float32,
                                gradient_checkpointing=True)
        return core.TrainingCore(model, ds, optim, micro_batch=1, accumulation=2,
                                 total_steps=10, on_gpu=False)

    trained = build()
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(1))
    steps = [trained.backward_step(trained.module(input_ids=ids, labels=ids).loss)
             for _ in range(4)]
    trained.save_checkpoint(folder, {"step": 2, "note": "kept"})
    weights = {n: p.detach().clone() for n, p in trained.engine.module.named_parameters()}

    restored = build()
    state = restored.load_checkpoint(folder)
    same = all(torch.equal(p, weights[n]) for n, p in restored.engine.module.named_parameters())
    fresh = build()
    differs = any(not torch.equal(p, weights[n]) for n, p in fresh.engine.module.named_parameters())
    print(json.dumps({
        "steps": steps, "state": state, "same": same, "fresh_differs": differs,
        "lr": [trained.lr, restored.lr, fresh.lr],
        "use_cache": trained.engine.module.config.use_cache,
    }))
    """
)


@pytest.mark.slow  # two DeepSpeed engines on gloo, each run twice (save, then restore)
@pytest.mark.parametrize("where", ["folder", "uri"])
def test_core_steps_saves_and_restores(
    tiny_model_dir: str, tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``uri``: the model given as a ``file://`` URI (pyarrow's local filesystem, as an object
    store would be) is fetched into the node's cache by the core's loaders and trains the same."""
    folder = tmp_path / "checkpoint"
    model = tiny_model_dir if where == "folder" else f"file://{tiny_model_dir}"
    monkeypatch.setenv("HUATUO_MODEL_CACHE", str(tmp_path / "model-cache"))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, model, str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["steps"] == [False, True, False, True]  # a step every 2 micro-batches
    assert got["state"] == {"step": 2, "note": "kept"}
    assert got["same"] and got["fresh_differs"]
    trained_lr, restored_lr, fresh_lr = got["lr"]
    assert restored_lr == trained_lr != fresh_lr  # the schedule came back too
    assert got["use_cache"] is False  # gradient checkpointing turns the KV cache off
    fetched = list((tmp_path / "model-cache").glob("*/config.json"))
    assert len(fetched) == (1 if where == "uri" else 0)  # fetched once, for every build
    if where == "uri":
        return

    saved = json.loads((folder / "state.json").read_text())
    assert saved["world_size"] == 1
    saved["world_size"] = 2  # written by two workers: one cannot load it
    (folder / "state.json").write_text(json.dumps(saved))
    script = SCRIPT.split("trained = build()")[0] + (
        "try:\n    build().load_checkpoint(folder)\nexcept ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, tiny_model_dir, str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert "written by 2 workers, this run has 1" in out.stdout, out.stderr[-2000:]
