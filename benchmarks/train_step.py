"""Training throughput on the user's path, against transformers + PyTorch eager, alternating in one run.

    python benchmarks/train_step.py --size=demo          # the demo: d_model 128, bytes, 8 x 256 tokens
    python benchmarks/train_step.py --size=ladder_49m    # the 49M ladder row: 32k vocabulary, 4 x 512

Ours is what a user runs: `python -m t5x_cpt.train` on the size's gin files, real packed data
(the prepared lo_help English corpus), float32 on this machine's default devices; its figure is
the steady-state `tokens_per_second` of metrics.jsonl (the median of the log records after the
first, which holds the compilation). The demo size runs with the demo's own eval and checkpoint
periods, so the same runs give the eval and async-checkpoint overheads as fractions of training
time.

The peer is Hugging Face transformers' LlamaForCausalLM with the same shapes (SDPA attention,
untied or tied as ours, SwiGLU, RMSNorm, RoPE), float32, torch.optim.AdamW with the same
hyper-parameters and global-norm clipping, fed the same batches from t5x_cpt's pipeline (written
beforehand by a separate process, so that the peer's process never runs TensorFlow or JAX): the
loop a careful PyTorch user writes (it ignores the packing boundaries, which only makes it cheaper).
Its figure is non-padding target tokens over the wall time of its steps after warm-up.

Ours and the peer alternate (--rounds, each a fresh process) so that load on the machine hits
both. Each side's peak host memory (RSS) is reported. The matmul peak is measured in the same
run (float32 2048^2, best of 5) and the theoretical peak is stated from the CPU's cores, clock
and AVX2/AVX-512 FMA width. Prints one JSON object; not part of `make test`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# size -> gin files, bindings and steps of one measured run
SIZES = {
    "demo": {
        "gin_files": ["configs/experiments/demo_pretrain.gin"],
        # The demo's own batch (8 x 256) and log, eval and checkpoint periods (demo_budget.gin);
        # 160 steps hold four evaluations.
        "bindings": [],
        "steps": 160,
    },
    "ladder_49m": {
        # The ladder row's body and 32,000-entry vocabulary; the data is the byte-level corpus
        # (ids < 264 are a subset of the vocabulary, the compute is the row's).
        "gin_files": ["configs/runs/pretrain.gin", "configs/models/ladder_49m.gin", "configs/data/vocab_byte.gin"],
        "bindings": ["SOURCE_TASK='lo_help_en'", "BATCH_SIZE=4", "SEQUENCE_LENGTH=512",
                     "LOG_PERIOD=3", "EVAL_PERIOD=100000", "CHECKPOINT_PERIOD=100000"],
        "steps": 12,
    },
}


def _gin_args(size: str, model_dir: str, steps: int) -> list[str]:
    spec = SIZES[size]
    args = [f"--gin_file={f}" for f in spec["gin_files"]]
    bindings = spec["bindings"] + [f"MODEL_DIR='{model_dir}'", f"TRAIN_STEPS={steps}"]
    return args + [f"--gin.{b}" for b in bindings]


# -- the two children ---------------------------------------------------------------------------

def child_ours(size: str, model_dir: str, steps: int) -> dict:
    from t5x_cpt import run_dir, train

    code = train.main(_gin_args(size, model_dir, steps))
    if code:
        raise SystemExit(code)
    all_records = run_dir.read_metrics(model_dir)
    records = [r for r in all_records if "tokens_per_second" in r]
    steady = [r["tokens_per_second"] for r in records[1:]]  # the first interval holds the compilation
    train_seconds = sum((r["tokens"] - p["tokens"]) / r["tokens_per_second"] for p, r in zip(records, records[1:]))
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in all_records if r["step"] > 0)  # step 0 compiles
    checkpoint_seconds = sum(r.get("checkpoint_seconds", 0.0) for r in all_records)
    return {"tokens_per_second": statistics.median(steady), "intervals": steady,
            "flops_per_token": records[-1]["flops"] / records[-1]["tokens"],
            "eval_fraction": eval_seconds / train_seconds, "checkpoint_fraction": checkpoint_seconds / train_seconds}


def child_data(size: str, steps: int, batches_path: str) -> dict:
    """Writes the peer's batches (from t5x_cpt's pipeline) and the model config to an .npz file."""
    import numpy as np

    from t5x_cpt import gin_cli, train  # noqa: F401  (train registers the run files' configurables)
    from t5x_cpt.data import pipeline as data_pipeline
    from t5x_cpt.data.tfutil import seqio
    from t5x_cpt.model import ModelConfig

    with tempfile.TemporaryDirectory() as scratch:  # MODEL_DIR is required by the run files; unused
        gin_cli.parse([os.path.join(REPO, f) for f in SIZES[size]["gin_files"]],
                      [b.removeprefix("--gin.") for b in _gin_args(size, scratch, steps) if b.startswith("--gin.")],
                      finalize=False)
    pipe = data_pipeline.make_train_pipeline(shard_info=seqio().ShardInfo(index=0, num_shards=1))
    batches = [next(pipe) for _ in range(steps)]
    keys = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
    np.savez(batches_path, config=json.dumps(ModelConfig().to_dict()),
             **{k: np.stack([b[k] for b in batches]) for k in keys})
    return {}


def child_peer(batches_path: str) -> dict:
    """The PyTorch loop, in a process that runs neither TensorFlow nor JAX (both are imported, neither
    initialised): a TF op or an initialised JAX CPU backend in the same process slowed PyTorch's
    CPU kernels by 10-50% on 2 cores."""
    import numpy as np
    import torch
    import transformers

    from t5x_cpt import optim
    from t5x_cpt.model import ModelConfig

    data = np.load(batches_path)
    config = ModelConfig(**json.loads(str(data["config"])))
    steps, _, sequence_length = data["decoder_input_tokens"].shape
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.resolved_d_ff,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.resolved_num_kv_heads, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, max_position_embeddings=sequence_length,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config)
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    ours = {name: p.default for name, p in inspect.signature(optim.make_optimizer).parameters.items()}
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": ours["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=2e-4, betas=(ours["b1"], ours["b2"]), eps=ours["eps"])

    def step(index: int) -> float:
        inputs = torch.from_numpy(data["decoder_input_tokens"][index].astype(np.int64))
        targets = torch.from_numpy(data["decoder_target_tokens"][index].astype(np.int64))
        weights = torch.from_numpy(data["decoder_loss_weights"][index].astype(np.float32))
        logits = model(input_ids=inputs).logits
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="none")
        count = weights.sum()
        loss = (losses * weights.reshape(-1)).sum() / count.clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ours["clip_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(count)

    warmup = max(2, steps // 6)
    for index in range(warmup):
        step(index)
    tokens, start = 0.0, time.perf_counter()
    for index in range(warmup, steps):
        tokens += step(index)
    return {"tokens_per_second": tokens / (time.perf_counter() - start), "threads": torch.get_num_threads()}


# -- the parent ---------------------------------------------------------------------------------

def _run_child(role: str, size: str, steps: int, scratch: str) -> dict:
    with tempfile.TemporaryDirectory() as own:
        out = os.path.join(own, "result.json")
        command = [sys.executable, os.path.abspath(__file__), f"--size={size}", f"--_child={role}",
                   f"--_out={out}", f"--steps={steps}", f"--_model_dir={os.path.join(own, 'run')}",
                   f"--_batches={os.path.join(scratch, 'batches.npz')}"]
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def theoretical_peak_flops() -> dict:
    """Cores x clock x FMA FLOPs per cycle (two FMA units; 8 float32 lanes with AVX2, 16 with AVX-512)."""
    cores, mhz, flags = os.cpu_count() or 1, None, ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":")[1])
            elif line.startswith("flags") and not flags:
                flags = line
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * 2 * lanes  # two FMA pipes, 2 FLOPs per multiply-add
    peak = cores * (mhz or 0.0) * 1e6 * per_cycle
    return {"theoretical_peak_flops": peak,
            "theoretical_peak_basis": f"{cores} cores x {mhz} MHz x {per_cycle} float32 FLOP/cycle"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--rounds", type=int, default=2, help="ours/peer alternations (each a fresh process)")
    parser.add_argument("--steps", type=int, default=None, help="train steps per run (default: the size's)")
    parser.add_argument("--_child", choices=("ours", "peer", "data"), help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--_batches", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or SIZES[args.size]["steps"]

    if args._child:
        if args._child == "ours":
            result = child_ours(args.size, args._model_dir, steps)
        elif args._child == "data":
            result = child_data(args.size, steps, args._batches)
        else:
            result = child_peer(args._batches)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        with open(args._out, "w") as f:
            json.dump(result, f)
        return 0

    ours, peer = [], []
    with tempfile.TemporaryDirectory() as scratch:
        _run_child("data", args.size, steps, scratch)
        for round_index in range(args.rounds):
            print(f"[{args.size}] round {round_index + 1}/{args.rounds}: ours", file=sys.stderr, flush=True)
            ours.append(_run_child("ours", args.size, steps, scratch))
            print(f"[{args.size}] round {round_index + 1}/{args.rounds}: peer", file=sys.stderr, flush=True)
            peer.append(_run_child("peer", args.size, steps, scratch))

    import jax

    from t5x_cpt import flops

    measured_peak = flops.measured_peak_flops("float32", size=2048, repeats=5)
    ours_rate = statistics.median(r["tokens_per_second"] for r in ours)
    peer_rate = statistics.median(r["tokens_per_second"] for r in peer)
    result = {
        "size": args.size, "device": jax.devices()[0].device_kind, "steps_per_run": steps, "rounds": args.rounds,
        "ours_tokens_per_second": ours_rate, "peer_tokens_per_second": peer_rate, "ratio": ours_rate / peer_rate,
        "ours_mfu": ours_rate * ours[0]["flops_per_token"] / measured_peak,
        "peak_flops": measured_peak, **theoretical_peak_flops(),
        "ours_eval_fraction": statistics.median(r["eval_fraction"] for r in ours),
        "ours_checkpoint_fraction": statistics.median(r["checkpoint_fraction"] for r in ours),
        "ours_peak_rss_gib": max(r["peak_rss_gib"] for r in ours),
        "peer_peak_rss_gib": max(r["peak_rss_gib"] for r in peer),
        "ours_runs": [r["tokens_per_second"] for r in ours], "peer_runs": [r["tokens_per_second"] for r in peer],
        "peer": "transformers LlamaForCausalLM + torch AdamW, float32 eager",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
