"""The grain recipe end to end: deterministic, exactly resumable, disjoint per process, ring-ordered, sharded."""

import json

import absl.flags
import grain
import jax
import numpy as np
import pytest

import eqx_ring
from data_pipelines import (
    ROW_KEYS,
    ByteTokenizer,
    MovingShapes,
    PackedShards,
    PackIterDataset,
    PatchQuantizer,
    global_batch,
    global_packed_batches,
    packed_batches,
    packing_stats,
    process_rows,
    shard_batches,
    video_text_examples,
    with_targets,
    write_packed_shards,
)
from eqx_ring.sharding import make_mesh

TOK = ByteTokenizer()
SOURCE = MovingShapes(64, num_frames=4, size=16, seed=0)
QUANTIZER = PatchQuantizer(patch=8, levels=4)  # 4 codes per frame: 4 * 5 + 2 = 22 vision tokens


def examples(seed=0, **kw):
    kw = {"tasks": {"video_to_text": 1.0, "text_to_video": 1.0}, "num_epochs": None, **kw}
    return video_text_examples(SOURCE, video_tokenizer=QUANTIZER, seed=seed, process_index=0, process_count=1, **kw)


def batches(seed=0, **kw):
    return packed_batches(examples(seed), seq_len=128, batch_size=2, pad_id=TOK.pad_id, **kw)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def test_same_seed_same_batches():
    first = take(iter(batches()), 5)
    assert_same(first, take(iter(batches()), 5))
    assert first[0]["tokens"].shape == (2, 128) and set(first[0]) == set(ROW_KEYS)
    assert not np.array_equal(first[0]["tokens"], next(iter(batches(seed=1)))["tokens"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_after_k_batches_is_byte_identical(num_workers):
    if num_workers:
        absl.flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    dataset = batches(num_workers=num_workers, layout="zigzag", ring_size=4)
    it = iter(dataset)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what grain's checkpoint handler stores
    expected = take(it, 4)
    restored = iter(dataset)
    restored.set_state(state)
    got = take(restored, 4)
    # The packers' counts travel in the state, from worker processes too: 7 batches of 2 rows so far.
    assert packing_stats(it).rows == packing_stats(restored).rows == 14
    for i in (it, restored):
        if hasattr(i, "close"):
            i.close()
    assert_same(got, expected)


def test_processes_read_disjoint_shards_covering_the_source():
    def indices(process_index, process_count):
        ds = video_text_examples(SOURCE, video_tokenizer=QUANTIZER, process_index=process_index,
                                 process_count=process_count)
        return [ds[i]["index"] for i in range(len(ds))]

    a, b = indices(0, 2), indices(1, 2)
    assert set(a).isdisjoint(b) and sorted(a + b) == list(range(len(SOURCE)))
    with pytest.raises(ValueError, match=r"process_index=2 must lie in \[0, process_count=2\)"):
        indices(2, 2)


def test_task_mixture_is_drawn_per_example():
    ds = examples(tasks={"video_to_text": 3.0, "text_to_video": 1.0}, num_epochs=1)
    tasks = np.array([ds[i]["task"] for i in range(len(ds))])
    assert 0.5 < (tasks == 0).mean() < 0.95 and set(tasks) == {0, 1}
    again = examples(tasks={"video_to_text": 3.0, "text_to_video": 1.0}, num_epochs=1)
    assert tasks.tolist() == [again[i]["task"] for i in range(len(again))]
    with pytest.raises(ValueError, match="tasks must name some of"):
        examples(tasks={"captioning": 1.0})


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_ring_layout_round_trips(layout):
    natural = take(iter(batches()), 3)
    laid_out = take(iter(batches(layout=layout, ring_size=4)), 3)
    for n, lay in zip(natural, laid_out, strict=True):
        for k in ROW_KEYS:
            np.testing.assert_array_equal(eqx_ring.from_layout(lay[k], layout, 4, axis=1), n[k])


def test_every_example_token_reaches_the_rows():
    """One epoch, no shuffle: the rows hold every example's token sequence, in order, segment by segment."""
    ds = video_text_examples(SOURCE, video_tokenizer=QUANTIZER, shuffle=False, process_index=0, process_count=1)
    rows = [r for b in packed_batches(ds, seq_len=128, batch_size=1, pad_id=TOK.pad_id) for r in b["tokens"]]
    segs = [r for b in packed_batches(ds, seq_len=128, batch_size=1, pad_id=TOK.pad_id) for r in b["segment_ids"]]
    pieces = [row[seg == s] for row, seg in zip(rows, segs, strict=True) for s in range(1, seg.max() + 1)]
    assert [p.tolist() for p in pieces] == [ds[i]["tokens"].tolist() for i in range(len(ds))]


def test_global_batch_shards_over_data_and_ring_axes():
    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
    local = next(iter(packed_batches(examples(), seq_len=128, batch_size=4, pad_id=TOK.pad_id, layout="zigzag",
                                     ring_size=4)))
    arrays = global_batch(local, mesh)
    for k, v in arrays.items():
        assert v.shape == (4, 128)
        np.testing.assert_array_equal(np.asarray(v), local[k])
        assert v.sharding.spec == jax.sharding.PartitionSpec(("dp", "fsdp"), "sp")
        assert {s.data.shape for s in v.addressable_shards} == {(2, 32)}


def test_global_packed_batches_do_not_depend_on_who_reads_which_rows():
    """Row r packs examples r, r + B, r + 2B, ...; any split of the rows yields the same global batches,
    and the union of the splits' states restores every split, whatever the split was when saved."""
    ex = examples()
    full = iter(global_packed_batches(ex, seq_len=128, batch_size=4, pad_id=TOK.pad_id, rows=range(4)))
    expected = take(full, 5)
    for r in range(4):  # row r is exactly the packing of its own stream of examples
        alone = iter(PackIterDataset(ex[r::4].to_iter_dataset(), 128, TOK.pad_id).map(with_targets))
        assert_same([{k: b[k][r] for k in b} for b in expected], take(alone, 5))
    halves = [iter(global_packed_batches(ex, seq_len=128, batch_size=4, pad_id=TOK.pad_id, rows=rows))
              for rows in ([0, 1], [2, 3])]
    got = [take(h, 3) for h in halves]
    assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*got, strict=True)], expected[:3])
    # Saved by two readers of half the rows, restored into one reader of all of them, and back.
    state = {"rows": {r: s for h in halves for r, s in json.loads(json.dumps(h.get_state()))["rows"].items()}}
    resumed = iter(global_packed_batches(ex, seq_len=128, batch_size=4, pad_id=TOK.pad_id, rows=range(4)))
    resumed.set_state(state)
    assert_same(take(resumed, 2), expected[3:])
    quarter = iter(global_packed_batches(ex, seq_len=128, batch_size=4, pad_id=TOK.pad_id, rows=[3]))
    quarter.set_state(state)
    assert_same(take(quarter, 2), [{k: b[k][3:] for k in b} for b in expected[3:]])
    with pytest.raises(ValueError, match="no rows"):
        iter(global_packed_batches(ex, seq_len=128, batch_size=8, pad_id=TOK.pad_id, rows=[6])).set_state(state)
    with pytest.raises(ValueError, match="distinct indices"):
        global_packed_batches(ex, seq_len=128, batch_size=4, pad_id=TOK.pad_id, rows=[4])


