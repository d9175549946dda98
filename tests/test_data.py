"""trainer.data: split, packing and caching against independent recomputation; sharding and resume."""
import json
import random

import numpy as np
import pytest

from trainer.data import (Corpus, DataConfig, TrainLoader, is_validation, stdlib_files, to_batch,
                          val_batches)


def _write_corpus(tmp_path, seed=0, n_docs=80):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij_() :") for _ in range(rng.randint(2, 7))) for _ in range(60)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(n_docs)]
    txt = tmp_path / "a.txt"
    txt.write_text(docs[0])
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d}) for d in docs[1:]) + "\n")
    return [str(txt), str(jsonl)], docs


def _cfg(tmp_path, paths, cache="cache", **kw):
    return DataConfig(corpus="files", paths=paths, jsonl_key="body", vocab_size=300, seq_len=16, micro_batch_size=2,
                      val_fraction=0.2, cache_dir=str(tmp_path / cache), **kw)


def test_prepare_is_deterministic_and_packs_documents_in_order(tmp_path):
    paths, docs = _write_corpus(tmp_path)
    a = Corpus(_cfg(tmp_path, paths, "c1"))
    a.prepare()
    b = Corpus(_cfg(tmp_path, paths, "c2"))
    b.prepare()
    da, db = a.load(), b.load()
    assert np.array_equal(da.train_rows, db.train_rows) and np.array_equal(da.val_rows, db.val_rows)
    assert da.tokenizer_path.read_text() == db.tokenizer_path.read_text()

    tok = a.load_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    val_docs = [d for d in docs if is_validation(d, 0.2)]
    train_docs = [d for d in docs if not is_validation(d, 0.2)]
    assert 0 < len(val_docs) < len(docs) // 2
    for rows, split_docs in ((da.train_rows, train_docs), (da.val_rows, val_docs)):
        stream = [t for d in split_docs for t in tok.encode(d).ids + [eos]]
        n = len(stream) // 17
        assert rows.shape == (n, 17)
        assert rows.reshape(-1).tolist() == stream[: n * 17]
    assert tok.decode(tok.encode(docs[3]).ids) == docs[3]


def test_user_tokenizer_and_bad_inputs(tmp_path):
    paths, _ = _write_corpus(tmp_path)
    first = Corpus(_cfg(tmp_path, paths))
    first.prepare()
    reuse = Corpus(_cfg(tmp_path, paths, "other", tokenizer=str(first.tokenizer_path)))
    reuse.prepare()
    assert np.array_equal(reuse.load().train_rows, first.load().train_rows)
    with pytest.raises(ValueError, match="data.tokenizer"):
        Corpus(_cfg(tmp_path, paths, tokenizer=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="data.paths"):
        Corpus(_cfg(tmp_path, [str(tmp_path / "nope.txt")]))
    with pytest.raises(ValueError, match="data.eos_token"):
        Corpus(_cfg(tmp_path, paths, "c3", tokenizer=str(first.tokenizer_path), eos_token="<eos>")).prepare()
    with pytest.raises(ValueError, match="jsonl_key"):
        Corpus(DataConfig(corpus="files", paths=paths, jsonl_key="text", cache_dir=str(tmp_path / "c4"))).prepare()


def test_stdlib_corpus_has_no_tests():
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "functools.py", "ast.py"} <= names
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def _rows(n=103, width=5):
    return np.random.default_rng(0).integers(0, 1000, size=(n, width)).astype(np.uint16)


def _ids(batches):
    return [tuple(row) for b in batches for row in b["tokens"].tolist()]


def test_two_ranks_see_the_global_batches_of_one_rank():
    rows = _rows()
    one = TrainLoader(rows, micro_batch_size=3, grad_accum=4, rank=0, world_size=1, seed=7)
    two = [TrainLoader(rows, micro_batch_size=3, grad_accum=2, rank=r, world_size=2, seed=7) for r in range(2)]
    for step in range(12):
        whole = _ids(one.micro_batches(step))
        parts = [_ids(l.micro_batches(step)) for l in two]
        assert len(set(parts[0]) & set(parts[1])) == 0
        assert sorted(parts[0] + parts[1]) == sorted(whole)
    epoch0 = [r for s in range(one.steps_per_epoch) for r in _ids(one.micro_batches(s))]
    assert len(set(epoch0)) == len(epoch0) == one.steps_per_epoch * 12
    epoch1 = [r for s in range(one.steps_per_epoch, 2 * one.steps_per_epoch) for r in _ids(one.micro_batches(s))]
    assert epoch0 != epoch1, "each epoch must draw its own permutation"


def test_loader_resumes_from_its_state_and_refuses_another_layout():
    rows = _rows()
    loader = TrainLoader(rows, 2, 2, 0, 1, seed=1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [_ids(next(it)) for _ in range(3)]
    resumed = TrainLoader(rows, 2, 2, 0, 1, seed=1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [_ids(next(it2)) for _ in range(3)] == expected
    other = TrainLoader(rows, 2, 1, 0, 1, seed=1)
    with pytest.raises(ValueError, match="global_batch"):
        other.load_state_dict(state)


def test_batches_are_shifted_rows_and_val_is_sharded_evenly():
    rows = _rows(n=23)
    batch = to_batch(rows[:4])
    assert batch["tokens"].tolist() == rows[:4, :-1].tolist()
    assert batch["labels"].tolist() == rows[:4, 1:].tolist()
    shards = [val_batches(rows, 2, r, 3, max_rows=100) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    seen = [r for s in shards for r in _ids(s)]
    assert len(seen) == len(set(seen)) == 18
    with pytest.raises(ValueError, match="validation rows"):
        val_batches(rows[:3], 2, 0, 2, max_rows=100)
