"""Corpora, tokenizer, packing, and the resumable sharded loader.

The default corpus is embedded in every Python install: the standard library's own `.py` source
files (test suites and site-packages left out), about 12 MB of real code, found on the running
interpreter so nothing is downloaded. A user corpus is a list of `.txt` files (one document each)
and/or `.jsonl` files (one document per line, the text under `data.jsonl_key`).

Tokenizer: a byte-level BPE trained once by the `tokenizers` library on the corpus's training
documents with the model's vocabulary size, and cached; or the user's own `tokenizer.json`.

Preparation (done by rank 0, everything else waits at a barrier, then reads the cache):
1. documents are split into train and validation by a hash of their text, so the split is the
   same on every machine and duplicates never straddle it;
2. each split is tokenized, every document followed by the end-of-text token, concatenated, and
   cut into rows of seq_len + 1 tokens (tokens = row[:-1], labels = row[1:]);
3. the rows are cached as one array per split, keyed by a fingerprint of the corpus files, the
   tokenizer and the split settings.

Loading: optimizer step s uses the global batch of G = micro_batch_size * grad_accum * world_size
rows at positions [s*G, (s+1)*G) of a permutation of the training rows drawn from (seed, epoch).
Within it, rank r's micro-batch m is the slice (r*grad_accum + m)*micro_batch_size onward, so a
run on N ranks sees exactly the global batches of a 1-rank run with N times the accumulation.
The loader's whole state is the step counter, which goes into every checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch

EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
CACHE_VERSION = 1


@dataclass
class DataConfig:
    seq_len: int = 128
    """Tokens per training sequence (each packed row holds seq_len + 1 tokens)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    corpus: str = "stdlib"
    """'stdlib' (this interpreter's standard-library sources) or 'files' (the files in `paths`)."""
    paths: List[str] = field(default_factory=list)
    """corpus=files: .txt files (one document each) and .jsonl files (one document per line)."""
    jsonl_key: str = "text"
    """Field of each JSONL line holding the document text."""
    tokenizer: Optional[str] = None
    """Path of a tokenizer.json to use. None: train a byte-level BPE on the corpus (cached)."""
    vocab_size: int = 4096
    """Vocabulary of the BPE trained when tokenizer is None (conf sets it to model.vocab_size)."""
    eos_token: str = "<|endoftext|>"
    """Token appended to every document."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation."""
    seed: int = 0
    """Seed of the per-epoch shuffle of training rows."""
    cache_dir: str = "~/.cache/fp8-moe"
    """Where the trained tokenizer and the tokenized rows are kept."""


