"""Training and RL in the dashboard: a tiny `sft` and a tiny `grpo`, run on a `ray start` head,
export their series (tagged by stage and job) to the node's metrics endpoint, which Prometheus
scrapes; and every series the Grafana dashboard (cluster/grafana/huatuo.json) plots is exported by
some stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ray_head import free_port, local_head

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana" / "huatuo.json"
SERIES = re.compile(r"^(ray_huatuo_\w+)\{([^}]*)\}", re.M)


def exported_names() -> set[str]:
    """Every ``huatuo_*`` name a stage exports, read from the calls of :mod:`huatuo_ray.telemetry`
    (names written out, or a prefix over a loop's tuple of names)."""
    names: set[str] = set()
    call = re.compile(r"(?:telemetry\.)?(gauge|count)\(\s*(f?)\"(\w*)(\{name\})?\"")
    loop = re.compile(r"for name in \(([^)]*)\)[^\n]*\n(?:[^\n]*\n){0,1}?[^\n]*?telemetry\.(?:gauge|count)\(f\"(\w*)\{name\}\"")  # fmt: skip
    for path in (REPO / "huatuo_ray").rglob("*.py"):
        text = path.read_text()
        for _, _, name, placeholder in call.findall(text):
            if not placeholder:
                names.add(f"huatuo_{name}")
        for items, prefix in loop.findall(text):
            names |= {f"huatuo_{prefix}{n}" for n in re.findall(r"\"(\w+)\"", items)}
    return names


def test_every_series_the_grafana_dashboard_plots_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    assert {"huatuo_train_lr", "huatuo_ppo_clip_fraction", "huatuo_records_total"} <= exported
    plotted: set[str] = set()
    titles = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        titles.append(panel["title"])
        for target in panel["targets"]:
            names = set(re.findall(r"ray_(huatuo_\w+)", target["expr"]))
            assert names, target["expr"]
            assert 'job=~"$job"' in target["expr"] and "stage" in target["expr"], target["expr"]
            plotted |= {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}
    missing = {n for n in plotted if n not in exported and f"{n}_total" not in exported}
    assert not missing, missing
    assert len(titles) == len(set(titles))  # one panel per figure
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"stage", "job"} <= variables


def _scrape(url: str, seen: dict[str, set[str]], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            for name, labels in SERIES.findall(text):
                seen.setdefault(name, set()).add(labels)
        except OSError:
            pass
        stop.wait(2)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_tiny_sft_and_grpo_export_their_series_to_the_nodes_metrics_endpoint(
    tmp_path: Path, shared_datasets: Path, tiny_model_dir: str
) -> None:
    from huatuo_ray.data.convert import DataConfig, convert
    from huatuo_ray.distill import mixture
    from huatuo_ray.models.tiny import build_tiny_reward_model

    data = tmp_path / "cmd"
    csv = shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
    convert(DataConfig(source="cmd_csv", input=str(csv), output=str(data), limit=40))
    mixture.mix(mixture.MixtureConfig(output=str(tmp_path / "mix"),
                                      sources=[mixture.MixtureSource(str(data))],
                                      validation_fraction=0.25))  # fmt: skip
    reward = build_tiny_reward_model(str(tmp_path / "reward"), tokenizer_dir=tiny_model_dir)
    port = free_port()
    fast = {"RAY_metrics_report_interval_ms": "1000"}
    seen: dict[str, set[str]] = {}
    stop = threading.Event()
    with local_head(node_env=fast, metrics_port=port) as head:
        env = {**os.environ, **head.env, **fast, "RAY_ADDRESS": head.address}
        scraper = threading.Thread(
            target=_scrape, args=(f"http://127.0.0.1:{port}/metrics", seen, stop), daemon=True
        )
        scraper.start()
        runs = {}
        try:
            for stage, args in {
                "sft": ["--config", "jobs/tiny/sft.yaml", f"train={tmp_path}/mix/train",
                        f"validation={tmp_path}/mix/validation", f"model.path={tiny_model_dir}",
                        f"output={tmp_path}/sft", f"storage_path={tmp_path}/ray_train",
                        "epochs=1", "eval_every_steps=2"],
                "grpo": ["--config", "jobs/tiny/grpo.yaml", f"inputs=[{data}]",
                         f"model.path={tiny_model_dir}", f"reward.model.path={reward}", "reward.normalise=false",
                         f"output={tmp_path}/grpo", "iterations=2",
                         "checkpoint.every_iterations=2"],
            }.items():  # fmt: skip
                started = time.time()
                runs[stage] = subprocess.run(
                    [sys.executable, "-m", "huatuo_ray", stage, *args],
                    cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
                )  # fmt: skip
                print(f"{stage}: {time.time() - started:.0f} s")
                assert runs[stage].returncode == 0, runs[stage].stderr[-4000:]
            time.sleep(4)  # the last report of the drivers and workers
        finally:
            stop.set()
            scraper.join()
    wanted = {
        "sft": ["train_loss", "train_tokens_per_s", "train_lr", "train_grad_norm",
                "validation_loss", "progress_fraction"],
        "grpo": ["ppo_reward_mean", "ppo_kl", "ppo_response_length", "ppo_clip_fraction",
                 "ppo_rollout_tokens_per_s", "ppo_generate_s", "ppo_experience_s",
                 "ppo_train_s", "ppo_sync_s"],
    }  # fmt: skip
    for stage, names in wanted.items():
        for name in names:
            labels = seen.get(f"ray_huatuo_{name}", set())
            tagged = [
                la for la in labels if f'stage="{stage}"' in la and re.search(r'job="\w+"', la)
            ]
            assert tagged, (stage, name, sorted(seen))
