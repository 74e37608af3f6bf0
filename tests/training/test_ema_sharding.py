"""ShardedEMA: ZeRO-3 slices and ZeRO-1/2 fragments, the update rule, and shards saved on one
world size (or stage) and loaded on another. Ranks are simulated in one process by giving each
EMA the pieces DeepSpeed would give that rank; tests/training/test_levers.py runs the real
stages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mmdit.checkpoints import CheckpointError, ema_shard_files, ema_shard_name, ema_state_dict
from training.ema import Piece, ShardedEMA, local_partition


def _model(seed: int = 0) -> nn.Module:
    """Odd sizes: weight 5x3 (15 elements) and bias 5, so most world sizes need padding."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2, bias=False))


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in _model().named_parameters()}


def _simulated(pieces: dict[str, Piece], rank: int, world: int) -> ShardedEMA:
    """An EMA as rank `rank` of `world` would hold it, following the given pieces."""
    ema = ShardedEMA(_model(seed=99).named_parameters(), decay=0.5)
    ema.rank, ema.world, ema.pieces = rank, world, pieces
    ema.shadow = {n: p.weights.clone() for n, p in pieces.items()}
    return ema


def _sharded(full: dict[str, torch.Tensor], rank: int, world: int) -> ShardedEMA:
    """An EMA on rank `rank` of `world`, its shadows set to ZeRO-3 slices of `full`."""
    pieces = {}
    for n, t in full.items():
        part = local_partition(t, rank, world)
        pieces[n] = Piece(rank * part.numel(), part)
    return _simulated(pieces, rank, world)


