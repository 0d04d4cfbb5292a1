#!/usr/bin/env bash
# The GPU checks of the training stages and the RL loop, as one call on the lent H200 (about 7
# minutes): installs the kit (Ray, DeepSpeed; ../shared/gpu-kit/build.sh builds .gpukit/ here),
# then
#   1. the `sft` stage (Ray Train, 1 worker, DeepSpeed ZeRO-2 bf16) against a plain bf16 AdamW
#      loop on the same 2,048-token packed rows (Llama 2048 x 12, random): ratio and
#      data_wait_fraction;
#   2. benchmarks/ppo_step.py --gpu: every group colocated on the one GPU (the hybrid engine),
#      weights handed over by CUDA IPC, HF rollouts: chunked, streamed and GRPO (Llama 2048 x 8);
#   3. the HF engine's decoding loop against generate (bf16, 64 answers of 128 tokens);
# and prints one JSON line with the figures (also $OUT/figures.json). A part that fails or runs
# out of time is recorded as such and the next one still runs.
#
# Here:   ../shared/gpu-kit/build.sh
# There:  device run, carry [".gpukit"], command "bash benchmarks/device/gpu_checks.sh"
set -uo pipefail
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false
out=${OUT:-outputs/device}
mkdir -p "$out"
started=$(date +%s)

bash .gpukit/install.sh 2>&1 | tail -3 | tee "$out/install.log"
export PYTHONPATH=/tmp/gpukit-site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: run it, keep its log, its last line is its figures
  local name=$1 limit=$2
  shift 2
  echo "== $name (at $(($(date +%s) - started)) s, limit $limit s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "rc=$?" >> "$out/$name.rc"
  grep -E "step [0-9]+/|iteration|ratio|streamed |chunked |grpo |Error|error" "$out/$name.log" | tail -8
  pkill -9 -f "raylet|gcs_server|ray::|dashboard|default_worker" 2>/dev/null  # a part killed by its limit leaves Ray behind
  sleep 2
}

# Weight hand-over by CUDA IPC between two Ray actors on the one GPU (what the hybrid engine's
# sync does): if it fails, the RL runs fall back to the object store and say so.
part ipc 40 python3 - <<'PY'
import ray, torch
from huatuo_ray.rlmf import weight_sync

N = 1 << 20
def values():
    return torch.arange(N, dtype=torch.float32).to(torch.bfloat16)

@ray.remote(num_gpus=0.5)
class Side:
    def make(self):
        self.t = values().cuda()  # kept alive while the other side reads it
        return weight_sync.share(self.t)
    def read(self, handle):
        seen = weight_sync.open_shared(handle, torch.device("cuda"))
        return torch.equal(seen.cpu(), values())

ray.init(include_dashboard=False)
a, b = Side.remote(), Side.remote()
print("ipc", "ok" if ray.get(b.read.remote(ray.get(a.make.remote()))) else "mismatch")
PY
sync=auto
grep -q "^ipc ok" "$out/ipc.log" || sync=object_store
echo "weight sync for the RL runs: $sync"

# The HF engine's own decoding loop against transformers' generate on the GPU (bf16): the share of
# answers drawn alike (bf16 sums in another order may flip a near tie) and the time of each.
part decode 90 python3 - <<'PY'
import json, time, torch
from huatuo_ray.inference.generation import EngineConfig, HFGenerator, SamplingConfig
from huatuo_ray.models.tiny import TinyConfig, build_tiny_causal_lm
path = build_tiny_causal_lm("/tmp/decode-model", TinyConfig(hidden_size=2048, num_layers=8, num_heads=16, vocab_size=32000))
prompts = [[1] + [(7 * i + 13 * j) % 31000 + 3 for j in range(40 + 5 * i)] for i in range(16)]
rows, seeds = [p for p in prompts for _ in range(4)], list(range(64))
sampling = SamplingConfig(n=1, max_new_tokens=128, ignore_eos=True, temperature=1.0, top_p=1.0)
out, times = {}, {}
for decoder in ("loop", "generate"):
    engine = HFGenerator(path, EngineConfig(backend="hf", hf_batch_prompts=True, hf_decoder=decoder))
    engine.generate(rows[:4], sampling, seeds[:4])  # warm-up
    torch.cuda.synchronize(); t = time.perf_counter()
    out[decoder] = [r[0].token_ids for r in engine.generate(rows, sampling, seeds)]
    torch.cuda.synchronize(); times[decoder] = time.perf_counter() - t
same = sum(a == b for a, b in zip(out["loop"], out["generate"])) / len(rows)
print(json.dumps({"decode_same_answers": same, "decode_loop_s": round(times["loop"], 3),
                  "decode_generate_s": round(times["generate"], 3),
                  "decode_loop_vs_generate": round(times["generate"] / times["loop"], 3)}))
PY

part sft 200 python3 benchmarks/sft_throughput.py --cuda --hidden 2048 --layers 12 --vocab 32000 --max-length 2048 --micro-batch 4 --global-batch 16 --samples 2600 --warmup 3
part ppo 280 python3 benchmarks/ppo_step.py --gpu --backend hf --hidden 2048 --layers 8 --heads 16 --vocab 32000 --response-tokens 128 --rollout 64 --iterations 3 --weight-sync $sync

python3 - "$out" "$started" <<'PY'
import json, os, sys, time
out, started = sys.argv[1], int(sys.argv[2])

def last_json(name):
    try:
        lines = open(os.path.join(out, name + ".log")).read().strip().splitlines()
        return json.loads(lines[-1])
    except Exception as e:  # a part that failed: say so, keep the others
        return {"failed": f"{type(e).__name__}: {e}"[:200]}

sft, ppo, decode = last_json("sft"), last_json("ppo"), last_json("decode")
figures = {
    "gpu": open(os.path.join(out, "gpu.txt")).read().strip(),
    "sft_stage_vs_plain_loop": sft.get("ratio_vs_plain_loop"),
    "sft_data_wait_fraction": sft.get("data_wait_fraction"),
    "sft_tokens_per_s_stage": sft.get("tokens_per_s_stage"),
    "sft_tokens_per_s_plain": sft.get("tokens_per_s_plain"),
    "ipc_probe": open(os.path.join(out, "ipc.log")).read().strip().splitlines()[-1:],
    "ppo_weight_sync": ppo.get("weight_sync"),
    "ppo_sync_s": ppo.get("streamed_sync_s"),
    "ppo_gpu_used_gib": ppo.get("streamed_gpu_used_gib"),
    "ppo_gpu_peak_allocated_gib": ppo.get("streamed_gpu_peak_allocated_gib"),
    "engine_batch": ppo.get("engine_batch"),
    "chunked_engine_batch": ppo.get("chunked_engine_batch"),
    "streamed_vs_chunked": ppo.get("streamed_vs_chunked"),
    "grpo_vs_ppo_iteration": ppo.get("grpo_vs_ppo_iteration"),
    "grpo_vs_ppo_train": ppo.get("grpo_vs_ppo_train"),
    **{k: decode.get(k) for k in ("decode_same_answers", "decode_loop_vs_generate")},
    "wall_s": int(time.time()) - started,
    "sft": sft,
    "ppo": ppo,
}
with open(os.path.join(out, "figures.json"), "w") as f:
    json.dump(figures, f, indent=1)
print(json.dumps(figures))
PY