def test_global_batch_from_process_rows_equals_the_process_order_concatenation():
    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
    assert process_rows(mesh, 4) == (0, 1, 2, 3)  # one process holds every row
    local = next(iter(global_packed_batches(examples(), seq_len=128, batch_size=4, pad_id=TOK.pad_id,
                                            layout="zigzag", ring_size=4)))
    by_rows, by_order = global_batch(local, mesh, batch_size=4), global_batch(local, mesh)
    for k in local:
        assert by_rows[k].sharding == by_order[k].sharding
        np.testing.assert_array_equal(np.asarray(by_rows[k]), local[k])
    with pytest.raises(ValueError, match="holds rows"):
        global_batch(local, mesh, batch_size=8)


def test_orbax_checkpoint_restores_the_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = iter(batches())
    take(it, 2)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 3)
    restored = iter(batches())
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same(take(restored, 3), expected)


def test_packed_shards_round_trip(tmp_path):
    rows = list(PackIterDataset(examples(num_epochs=1).to_iter_dataset(), 128, TOK.pad_id))
    paths = write_packed_shards(rows, tmp_path, rows_per_shard=5)
    assert len(paths) == -(-len(rows) // 5)
    shards = PackedShards(paths)
    assert len(shards) == len(rows)
    assert_same([shards[i] for i in range(len(shards))], rows)
    # Read back in order, laid out for a 4-device zigzag ring, then undone: the rows as packed.
    read = list(shard_batches(shards, batch_size=1, shuffle=False, layout="zigzag", ring_size=4, process_index=0,
                              process_count=1))
    for batch, row in zip(read, rows, strict=True):
        row = with_targets(row)
        for k in ROW_KEYS:
            np.testing.assert_array_equal(eqx_ring.from_layout(batch[k][0], "zigzag", 4, axis=0), row[k])
    halves = [list(shard_batches(shards, batch_size=1, seed=3, process_index=i, process_count=2)) for i in (0, 1)]
    seen = sorted(b["tokens"][0].tobytes() for half in halves for b in half)
    assert seen == sorted(r["tokens"].tobytes() for r in rows)
    with pytest.raises(FileNotFoundError, match="nope.array_record"):
        PackedShards([tmp_path / "nope.array_record"])


def test_next_token_targets_are_taken_in_natural_order():
    natural = take(iter(batches()), 2)
    laid_out = take(iter(batches(layout="striped", ring_size=4)), 2)
    for n, lay in zip(natural, laid_out, strict=True):
        np.testing.assert_array_equal(n["targets"][:, :-1], n["tokens"][:, 1:])
        seg = n["segment_ids"]
        expected = n["loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        np.testing.assert_array_equal(n["target_mask"][:, :-1], expected)
        assert not n["target_mask"][:, -1].any()
        np.testing.assert_array_equal(n["target_vision_mask"][:, :-1], n["vision_mask"][:, 1:])
        for k in ("targets", "target_mask", "target_vision_mask"):
            np.testing.assert_array_equal(eqx_ring.from_layout(lay[k], "striped", 4, axis=1), n[k])
