"""biastransfer.datasets: completion-only masks position by position, tokenization of records,
packing conservation, seeded per-epoch shuffling as a pure function of the step, feature and
noise sources."""
from __future__ import annotations

import json

import pytest
import torch

from biastransfer import Tokenizer
from biastransfer import datasets as D
from biastransfer.data import Record


def test_collate_masks_prompt_and_pads_right():
    a = D.make_example([5, 6, 7], [8, 9], eos_id=1)
    b = D.make_example([2], [3], eos_id=1)
    assert a.tokens == [5, 6, 7, 8, 9, 1] and a.completion == [0, 0, 0, 1, 1, 1]
    assert a.prompt_length == 3
    batch = D.collate([a, b], pad_id=0)
    assert batch.input.tolist() == [[5, 6, 7, 8, 9], [2, 3, 0, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, 8, 9, 1], [3, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.loss_mask.dtype == torch.float32 and batch.teacher_logits is None
    assert D.collate([a], pad_id=9, pad_to=7).input.tolist() == [[5, 6, 7, 8, 9, 9, 9]]


def test_truncation_policies():
    kwargs = dict(eos_id=None, max_tokens=5)
    with pytest.raises(ValueError, match="7 tokens"):
        D.make_example([1, 2, 3, 4], [5, 6, 7], **kwargs)
    assert D.make_example([1, 2, 3, 4], [5, 6, 7], truncation="right", **kwargs).tokens == [1, 2, 3, 4, 5]
    left = D.make_example([1, 2, 3, 4], [5, 6, 7], truncation="left", **kwargs)
    assert left.tokens == [3, 4, 5, 6, 7] and left.completion == [0, 0, 1, 1, 1]
    assert D.make_example([1, 2, 3, 4], [5, 6, 7], truncation="drop", **kwargs) is None
    with pytest.raises(ValueError, match="truncation"):
        D.DatasetConfig(truncation="middle")


@pytest.fixture()
def tiny_tokenizer(tmp_path):
    (tmp_path / "vocab.json").write_text(
        json.dumps({"a": 0, "b": 1, "c": 2, "\u0120": 3, "ab": 4, "X": 5}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    return Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_tokenize_records_and_jsonl(tiny_tokenizer, tmp_path):
    config = D.DatasetConfig(eos_id=5, max_tokens=5, truncation="drop", batch_size=2)
    records = [Record("ab", " c"), ("c", "ab c"), {"prompt": "a", "completion": "cccccc"}]
    examples, stats = D.tokenize_records(records, tiny_tokenizer, config)
    assert [e.tokens for e in examples] == [[4, 3, 2, 5], [2, 4, 3, 2, 5]]
    assert [e.completion for e in examples] == [[0, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert stats == D.TokenizeStats(examples=2, truncated=0, dropped=1)

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in [("ab", " c"), ("c", "ab c")]))
    source = D.token_dataset(path, config, tokenizer=tiny_tokenizer)
    assert len(source) == 2 and source.steps_per_epoch() == 1
    batch = source.batch(0)
    rows = sorted(batch.input.tolist())
    assert rows == sorted([[4, 3, 2, 0], [2, 4, 3, 2]])
    with pytest.raises(ValueError, match="tokenizer"):
        D.token_dataset(records)


def test_pack_conserves_tokens_and_masks():
    examples = [D.make_example(list(range(10 * i, 10 * i + 1 + i % 3)),
                               list(range(100 + 10 * i, 100 + 10 * i + 1 + i % 4)), eos_id=1)
                for i in range(9)]
    stream = [t for e in examples for t in e.tokens]
    flags = [f for e in examples for f in e.completion]
    for length in (1, 4, 7, 64):
        blocks = D.pack(examples, length)
        real = blocks["attention_mask"].flatten().bool()
        inputs = blocks["input"].flatten()[real].tolist()
        targets = blocks["targets"].flatten()[real].tolist()
        loss = blocks["loss_mask"].flatten()[real].tolist()
        assert inputs == stream
        assert targets[:-1] == stream[1:]
        assert loss == [float(f) for f in flags[1:]] + [0.0]
        assert blocks["loss_mask"].flatten()[~real].sum().item() == 0


def test_token_dataset_is_a_pure_function_of_the_step():
    examples = [D.make_example([10 + i], [20 + i] * (1 + i % 3), eos_id=1) for i in range(11)]
    source = D.token_dataset(examples, D.DatasetConfig(batch_size=4, seed=3))
    assert source.steps_per_epoch() == 3
    forward = [source.batch(s) for s in range(9)]
    again = D.token_dataset(examples, D.DatasetConfig(batch_size=4, seed=3))
    for s in (8, 0, 5, 2):
        assert torch.equal(again.batch(s).input, forward[s].input)
        assert torch.equal(again.batch(s).loss_mask, forward[s].loss_mask)
    for epoch in range(3):
        firsts = sorted(int(b.input[r, 0]) for b in forward[3 * epoch: 3 * epoch + 3]
                        for r in range(b.size()))
        assert firsts == [10 + i for i in range(11)]  # each example once per epoch
    assert D.batch_indices(11, 4, batch_size=4, seed=3) == D.epoch_permutation(11, 3, 1)[4:8]
    packed = D.token_dataset(examples, D.DatasetConfig(batch_size=2, pack_length=5))
    assert packed.batch(0).input.shape == (2, 5)


def test_tensor_and_noise_sources():
    features = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    labels = torch.arange(10)
    source = D.tensor_dataset(features, labels, batch_size=4, seed=1, drop_last=True)
    assert source.steps_per_epoch() == 2
    seen = []
    for s in range(2):
        b = source.batch(s)
        assert torch.equal(b.input, features[b.targets])
        seen += b.targets.tolist()
    assert len(set(seen)) == 8
    with pytest.raises(TypeError):
        D.tensor_dataset(features, labels.int())

    noise = D.noise_source(5, batch_size=512, low=-1.0, high=1.0, seed=2)
    x = noise.batch(7).input
    assert x.shape == (512, 5) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert abs(x.mean().item()) < 5 * (1 / 3 / x.numel()) ** 0.5
    assert torch.equal(noise.batch(7).input, x)
    assert not torch.equal(noise.batch(8).input, x)
    assert noise.batch(0).targets is None
    assert D.noise_source(5, dtype=torch.float64).batch(0).input.dtype == torch.float64