def _fragments(full: dict[str, torch.Tensor], rank: int, world: int) -> ShardedEMA:
    """An EMA on rank `rank` of `world` under ZeRO-1/2: all parameters flattened into one
    buffer, rank r owning the contiguous range r of it (so pieces start mid-parameter)."""
    flat = torch.cat([t.reshape(-1) for t in full.values()])
    n = -(-flat.numel() // world)
    lo, hi = rank * n, min((rank + 1) * n, flat.numel())
    pieces, offset = {}, 0
    for name, t in full.items():
        a, b = max(lo, offset), min(hi, offset + t.numel())
        if a < b:
            pieces[name] = Piece(a - offset, flat[a:b].clone())
        else:
            pieces[name] = Piece(0, torch.empty(0))
        offset += t.numel()
    return _simulated(pieces, rank, world)


# -- local_partition -------------------------------------------------------------------------


def test_local_partition_layout():
    full = torch.arange(1.0, 11.0).reshape(2, 5)  # 10 elements
    parts = [local_partition(full, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [
        [1.0, 2.0, 3.0, 4.0],
        [5.0, 6.0, 7.0, 8.0],
        [9.0, 10.0, 0.0, 0.0],
    ]
    assert all(p.dtype == full.dtype for p in parts)


@pytest.mark.parametrize("numel", [1, 7, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_local_partition_concatenates_back(numel, world):
    full = torch.randn(numel)
    parts = [local_partition(full, r, world) for r in range(world)]
    n = -(-numel // world)
    assert all(p.numel() == n for p in parts)
    joined = torch.cat(parts)
    assert torch.equal(joined[:numel], full)
    assert torch.count_nonzero(joined[numel:]) == 0


def test_local_partition_is_a_copy():
    full = torch.zeros(4)
    part = local_partition(full, 0, 1)
    part += 1
    assert torch.count_nonzero(full) == 0


# -- update ----------------------------------------------------------------------------------


def test_update_matches_hand_computed_ema():
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ShardedEMA(model.named_parameters(), decay=0.9)
    assert ema.shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}

    expected = {n: t.clone() for n, t in start.items()}
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * (k + 1))
        ema.update()
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n, t in expected.items():
        torch.testing.assert_close(ema.shadow[n], t.reshape(-1))
    # closed form: the weights moved by 0.5, 1.5, 3.0 in total before the three updates
    offset = 0.9**2 * 0.1 * 0.5 + 0.9 * 0.1 * 1.5 + 0.1 * 3.0
    torch.testing.assert_close(ema.shadow["0.bias"], start["0.bias"] + offset)
    # the shadow is a copy, not a view of the weights
    with torch.no_grad():
        model[0].bias.zero_()
    assert not torch.equal(ema.shadow["0.bias"], model[0].bias.reshape(-1))


def test_save_and_full_state_dict_round_trip(tmp_path):
    model = _model()
    ema = ShardedEMA(model.named_parameters(), decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    ema.update()
    path = ema.save(tmp_path)
    assert path == tmp_path / "ema_rank_00000_of_00001.safetensors"
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["shapes"]) == {
            "0.weight": [5, 3],
            "0.bias": [5],
            "1.weight": [2, 5],
        }
    full = ema_state_dict(tmp_path)
    assert set(full) == set(ema.shadow)
    for n, t in full.items():
        assert t.shape == ema.shapes[n] and t.dtype == torch.float32
        torch.testing.assert_close(t.reshape(-1), ema.shadow[n])

    other = ShardedEMA(_model(seed=5).named_parameters(), decay=0.99)
    other.load(tmp_path)
    for n in ema.shadow:
        torch.testing.assert_close(other.shadow[n], ema.shadow[n])


# -- resharding ------------------------------------------------------------------------------


@pytest.fixture
def two_rank_dir(tmp_path):
    full = _full(seed=3)
    for rank in range(2):
        _sharded(full, rank, 2).save(tmp_path)
    return tmp_path, full


def test_two_rank_shards_concatenate_to_the_full_tensors(two_rank_dir):
    directory, full = two_rank_dir
    assert [f.name for f in ema_shard_files(directory)] == [
        ema_shard_name(0, 2),
        ema_shard_name(1, 2),
    ]
    restored = ema_state_dict(directory)
    assert set(restored) == set(full)
    for n, t in full.items():
        assert torch.equal(restored[n], t)


def test_two_rank_shards_load_into_world_1(two_rank_dir):
    directory, full = two_rank_dir
    ema = ShardedEMA(_model(seed=7).named_parameters(), decay=0.5)
    ema.load(directory)
    for n, t in full.items():
        assert torch.equal(ema.shadow[n], t.reshape(-1))


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_two_rank_shards_load_into_world_3(two_rank_dir, rank):
    directory, full = two_rank_dir
    # ZeRO-3 would give this rank ceil(numel / 3) elements of each parameter
    ema = _sharded({n: torch.full_like(t, -1.0) for n, t in full.items()}, rank, 3)
    ema.load(directory)
    for n, t in full.items():
        flat = torch.cat([t.reshape(-1), torch.zeros(3 * ema.shadow[n].numel() - t.numel())])
        n_local = ema.shadow[n].numel()
        assert torch.equal(ema.shadow[n], flat[rank * n_local : (rank + 1) * n_local])
    if rank == 2:  # 0.bias has 5 elements: rank 2 holds [4] plus one zero of padding
        assert ema.shadow["0.bias"].tolist() == [full["0.bias"][4].item(), 0.0]


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_zero12_fragments_reassemble_and_reload_as_zero3_slices(tmp_path, world):
    full = _full(seed=13)
    emas = [_fragments(full, rank, world) for rank in range(world)]
    if world == 3:  # the middle rank owns the end of one parameter and the start of the next
        assert [p.start for p in emas[1].pieces.values() if p.weights.numel()] == [10, 0]
    for ema in emas:
        ema.save(tmp_path)
    restored = ema_state_dict(tmp_path)
    for n, t in full.items():
        assert torch.equal(restored[n], t)
    for rank in range(2):  # another stage and world size: ZeRO-3 on 2 ranks
        ema = _sharded({n: torch.zeros_like(t) for n, t in full.items()}, rank, 2)
        ema.load(tmp_path)
        for n, t in full.items():
            assert torch.equal(ema.shadow[n], local_partition(t, rank, 2))


def test_zero3_slices_reload_as_zero12_fragments(tmp_path):
    full = _full(seed=17)
    for rank in range(2):
        _sharded(full, rank, 2).save(tmp_path)
    for rank in range(3):
        reference = _fragments(full, rank, 3)
        ema = _fragments({n: torch.zeros_like(t) for n, t in full.items()}, rank, 3)
        ema.load(tmp_path)
        for n in full:
            assert torch.equal(ema.shadow[n], reference.shadow[n])


def test_more_ranks_than_elements(tmp_path):
    full = _full(seed=19)  # 0.bias has 5 elements: ranks 5..7 of 8 hold padding only
    for rank in range(8):
        _sharded(full, rank, 8).save(tmp_path)
    restored = ema_state_dict(tmp_path)
    assert all(torch.equal(restored[n], t) for n, t in full.items())


def test_pieces_that_do_not_tile_a_tensor_are_an_error(tmp_path):
    full = _full(seed=3)
    emas = [_fragments(full, rank, 2) for rank in range(2)]
    emas[1].pieces["0.bias"].start += 1  # a gap at the start of 0.bias, its end past it
    for ema in emas:
        ema.save(tmp_path)
    with pytest.raises(CheckpointError, match="pieces of 0.bias do not tile it"):
        ema_state_dict(tmp_path)


def test_world_3_save_and_world_2_reload(tmp_path):
    full = _full(seed=11)
    for rank in range(3):
        _sharded(full, rank, 3).save(tmp_path)
    for rank in range(2):
        ema = _sharded({n: torch.zeros_like(t) for n, t in full.items()}, rank, 2)
        ema.load(tmp_path)
        for n, t in full.items():
            assert torch.equal(ema.shadow[n], local_partition(t, rank, 2))


# -- errors ----------------------------------------------------------------------------------


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no EMA shards"):
        ema_state_dict(tmp_path)


def test_incomplete_shard_set_is_an_error(tmp_path):
    full = _full(seed=3)
    _sharded(full, 0, 2).save(tmp_path)
    with pytest.raises(ValueError, match="incomplete or mixed"):
        ema_state_dict(tmp_path)
    ema = ShardedEMA(_model().named_parameters(), decay=0.5)
    with pytest.raises(ValueError, match="incomplete or mixed"):
        ema.load(tmp_path)


def test_mixed_shard_sets_are_an_error(tmp_path):
    full = _full(seed=3)
    for rank in range(2):
        _sharded(full, rank, 2).save(tmp_path)
    _sharded(full, 0, 3).save(tmp_path)  # a stale shard from a 3-rank save
    with pytest.raises(ValueError, match="incomplete or mixed") as info:
        ema_state_dict(tmp_path)
    assert ema_shard_name(0, 3) in str(info.value)


def test_mixed_worlds_with_a_matching_count_are_an_error(tmp_path):
    full = _full(seed=3)
    _sharded(full, 0, 2).save(tmp_path)
    _sharded(full, 1, 3).save(tmp_path)  # two files, but of different world sizes
    with pytest.raises(ValueError, match="incomplete or mixed"):
        ema_shard_files(tmp_path)


def test_load_rejects_a_different_model(tmp_path):
    full = _full(seed=3)
    _sharded(full, 0, 1).save(tmp_path)
    wider = ShardedEMA(nn.Sequential(nn.Linear(3, 6)).named_parameters(), decay=0.5)
    with pytest.raises(ValueError, match="has shape"):
        wider.load(tmp_path)
    extra = ShardedEMA(
        nn.Sequential(
            nn.Linear(3, 5), nn.Linear(5, 2, bias=False), nn.Linear(2, 2)
        ).named_parameters(),
        decay=0.5,
    )
    with pytest.raises(ValueError, match="lacks"):
        extra.load(tmp_path)
    fewer = ShardedEMA(nn.Sequential(nn.Linear(3, 5)).named_parameters(), decay=0.5)
    with pytest.raises(ValueError, match="which this model lacks"):
        fewer.load(tmp_path)