def stdlib_files() -> list[Path]:
    """The standard library's .py files (without test suites and site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED_STDLIB_DIRS & set(p.relative_to(root).parts)]
    if not files:
        raise RuntimeError(f"no standard-library sources under {root}; give a corpus with data.paths=[...]")
    return sorted(files)


def corpus_files(cfg: DataConfig) -> list[Path]:
    if cfg.corpus not in ("stdlib", "files"):
        raise ValueError(f"data.corpus={cfg.corpus!r} is unknown; use 'stdlib' or 'files'")
    if cfg.corpus == "stdlib":
        if cfg.paths:
            raise ValueError("data.paths is set but data.corpus=stdlib; select your files with data=files")
        return stdlib_files()
    if not cfg.paths:
        raise ValueError("data=files needs data.paths=[a.txt,b.jsonl,...] (files of your corpus)")
    files = [Path(p).expanduser() for p in cfg.paths]
    for p in files:
        if not p.is_file():
            raise ValueError(f"data.paths entry {str(p)!r} is not a file; give existing .txt/.jsonl files "
                             "or data.paths=[] for the built-in corpus")
        if p.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"data.paths entry {str(p)!r} is neither .txt nor .jsonl")
    return files


def read_documents(files: list[Path], jsonl_key: str) -> list[str]:
    docs = []
    for path in files:
        if path.suffix != ".jsonl":
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if jsonl_key not in record:
                        raise ValueError(f"{path}:{lineno} has no {jsonl_key!r} field; set data.jsonl_key")
                    docs.append(record[jsonl_key])
    return [d for d in docs if d]


def is_validation(doc: str, val_fraction: float) -> bool:
    return zlib.crc32(doc.encode("utf-8", "replace")) % 1_000_000 < val_fraction * 1_000_000


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    val = [d for d in docs if is_validation(d, val_fraction)]
    train = [d for d in docs if not is_validation(d, val_fraction)]
    if not val or not train:
        raise ValueError(f"the corpus has {len(docs)} documents: too few to split with "
                         f"data.val_fraction={val_fraction}; add documents or change the fraction")
    return train, val


def train_bpe(docs: list[str], vocab_size: int, eos_token: str):
    """A byte-level BPE (GPT-2 style pre-tokenization) trained on `docs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def pack_rows(docs: list[str], tokenizer, eos_id: int, seq_len: int) -> np.ndarray:
    """Tokenize, append EOS to every document, concatenate, cut into rows of seq_len + 1 tokens."""
    ids = [np.asarray(e.ids + [eos_id], dtype=np.int64) for e in tokenizer.encode_batch(docs)]
    stream = np.concatenate(ids)
    n_rows = len(stream) // (seq_len + 1)
    if n_rows == 0:
        raise ValueError(f"{len(stream)} tokens cannot fill one row of data.seq_len+1={seq_len + 1} tokens; "
                         "use a larger corpus or a shorter data.seq_len")
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2 ** 16 else np.int32
    return stream[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1).astype(dtype)


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(files: list[Path]) -> list:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


@dataclass
class PreparedData:
    train_rows: np.ndarray
    """[N_train, seq_len + 1] token ids."""
    val_rows: np.ndarray
    """[N_val, seq_len + 1] token ids."""
    tokenizer_path: Path
    vocab_size: int


class Corpus:
    """Resolves the corpus and tokenizer of a DataConfig to cache paths; `prepare()` fills them."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.files = corpus_files(cfg)
        self.cache = Path(cfg.cache_dir).expanduser()
        corpus_key = fingerprint(CACHE_VERSION, files_fingerprint(self.files), cfg.jsonl_key, cfg.val_fraction)
        if cfg.tokenizer is not None:
            self.tokenizer_path = Path(cfg.tokenizer).expanduser()
            if not self.tokenizer_path.is_file():
                raise ValueError(f"data.tokenizer={cfg.tokenizer!r} does not exist; give the path of a "
                                 "tokenizer.json, or data.tokenizer=null to train a BPE on the corpus")
            tok_key = hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest()
        else:
            self.tokenizer_path = self.cache / f"tokenizer-{fingerprint(corpus_key, cfg.vocab_size, cfg.eos_token)}.json"
            tok_key = self.tokenizer_path.name
        self.rows_prefix = self.cache / f"rows-{fingerprint(corpus_key, tok_key, cfg.seq_len, cfg.eos_token)}"

    def _rows_path(self, split: str) -> Path:
        return Path(f"{self.rows_prefix}-{split}.npy")

    def prepare(self) -> None:
        """Train/cache the tokenizer and the packed rows if they are not cached yet (rank 0 only)."""
        if self._rows_path("train").exists() and self._rows_path("val").exists() and self.tokenizer_path.exists():
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        train_docs, val_docs = split_documents(read_documents(self.files, self.cfg.jsonl_key), self.cfg.val_fraction)
        if not self.tokenizer_path.exists():
            _atomic_write(self.tokenizer_path,
                          lambda p: train_bpe(train_docs, self.cfg.vocab_size, self.cfg.eos_token).save(str(p)))
        tokenizer = self.load_tokenizer()
        eos_id = self.eos_id(tokenizer)
        for split, docs in (("train", train_docs), ("val", val_docs)):
            rows = pack_rows(docs, tokenizer, eos_id, self.cfg.seq_len)
            _atomic_write(self._rows_path(split), lambda p: np.save(p, rows))

    def load_tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.tokenizer_path))

    def eos_id(self, tokenizer) -> int:
        eos_id = tokenizer.token_to_id(self.cfg.eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_path} has no token {self.cfg.eos_token!r}; "
                             "set data.eos_token to its end-of-document token")
        return eos_id

    def load(self) -> PreparedData:
        for split in ("train", "val"):
            if not self._rows_path(split).exists():
                raise RuntimeError(f"{self._rows_path(split)} is missing: Corpus.prepare() must run first (rank 0)")
        return PreparedData(np.load(self._rows_path("train"), mmap_mode="r"), np.load(self._rows_path("val")),
                            self.tokenizer_path, self.load_tokenizer().get_vocab_size())


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def to_batch(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """[B, S+1] rows -> tokens [B, S] and next-token labels [B, S] (LongTensors)."""
    data = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return {"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}


class TrainLoader:
    """Global batch of optimizer step s -> this rank's micro-batches; the state is the step counter."""

    def __init__(self, rows: np.ndarray, micro_batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int):
        self.rows, self.seed = rows, seed
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = len(rows) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(rows)} training rows cannot fill one global batch of {self.global_batch} "
                             "(micro_batch_size x grad_accum x world size); lower them or use a larger corpus")
        self.step = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._permutation(epoch)[within * self.global_batch:(within + 1) * self.global_batch]
        out = []
        for m in range(self.grad_accum):
            start = (self.rank * self.grad_accum + m) * self.micro_batch_size
            index = np.sort(order[start:start + self.micro_batch_size].numpy())
            out.append(to_batch(self.rows[index]))
        return out

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            batches = self.micro_batches(self.step)
            self.step += 1
            yield batches

    def state_dict(self) -> dict:
        return {"step": self.step, "global_batch": self.global_batch, "num_rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("global_batch", "num_rows", "seed"):
            if state[key] != mine[key]:
                raise ValueError(f"the checkpoint's data position was taken with {key}={state[key]}, this run has "
                                 f"{mine[key]}; resume with the same data config, micro-batch, accumulation and ranks")
        self.step = state["step"]


def val_batches(rows: np.ndarray, micro_batch_size: int, rank: int, world_size: int,
                max_rows: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the first `max_rows` validation rows, in micro-batches; every rank gets as many."""
    per_round = micro_batch_size * world_size
    n = (min(len(rows), max_rows) // per_round) * per_round
    if n == 0:
        raise ValueError(f"{len(rows)} validation rows cannot give every rank one micro-batch of "
                         f"{micro_batch_size}; raise data.val_fraction or lower the micro-batch size")
    mine = rows[rank:n:world_size]
    return [to_batch(mine[i:i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)]
