"""Source-LLM interoperability: import Hugging Face / GGUF checkpoints, export to Hugging Face,
extend the vocabulary. See docs/convert.md.

    from t5x_cpt.convert import load_pretrained
    model, params = load_pretrained(PATH)        # HF dir, .gguf, imported DIR or MODEL_DIR
    logits = model.apply({"params": params}, token_ids)   # float32 [batch, length, vocab]
"""

from t5x_cpt.convert.common import ConversionError
from t5x_cpt.convert.export import export_checkpoint
from t5x_cpt.convert.importer import import_checkpoint, load_pretrained
from t5x_cpt.convert.vocab_extension import extend_vocabulary

__all__ = ["ConversionError", "export_checkpoint", "extend_vocabulary", "import_checkpoint", "load_pretrained"]
