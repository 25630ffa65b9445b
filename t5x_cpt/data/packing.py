"""Model features of packed rows, in seqio DecoderFeatureConverter(pack=True) format.

The train pipeline fills each row of `sequence_length` completely: pieces of documents are laid
one after another, and a piece that does not fit is split, its rest starting the next row as a new
segment (position 0, BOS input), so no token is dropped and nothing is padded. Given a row's
segments, the features are exactly what seqio's DecoderFeatureConverter produces for those segments
(tests/test_data_pipeline.py checks this against seqio itself):

    decoder_target_tokens  the tokens, 0 = padding
    decoder_input_tokens   targets shifted right within each segment, BOS (0) at segment starts
    decoder_loss_weights   1 on non-padding targets
    decoder_segment_ids    1, 2, ... per segment in the row, 0 on padding
    decoder_positions      0, 1, ... within each segment, 0 on padding

Evaluation uses seqio's DecoderFeatureConverter itself (`pack_with_seqio`): documents cut into
pieces of at most `sequence_length` tokens, packed without splitting, padded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


def features_from_rows(targets: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict:
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    inputs[positions == 0] = 0
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets != 0).astype(np.int32),
        "decoder_segment_ids": segment_ids,
        "decoder_positions": positions,
    }


def pieces(doc: np.ndarray, length: int) -> list[np.ndarray]:
    """A document cut into consecutive pieces of at most `length` tokens."""
    return [doc[i:i + length] for i in range(0, len(doc), length)]


def pack_with_seqio(examples: Sequence[np.ndarray], sequence_length: int) -> dict:
    """Packs examples (each <= sequence_length tokens) with seqio.DecoderFeatureConverter(pack=True).

    Returns the stacked features [rows, sequence_length] (int32), in seqio's row order.
    """
    from t5x_cpt.data.tfutil import seqio, tf  # pylint: disable=g-import-not-at-top

    sq, t = seqio(), tf()
    if not examples:
        return {k: np.zeros((0, sequence_length), np.int32) for k in FEATURES}
    lengths = np.array([len(e) for e in examples], np.int64)
    if lengths.max() > sequence_length or lengths.min() < 1:
        raise ValueError("every example must have 1..sequence_length tokens")
    flat = np.concatenate(examples).astype(np.int32)
    ragged = t.RaggedTensor.from_row_lengths(flat, lengths)
    ds = t.data.Dataset.from_tensor_slices({"targets": ragged}).map(
        lambda ex: {"targets": ex["targets"]})
    converter = sq.DecoderFeatureConverter(pack=True)
    ds = converter(ds, {"targets": sequence_length})
    rows = list(ds.as_numpy_iterator())
    return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in FEATURES}
