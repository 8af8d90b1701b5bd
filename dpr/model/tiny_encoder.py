"""A tiny BERT built locally (config + a WordPiece tokenizer trained with ``tokenizers``), saved
as a Hugging Face folder. Tests and quick runs use it so the real loading code (``AutoModel``,
``AutoTokenizer``) is exercised offline without downloading any model."""

from __future__ import annotations

from pathlib import Path

_BASE_CORPUS = [
    "i want to watch movies films tonight show me more something recommend please no not anything but",
    "don't skip the in mood for some a of and with without less fewer another kind good great",
]


def make_tiny_text_encoder(path: str | Path, corpus: list[str] | None = None, hidden: int = 32,
                           layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Create (once) a random tiny BERT + tokenizer at ``path`` and return the folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(list(_BASE_CORPUS) + list(corpus or []), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=128)
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(path)
    return path
