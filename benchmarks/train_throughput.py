"""Training throughput and MFU of a ladder size, against Hugging Face transformers + PyTorch in one run.

    python benchmarks/train_throughput.py --model=ladder_125m --batch=16 --seq=2048 [--dtype=bfloat16]
        [--remat=none] [--attention=xla|cudnn] [--steps=10] [--peer]

Ours: the real train step (t5x_cpt.trainer.make_train_step: AdamW, clipping, bf16 compute with
float32 master weights, the non-finite guard) on a synthetic packed batch, jit-compiled on the
default mesh of all local devices. Peer (--peer): transformers' LlamaForCausalLM with the same
shapes (SDPA attention, bf16 autocast, float32 weights, fused AdamW), the way a careful PyTorch
user would train it. MFU uses t5x_cpt.flops (6N + attention) and the declared device peak.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_config(name: str, dtype: str, remat: str, attention: str | None):
    from t5x_cpt import gin_cli
    from t5x_cpt.model import ModelConfig

    gin_cli.parse([f"configs/models/{name}.gin"], [], finalize=False)
    return ModelConfig(dtype=dtype, remat=remat, attention_impl=attention)


def synthetic_batch(config, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": ones, "decoder_segment_ids": ones,
            "decoder_positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "task_ids": 0 * ones}


def time_ours(config, batch: int, seq: int, steps: int) -> dict:
    import jax

    from t5x_cpt import flops, optim, partitioning, trainer
    from t5x_cpt.model import Decoder

    model = Decoder(config)
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(1000))
    mesh = partitioning.make_mesh()
    with partitioning.activation_sharding(mesh):
        _, shardings = trainer.state_shardings(model, optimizer, mesh)
        state = trainer.init_state(trainer.random_params(model, 0, shardings.params), optimizer, shardings)
        step = jax.jit(trainer.make_train_step(model, optimizer, 1), donate_argnums=(0, 1))
        sharding = partitioning.batch_sharding(mesh)
        data = {k: jax.device_put(v, sharding) for k, v in synthetic_batch(config, batch, seq).items()}
        acc = trainer.zero_accumulators(1)
        start = time.perf_counter()
        state, acc = step(state, acc, data)
        jax.block_until_ready(acc)
        compile_s = time.perf_counter() - start
        state, acc = step(state, acc, data)
        jax.block_until_ready(acc)
        start = time.perf_counter()
        for _ in range(steps):
            state, acc = step(state, acc, data)
        loss = float(acc["loss_sum"] / acc["tokens"])
        seconds = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / seconds
    device = jax.devices()[0]
    peak = flops.peak_flops_per_device(device.device_kind, config.dtype) * jax.device_count()
    memory = device.memory_stats() or {}
    return {"step_seconds": seconds, "tokens_per_second": tokens_per_s, "compile_seconds": compile_s,
            "mfu": tokens_per_s * flops.train_flops_per_token(config, seq) / peak, "device": device.device_kind,
            "peak_flops": peak, "mean_loss": loss, "peak_memory_gib": memory.get("peak_bytes_in_use", 0) / 2**30}


def time_peer(config, batch: int, seq: int, steps: int) -> dict:
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.resolved_d_ff,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.resolved_num_kv_heads, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, max_position_embeddings=seq, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).cuda()
    if config.remat != "none":
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(1, config.vocab_size, (batch, seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"step_seconds": seconds, "tokens_per_second": batch * seq / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ladder_125m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peer", action="store_true")
    args = parser.parse_args()
    config = model_config(args.model, args.dtype, args.remat, args.attention)
    from t5x_cpt import flops

    result = {"model": args.model, "params": flops.param_counts(config)["params"], "batch": args.batch,
              "seq": args.seq, "dtype": args.dtype, "remat": args.remat, "attention": args.attention}
    if args.peer:  # the peer first, so that JAX's preallocation does not starve it of memory
        try:
            result["peer_hf_torch"] = time_peer(config, args.batch, args.seq, args.steps)
        except Exception as e:  # report the peer's failure (e.g. out of memory) next to our figures
            result["peer_error"] = f"{type(e).__name__}: {e}"[:500]
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()
    result["ours"] = time_ours(config, args.batch, args.seq, args.steps)
    if "peer_hf_torch" in result:
        result["speedup_vs_peer"] = result["ours"]["tokens_per_second"] / result["peer_hf_torch"]["tokens_per_second"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
