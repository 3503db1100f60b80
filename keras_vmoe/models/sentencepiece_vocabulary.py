"""Training a small SentencePiece vocabulary in memory, for the text models
whose presets ship their own (LIMoE, the PaliGemma-style VLM)."""

import io

import sentencepiece


def train_sentencepiece(texts, vocabulary_size, special_pieces, owner, **trainer_options):
    """Trains a SentencePiece model on `texts`; returns it serialized (bytes).

    Args:
        texts: an iterable of str.
        vocabulary_size: an upper bound: a small corpus yields fewer pieces.
        special_pieces: {"pad" | "unk" | "bos" | "eos": (id, piece)}, the
            model's fixed ids, as the tokenizer that reads it expects them.
        owner: the public function's name, for errors.
        **trainer_options: more `SentencePieceTrainer.train` options
            (`model_type`, `byte_fallback`, ...).
    """

    texts = [str(text) for text in texts]
    if not texts:
        raise ValueError(f"{owner}: `texts` is empty.")
    for kind, (index, piece) in special_pieces.items():
        trainer_options[f"{kind}_id"] = index
        trainer_options[f"{kind}_piece"] = piece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocabulary_size,
        hard_vocab_limit=False,
        minloglevel=2,
        **trainer_options,
    )
    return model.getvalue()
