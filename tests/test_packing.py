"""Host-side preparation of cloze rows: batched tokenization, prefix-tree packing and the read plan of a
batch are rewritten for speed; each is checked here against the plain one-by-one definition."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import make_tokenizer
from declens.formats import Encoder, build_cloze, cloze_texts
from declens.runner import pack_sequences
from declens.scoring import _first_seen, cloze_rows
from declens.tasks import load_task


def _trie_pack(seqs):
    """The definition: insert the sequences one by one into a trie, numbering new nodes in order."""
    tokens, parents, children, where = [], [], {}, []
    for seq in seqs:
        node, path = -1, []
        for tok in seq:
            nxt = children.get((node, tok))
            if nxt is None:
                nxt = len(tokens)
                tokens.append(tok)
                parents.append(node)
                children[(node, tok)] = nxt
            path.append(nxt)
            node = nxt
        where.append(path)
    return tokens, parents, where


def _random_groups(n: int, seed: int = 0):
    """Groups of sequences over a 3-token alphabet that share prefixes often: equal sequences, one a
    prefix of another, empty ones, contexts of different lengths."""
    rng = random.Random(seed)
    for _ in range(n):
        base = [rng.randrange(3) for _ in range(rng.randrange(0, 8))]
        group = []
        for _ in range(rng.randrange(1, 6)):
            if group and rng.random() < 0.25:
                other = rng.choice(group)
                group.append(other[: rng.randrange(0, len(other) + 1)])
            else:
                group.append(base[: rng.randrange(0, len(base) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 5))])
        yield group


def test_pack_sequences_equals_trie_insertion():
    for group in _random_groups(3000):
        row, where = pack_sequences(group)
        tokens, parents, ref_where = _trie_pack(group)
        assert (row.tokens, row.parents, where) == (tokens, parents, ref_where), group
        for seq, path in zip(group, where):  # each sequence reads back from its path, at its own positions
            assert [row.tokens[i] for i in path] == list(seq)
            assert [row.positions[i] for i in path] == list(range(len(seq)))


def test_first_seen_numbers_keys_in_order_of_appearance():
    rng = np.random.default_rng(0)
    for _ in range(200):
        keys = rng.integers(0, 12, size=rng.integers(0, 40))
        uniq, idx = _first_seen(keys)
        ref: dict[int, int] = {}
        ref_idx = [ref.setdefault(int(k), len(ref)) for k in keys]
        assert uniq.tolist() == list(ref) and idx.tolist() == ref_idx


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("task,split,shots", [("hellaswag", "validation", 0), ("winogrande", "validation", 0),
                                              ("arc_easy", "test", 2), ("piqa", "validation", 0)])
def test_batched_pairs_equal_one_by_one(task, split, shots, add_bos):
    """Winogrande's options differ in their contexts, ARC with few-shot shares long prefixes, the BOS
    tokenizer adds a prefix: the batched tokenization and the read plan match the one-by-one ones."""
    data = load_task(task, split=split, limit=40, seed=3)
    enc = Encoder(make_tokenizer(add_bos))
    req = build_cloze(data, enc, num_fewshot=shots)
    one = Encoder(make_tokenizer(add_bos))
    for i, it in enumerate(data.items):
        pairs = [one.pair(c, x) for c, x in cloze_texts(data, it, shots, 0)]
        assert req.contexts[i] == [p[0] for p in pairs] and req.continuations[i] == [p[1] for p in pairs]
    for pack in (True, False):
        rows, reads, owner = cloze_rows(req, pack=pack)
        for r, row_reads in enumerate(reads):
            tokens = rows[r].tokens if pack else rows[r]
            positions = rows[r].positions if pack else list(range(len(tokens)))
            for slot, pos, tgt in row_reads.tolist():
                i, k = owner[slot]
                ctx, cont = req.contexts[i][k], req.continuations[i][k]
                j = positions[pos] - (len(ctx) - 1)  # the j-th continuation token is read one position earlier
                assert 0 <= j < len(cont) and cont[j] == tgt
                full = ctx + cont
                assert tokens[pos] == full[positions[pos]]  # the read position holds the token before the target
        assert sum(len(x) for x in reads) == sum(len(c) for cs in req.continuations for c in cs)


def test_cloze_probe_read_plan_covers_every_read_once():
    """The batch plan of :class:`ClozeProbe`: every read of every row in the batch appears once, pointing at
    its own (row, position), target and slot; positions are distinct and chunks cover the reads in order."""
    import types

    import torch

    from declens import scoring
    from declens.scoring import ClozeProbe

    data = load_task("arc_easy", split="test", limit=30, seed=1)
    req = build_cloze(data, Encoder(make_tokenizer()), num_fewshot=1)
    _, reads, _ = cloze_rows(req, pack=True)
    lens = types.SimpleNamespace(head=types.SimpleNamespace(weight=torch.zeros(512, 2)))
    probe = ClozeProbe(lens, reads, out=None)
    rng = random.Random(0)
    budget = dict(scoring.LOGIT_BUDGET)
    try:
        scoring.LOGIT_BUDGET["cpu"] = 512 * 5  # chunks of five positions
        for _ in range(20):
            idx = rng.sample(range(len(reads)), rng.randrange(1, 12))
            probe.start(types.SimpleNamespace(index=torch.tensor(idx), input_ids=torch.zeros(1)))
            got = sorted(zip(probe.urow[probe.ridx].tolist(), probe.upos[probe.ridx].tolist(), probe.rtgt.tolist(),
                             probe.slots[probe.rslot.numpy()].tolist()))
            want = sorted((b, p, t, s) for b, r in enumerate(idx) for s, p, t in reads[r].tolist())
            assert got == want
            pairs = list(zip(probe.urow.tolist(), probe.upos.tolist()))
            assert len(set(pairs)) == len(pairs)
            assert probe.ridx.tolist() == sorted(probe.ridx.tolist())
            ends = [(a, r0, r1) for a, r0, r1 in probe.chunks]
            assert ends[0][1] == 0 and ends[-1][2] == len(probe.ridx)
            assert all(x[2] == y[1] for x, y in zip(ends, ends[1:]))
            for a, r0, r1 in ends:
                assert all(a <= u < a + probe.chunk for u in probe.ridx[r0:r1].tolist())
    finally:
        scoring.LOGIT_BUDGET.update(budget)
